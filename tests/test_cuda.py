"""The CUDA kernels (csrc/cuda/): compiled here, run where a GPU is.

- every csrc/cuda/*.cu compiles with nvcc for sm_80 and sm_90 (skips only when nvcc is absent);
- bindings.cpp compiles (syntax and templates) against this torch's headers and CUDA's;
- on a CUDA device (`pytest -m gpu`), the six ops of the `fastrnn` namespace on CUDA tensors agree with
  the reference backend's ops, in both schemes (FASTRNN_CUDA_SCHEME=step|persistent).

T: time steps  B: batch  H: hidden size  Hout: proj_size or H
"""

import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastrnn.backends.schemas import SCHEMAS

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CUDA_DIR = CSRC / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
# The arch targets; setup.py builds FASTRNN_CUDA_ARCHS (default "8.0;9.0") the same way.
GENCODE = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]


def find_nvcc():
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "nvcc").exists():
            return str(Path(candidate) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME, /usr/local/cuda, PATH): "
                                "the CUDA sources cannot be compiled on this machine")


def run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nexit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"


def test_every_kernel_file_is_found():
    names = {p.name for p in CU_FILES}
    assert {"step.cu", "persistent.cu", "persistent_lstm.cu", "persistent_gru.cu", "persistent_rnn.cu"} <= names


@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles(source, tmp_path):
    """One nvcc call per file, both archs, warnings as errors (ptxas included: register/shared limits)."""
    run([NVCC, "-std=c++17", "-O3", "--Werror", "all-warnings", "-I", str(CSRC), *GENCODE,
         "-c", str(source), "-o", str(tmp_path / (source.stem + ".o"))])


def torch_include_dirs():
    from torch.utils.cpp_extension import include_paths

    return include_paths()


@pytest.mark.slow
@needs_nvcc
def test_bindings_compile_against_torch_headers():
    """bindings.cpp through the host compiler with -fsyntax-only (templates instantiated, nothing linked).

    A CPU build of torch ships the c10/cuda headers but not the generated c10/cuda/impl/cuda_cmake_macros.h;
    C10_CUDA_NO_CMAKE_CONFIGURE_FILE (c10/cuda/CUDAMacros.h's own switch) skips it, which changes nothing
    on Linux (it only sets the Windows export macros). bindings.cpp includes no ATen/cuda header, because
    ATen/cuda/CUDAContext.h pulls cuSPARSE/cuBLAS headers that a bare CUDA toolkit may lack.
    """
    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    cxx = cxx.split()[0]
    if shutil.which(cxx) is None:
        pytest.skip(f"no host C++ compiler ({cxx}) to check bindings.cpp with")
    cuda_include = str(Path(NVCC).resolve().parents[1] / "include")
    includes = []
    for d in torch_include_dirs() + [cuda_include]:
        includes += ["-isystem", d]
    run([cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", *includes,
         "-I", str(CSRC), str(CUDA_DIR / "bindings.cpp")])


def test_bindings_register_every_op():
    """TORCH_LIBRARY_IMPL(fastrnn, CUDA) registers exactly the six ops of the contract."""
    text = (CUDA_DIR / "bindings.cpp").read_text()
    assert "TORCH_LIBRARY_IMPL(fastrnn, CUDA, m)" in text
    assert set(re.findall(r'm\.impl\("(\w+)"', text)) == set(SCHEMAS)


# ---------------------------------------------------------------------------------------------------------
# On a GPU: the CUDA ops against the reference ops.

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def cuda_ops():
    """torch.ops.fastrnn with CUDA kernels registered; fails (not skips) on a GPU machine without them."""
    try:
        import fastrnn._C  # noqa: F401  (loading the library registers the ops)
    except ImportError as e:
        pytest.fail(f"the compiled extension fastrnn._C is not built ({e}); run the project's install step")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastrnn::lstm_fwd", "CUDA"), (
        "fastrnn._C has no CUDA kernels: it was built without a CUDA torch or nvcc, or with FASTRNN_SKIP_CUDA_BUILD"
    )
    return torch.ops.fastrnn


def reference_ops():
    from fastrnn.backends import ops

    return SimpleNamespace(**ops("reference"))


@pytest.fixture(params=["step", "persistent"])
def scheme(request, monkeypatch):
    monkeypatch.setenv("FASTRNN_CUDA_SCHEME", request.param)
    return request.param


def make_lengths(B, T, device):
    """Lengths from T down to 1 in a shuffled order (T at index 0 when B > 0), as packing produces."""
    if B == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    lengths = torch.linspace(T, 1, B).round().long().clamp(1, T)
    return lengths[torch.randperm(B)].to(device)


def compare(name, ref, out, atol, rtol):
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    out, ref = out.double().cpu(), ref.double().cpu()
    assert not torch.isnan(out).any(), f"{name}: NaN"
    ratio = (out - ref).abs() / (atol + rtol * ref.abs())
    worst = int(ratio.flatten().argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), ref.shape))
    assert float(ratio.flatten()[worst]) <= 1.0, (
        f"{name}: mismatch at {idx}: got {float(out[idx]):.6g}, reference {float(ref[idx]):.6g} "
        f"({float(ratio.flatten()[worst]):.3g}x the allowed error)"
    )


def tolerance(dtype, T):
    if dtype == torch.float64:
        return dict(atol=1e-10, rtol=1e-9)  # summation order only
    if dtype == torch.float32:
        return dict(atol=2e-5, rtol=2e-5)  # contract: ~1e-5 relative; T <= 9 steps of order-1 values
    # fp16/bf16: the step scheme rounds the state and the GEMM outputs (h, gh, dh) to the storage type at
    # each of the T steps, about 4 roundings of eps/2 each per step through forward and backward, so the
    # error grows to about 2 T eps on order-1 values (cuDNN does the same roundings).
    eps = torch.finfo(dtype).eps
    return dict(atol=2 * T * eps, rtol=2 * T * eps)


def random_inputs(cell, T, B, H, proj, dtype, device, gen):
    G = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}[cell]
    Hout = proj or H
    scale = H**-0.5  # nn.LSTM's init range: keeps the pre-activations of order 1

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * s).to(device=device, dtype=dtype)

    return dict(
        gx=rnd(T, B, G * H), w_hh=rnd(G * H, Hout, s=scale), b_hh=rnd(G * H, s=scale), h0=rnd(B, Hout, s=0.5),
        c0=rnd(B, H, s=0.5), w_hr=rnd(Hout, H, s=scale) if proj else None, dy=rnd(T, B, Hout), dh_n=rnd(B, Hout),
        dc_n=rnd(B, H),
    )


def run_cell(op, cell, x, lengths, reverse):
    """Forward then backward of one cell through one op table; returns {name: tensor}."""
    if cell == "lstm":
        y, h_n, c_n, gates, cs = op.lstm_fwd(x["gx"], x["w_hh"], x["h0"], x["c0"], x["w_hr"], lengths, reverse, True)
        dgx, dh0, dc0, dw_hr = op.lstm_bwd(x["dy"], x["dh_n"], x["dc_n"], x["w_hh"], x["c0"], x["w_hr"], gates, cs,
                                           lengths, reverse)
        return dict(y=y, h_n=h_n, c_n=c_n, gates=gates, cs=cs, dgx=dgx, dh0=dh0, dc0=dc0, dw_hr=dw_hr)
    if cell == "gru":
        y, h_n, saved = op.gru_fwd(x["gx"], x["w_hh"], x["b_hh"], x["h0"], lengths, reverse, True)
        dgx, dgh, dh0 = op.gru_bwd(x["dy"], x["dh_n"], x["w_hh"], y, x["h0"], saved, lengths, reverse)
        return dict(y=y, h_n=h_n, saved=saved, dgx=dgx, dgh=dgh, dh0=dh0)
    relu = cell == "rnn_relu"
    y, h_n = op.rnn_fwd(x["gx"], x["w_hh"], x["h0"], lengths, reverse, relu)
    dgx, dh0 = op.rnn_bwd(x["dy"], x["dh_n"], x["w_hh"], y, lengths, reverse, relu)
    return dict(y=y, h_n=h_n, dgx=dgx, dh0=dh0)


CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
# (T, B, H, proj, lengths, reverse): odd sizes on purpose. H=37 gives one unit per block; H=300 gives
# 3 units per block on a 132-SM H100 (a partly filled last block on a 108-SM A100); B=5 and 13 use batch
# tiles of 8 with padding (13: two passes); B=1 the tile of 1.
SHAPES = [
    (6, 3, 37, 0, False, False),
    (7, 5, 37, 0, True, True),
    (9, 1, 300, 0, True, False),
    (5, 13, 300, 0, False, True),
    (1, 2, 16, 0, True, True),
]
PROJ_SHAPES = [(7, 5, 37, 11, True, False), (6, 3, 24, 5, True, True)]


def shape_id(s):
    T, B, H, proj, lengths, reverse = s
    return f"T{T}-B{B}-H{H}" + (f"-proj{proj}" if proj else "") + ("-lengths" if lengths else "") + (
        "-reverse" if reverse else "")


def check_against_reference(cell, shape, dtype, scheme):
    T, B, H, proj, with_lengths, reverse = shape
    gen = torch.Generator().manual_seed(1234)
    x = random_inputs(cell, T, B, H, proj, dtype, "cuda", gen)
    lengths = make_lengths(B, T, "cuda") if with_lengths else None
    out = run_cell(cuda_ops(), cell, x, lengths, reverse)
    # The oracle: the reference ops in fp64 on the same data.
    x64 = {k: (v.double() if v is not None else None) for k, v in x.items()}
    ref = run_cell(reference_ops(), cell, x64, lengths, reverse)
    assert out.keys() == ref.keys()
    for name in ref:
        assert out[name].dtype == dtype or out[name].numel() == 0, f"{name}: dtype {out[name].dtype}"
        compare(name, ref[name], out[name], **tolerance(dtype, T))
    return out


@gpu
@needs_cuda
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_ops_match_reference(cell, shape, dtype, scheme):
    check_against_reference(cell, shape, dtype, scheme)


@gpu
@needs_cuda
@pytest.mark.parametrize("shape", SHAPES[:3], ids=shape_id)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_ops_low_precision(cell, shape, dtype, scheme):
    check_against_reference(cell, shape, dtype, scheme)


@gpu
@needs_cuda
@pytest.mark.parametrize("shape", PROJ_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_lstm_projection_step_scheme(shape, dtype, monkeypatch):
    monkeypatch.setenv("FASTRNN_CUDA_SCHEME", "step")
    check_against_reference("lstm", shape, dtype, "step")


@gpu
@needs_cuda
def test_projection_refuses_forced_persistent(monkeypatch):
    monkeypatch.setenv("FASTRNN_CUDA_SCHEME", "persistent")
    x = random_inputs("lstm", 3, 2, 8, 4, torch.float32, "cuda", torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="persistent kernel does not apply.*projections"):
        cuda_ops().lstm_fwd(x["gx"], x["w_hh"], x["h0"], x["c0"], x["w_hr"], None, False, True)


@gpu
@needs_cuda
@pytest.mark.parametrize("cell", CELLS)
def test_deterministic(cell, scheme):
    """Two runs give bitwise equal results (no atomics; cuBLAS is deterministic on one stream)."""
    shape = (7, 5, 37, 0, True, False)
    first = check_against_reference(cell, shape, torch.float32, scheme)
    second = check_against_reference(cell, shape, torch.float32, scheme)
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs between two identical runs"


@gpu
@needs_cuda
@pytest.mark.parametrize("B", [0, 1])
def test_empty(B, scheme):
    """B = 0 returns empty outputs without launching; save=False returns [0]-shaped saved tensors."""
    x = random_inputs("lstm", 4, B, 8, 0, torch.float32, "cuda", torch.Generator().manual_seed(0))
    y, h_n, c_n, gates, cs = cuda_ops().lstm_fwd(x["gx"], x["w_hh"], x["h0"], x["c0"], None, None, False, False)
    assert y.shape == (4, B, 8) and h_n.shape == (B, 8) and c_n.shape == (B, 8)
    assert gates.shape == (0,) and cs.shape == (0,)


@gpu
@needs_cuda
def test_bad_inputs_raise():
    op = cuda_ops()
    x = random_inputs("gru", 3, 2, 8, 0, torch.float32, "cuda", torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="w_hh has shape"):
        op.gru_fwd(x["gx"], x["w_hh"][:-1], x["b_hh"], x["h0"], None, False, True)
    with pytest.raises(RuntimeError, match="dtype"):
        op.gru_fwd(x["gx"], x["w_hh"].double(), x["b_hh"], x["h0"], None, False, True)
    with pytest.raises(RuntimeError, match="lengths must be int64"):
        op.gru_fwd(x["gx"], x["w_hh"], x["b_hh"], x["h0"], torch.ones(2, device="cuda"), False, True)
    with pytest.raises(RuntimeError, match="is on cpu"):
        op.gru_fwd(x["gx"], x["w_hh"].cpu(), x["b_hh"], x["h0"], None, False, True)
    with pytest.raises(RuntimeError, match="3 \\* H"):
        op.gru_fwd(x["gx"][..., :-1], x["w_hh"], x["b_hh"], x["h0"], None, False, True)
