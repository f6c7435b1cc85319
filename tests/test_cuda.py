"""The CUDA kernels (csrc/cuda/): compiled here, run where a GPU is.

- every csrc/cuda/*.cu compiles with nvcc for sm_80 and sm_90 (skips only when nvcc is absent);
- bindings.cpp compiles (syntax and templates) against this torch's headers and CUDA's;
- on a CUDA device (`pytest -m gpu`), the six ops of the `fastrnn` namespace on CUDA tensors agree with
  the reference backend's ops, in both schemes (FASTRNN_CUDA_SCHEME=step|persistent); both schemes
  capture into a CUDA graph and replay; with two GPUs, a module on cuda:1 runs there while cuda:0 is
  current.

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

import gpu_checks
from parity import reset_mask
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
    """One nvcc call per file, both archs, with the flags torch's BuildExtension adds (no implicit half
    conversions among them), warnings as errors (ptxas included: register and shared-memory limits)."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    run([NVCC, "-std=c++17", "-O3", *COMMON_NVCC_FLAGS, "-Xcompiler", "-fPIC", "--Werror", "all-warnings", *GENCODE,
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
        from fastrnn.backends import native  # noqa: F401  (loads fastrnn._C, which registers the ops)
    except ImportError as e:
        pytest.fail(f"the compiled extension is not usable here: {e}")
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
    """Lengths from T down to 1 in a shuffled order, as packing produces. The order is drawn from its own
    generator: two calls with the same sizes give the same lengths (test_deterministic runs a case twice)."""
    if B == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    lengths = torch.linspace(T, 1, B).round().long().clamp(1, T)
    return lengths[torch.randperm(B, generator=torch.Generator().manual_seed(1000 * T + B))].to(device)


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


def make_resets(pattern, T, B, lengths, device):
    """The episode-reset mask [T, B] (docs/contract.md) of a named pattern: parity.reset_mask's kinds, plus
    "seq_ends", or None for "absent"."""
    if pattern == "absent":
        return None
    if pattern != "seq_ends":
        return reset_mask(pattern, T, B, seed=98).to(device)
    # Each sequence's own last active step: with a reverse op that is the step processed first forward
    # and last but the inactive ones backward, where the cut gradient must pass through as 0.
    resets = torch.zeros(T, B, dtype=torch.bool)
    ends = lengths.cpu() - 1 if lengths is not None else torch.full((B,), T - 1)
    resets[ends.clamp(min=0), torch.arange(B)] = True
    return resets.to(device)


def run_cell(op, cell, x, lengths, reverse, resets=None):
    """Forward then backward of one cell through one op table; returns {name: tensor}."""
    if cell == "lstm":
        y, h_n, c_n, gates, cs = op.lstm_fwd(x["gx"], x["w_hh"], x["h0"], x["c0"], x["w_hr"], lengths, resets, reverse,
                                             True)
        dgx, dh0, dc0, dw_hr = op.lstm_bwd(x["dy"], x["dh_n"], x["dc_n"], x["w_hh"], x["c0"], x["w_hr"], gates, cs,
                                           lengths, resets, reverse)
        return dict(y=y, h_n=h_n, c_n=c_n, gates=gates, cs=cs, dgx=dgx, dh0=dh0, dc0=dc0, dw_hr=dw_hr)
    if cell == "gru":
        y, h_n, saved = op.gru_fwd(x["gx"], x["w_hh"], x["b_hh"], x["h0"], lengths, resets, reverse, True)
        dgx, dgh, dh0 = op.gru_bwd(x["dy"], x["dh_n"], x["w_hh"], y, x["h0"], saved, lengths, resets, reverse)
        return dict(y=y, h_n=h_n, saved=saved, dgx=dgx, dgh=dgh, dh0=dh0)
    relu = cell == "rnn_relu"
    y, h_n = op.rnn_fwd(x["gx"], x["w_hh"], x["h0"], lengths, resets, reverse, relu)
    dgx, dh0 = op.rnn_bwd(x["dy"], x["dh_n"], x["w_hh"], y, lengths, resets, reverse, relu)
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


def check_against_reference(cell, shape, dtype, scheme, ops=None, device="cuda", resets="absent", lengths=None):
    """The ops under test (the CUDA ops by default) against the reference ops in fp64 on the same data;
    `resets` names a mask pattern (make_resets). With "none" (all false) the ops must also give the
    result of resets=None bit for bit. `lengths` (a list) replaces make_lengths' when given."""
    T, B, H, proj, with_lengths, reverse = shape
    gen = torch.Generator().manual_seed(1234)
    x = random_inputs(cell, T, B, H, proj, dtype, device, gen)
    if lengths is not None:
        lengths = torch.tensor(lengths, dtype=torch.int64, device=device)
    elif with_lengths:
        lengths = make_lengths(B, T, device)
    mask = make_resets(resets, T, B, lengths, device)
    ops = ops if ops is not None else cuda_ops()
    out = run_cell(ops, cell, x, lengths, reverse, mask)
    if resets == "none":
        without = run_cell(ops, cell, x, lengths, reverse, None)
        for name in without:
            assert torch.equal(out[name], without[name]), f"{name}: all-false resets differ from resets=None"
    # The oracle: the reference ops in fp64 on the same data.
    x64 = {k: (v.double() if v is not None else None) for k, v in x.items()}
    ref = run_cell(reference_ops(), cell, x64, lengths, reverse, mask)
    if cell == "rnn_relu" and dtype in (torch.float16, torch.bfloat16):
        # relu's derivative jumps at 0: where the rounded forward and the fp64 one put a pre-activation on
        # either side of 0, dgx differs there by all of dy (seen on an H200: bf16, T=9, H=300, one element).
        # So the backward is checked on the op's own forward (its y decides the derivative), in fp64; the
        # forward is checked against the fp64 forward as for every cell.
        ref["dgx"], ref["dh0"] = reference_ops().rnn_bwd(x64["dy"], x64["dh_n"], x64["w_hh"], out["y"].double(),
                                                         lengths, mask, reverse, True)
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
        cuda_ops().lstm_fwd(x["gx"], x["w_hh"], x["h0"], x["c0"], x["w_hr"], None, None, False, True)


@gpu
@needs_cuda
@pytest.mark.parametrize("resets", ["absent", "random"])
@pytest.mark.parametrize("cell", CELLS)
def test_deterministic(cell, scheme, resets):
    """Two runs give bitwise equal results (no atomics; cuBLAS is deterministic on one stream)."""
    shape = (7, 5, 37, 0, True, False)
    first = check_against_reference(cell, shape, torch.float32, scheme, resets=resets)
    second = check_against_reference(cell, shape, torch.float32, scheme, resets=resets)
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs between two identical runs"


@gpu
@needs_cuda
@pytest.mark.parametrize("B", [0, 1])
def test_empty(B, scheme):
    """B = 0 returns empty outputs without launching; save=False returns [0]-shaped saved tensors."""
    x = random_inputs("lstm", 4, B, 8, 0, torch.float32, "cuda", torch.Generator().manual_seed(0))
    y, h_n, c_n, gates, cs = cuda_ops().lstm_fwd(x["gx"], x["w_hh"], x["h0"], x["c0"], None, None, None, False, False)
    assert y.shape == (4, B, 8) and h_n.shape == (B, 8) and c_n.shape == (B, 8)
    assert gates.shape == (0,) and cs.shape == (0,)


@gpu
@needs_cuda
def test_bad_inputs_raise():
    op = cuda_ops()
    x = random_inputs("gru", 3, 2, 8, 0, torch.float32, "cuda", torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="w_hh has shape"):
        op.gru_fwd(x["gx"], x["w_hh"][:-1], x["b_hh"], x["h0"], None, None, False, True)
    with pytest.raises(RuntimeError, match="dtype"):
        op.gru_fwd(x["gx"], x["w_hh"].double(), x["b_hh"], x["h0"], None, None, False, True)
    with pytest.raises(RuntimeError, match="lengths must be int64"):
        op.gru_fwd(x["gx"], x["w_hh"], x["b_hh"], x["h0"], torch.ones(2, device="cuda"), None, False, True)
    with pytest.raises(RuntimeError, match="is on cpu"):
        op.gru_fwd(x["gx"], x["w_hh"].cpu(), x["b_hh"], x["h0"], None, None, False, True)
    with pytest.raises(RuntimeError, match="3 \\* H"):
        op.gru_fwd(x["gx"][..., :-1], x["w_hh"], x["b_hh"], x["h0"], None, None, False, True)
    resets = torch.zeros(3, 2, dtype=torch.bool, device="cuda")
    with pytest.raises(RuntimeError, match="resets must be bool"):
        op.gru_fwd(x["gx"], x["w_hh"], x["b_hh"], x["h0"], None, resets.float(), False, True)
    with pytest.raises(RuntimeError, match="resets must have shape \\[3, 2\\]"):
        op.gru_fwd(x["gx"], x["w_hh"], x["b_hh"], x["h0"], None, resets.t(), False, True)
    with pytest.raises(RuntimeError, match="resets is on cpu"):
        op.gru_fwd(x["gx"], x["w_hh"], x["b_hh"], x["h0"], None, resets.cpu(), False, True)


# Episode resets on the GPU (each pattern of make_resets, defined below with the emulated tests): the
# real kernels, cuBLAS and bindings.cpp's loop (step_bwd_finish included) against the reference ops.
# (shape, dtype, pattern): every pattern on a shape with lengths and reverse in fp64; B=1 (tile 1) with
# lengths in fp32; two batch passes (B=13) with H=300 (several units per block) reverse in fp64.
GPU_RESET_CASES = [(SHAPES[1], torch.float64, p) for p in ("first", "last", "all", "seq_ends", "random", "none")] + [
    (SHAPES[2], torch.float32, "random"), (SHAPES[3], torch.float64, "random")]


@gpu
@needs_cuda
@pytest.mark.parametrize("shape,dtype,pattern", GPU_RESET_CASES,
                         ids=[f"{shape_id(s)}-{str(d)[6:]}-{p}" for s, d, p in GPU_RESET_CASES])
@pytest.mark.parametrize("cell", CELLS)
def test_ops_with_resets_match_reference(cell, shape, dtype, pattern, scheme):
    check_against_reference(cell, shape, dtype, scheme, resets=pattern)


@gpu
@needs_cuda
@pytest.mark.parametrize("pattern", ["seq_ends", "random", "none"])
@pytest.mark.parametrize("shape", PROJ_SHAPES, ids=shape_id)
def test_lstm_projection_with_resets(shape, pattern, monkeypatch):
    monkeypatch.setenv("FASTRNN_CUDA_SCHEME", "step")
    check_against_reference("lstm", shape, torch.float64, "step", resets=pattern)


@gpu
@needs_cuda
@pytest.mark.parametrize("cell", CELLS)
def test_resets_low_precision(cell, scheme):
    check_against_reference(cell, SHAPES[1], torch.bfloat16, scheme, resets="random")


@gpu
@needs_cuda
@pytest.mark.parametrize("cell,kwargs", [("LSTM", {}), ("LSTM", {"proj_size": 3}), ("GRU", {}),
                                         ("RNN", {"nonlinearity": "relu"})], ids=["lstm", "lstm-proj", "gru", "rnn"])
def test_modules_with_resets_match_reference(cell, kwargs, scheme):
    """The modules (autograd.py over the CUDA ops: 2 layers, bidirectional, batch_first, the reverse
    direction's shifted mask) against the same modules on the reference backend, fp64, values and the
    gradients of x, h0 and every parameter."""
    import fastrnn

    if scheme == "persistent" and "proj_size" in kwargs:
        pytest.skip("the persistent kernel has no projection (test_projection_refuses_forced_persistent)")
    cuda_ops()
    torch.manual_seed(0)
    make = getattr(fastrnn, cell)
    m = make(6, 8, num_layers=2, bidirectional=True, batch_first=True, backend="cuda", **kwargs)
    ref = make(6, 8, num_layers=2, bidirectional=True, batch_first=True, backend="reference", **kwargs)
    ref.load_state_dict(m.state_dict())
    m, ref = m.to("cuda", torch.float64), ref.to("cuda", torch.float64)
    B, T = 4, 7
    x = torch.randn(B, T, 6, device="cuda", dtype=torch.float64)
    hout = kwargs.get("proj_size", 8)
    h0 = torch.randn(4, B, hout, device="cuda", dtype=torch.float64)
    hx = (h0, torch.randn(4, B, 8, device="cuda", dtype=torch.float64)) if cell == "LSTM" else h0
    resets = torch.rand(B, T, device="cuda") < 0.3
    resets[0, 0] = resets[1, T - 1] = True

    def run(module):
        xs = x.clone().requires_grad_()
        hs = tuple(h.clone().requires_grad_() for h in hx) if cell == "LSTM" else hx.clone().requires_grad_()
        out, h_n = module(xs, hs, resets=resets)
        finals = h_n if cell == "LSTM" else (h_n,)
        (out.square().sum() + sum(h.square().sum() for h in finals)).backward()
        inputs = (xs, *hs) if cell == "LSTM" else (xs, hs)
        return [t.detach() for t in [out, *finals]] + [t.grad for t in inputs] + [p.grad for p in module.parameters()]

    names = ["out", "h_n", "c_n"][:2 + (cell == "LSTM")] + ["dx", "dh0", "dc0"][:2 + (cell == "LSTM")] + [
        f"d{n}" for n, _ in m.named_parameters()]
    for name, got, want in zip(names, run(m), run(ref), strict=True):
        compare(name, want, got, **tolerance(torch.float64, T))


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graph_capture_and_replay(dtype, scheme):
    """Both schemes inside torch.cuda.graph: the persistent plan's set-up is cached per device by the
    warm-up, so the capture queries nothing and sets no attribute (issue 13)."""
    cuda_ops()
    gpu_checks.graph_replay_matches_eager("cuda", dtype)


@gpu
@gpu_checks.needs_two_gpus
def test_launches_on_the_tensors_device(scheme):
    cuda_ops()
    gpu_checks.runs_on_the_tensors_device("cuda")


# ---------------------------------------------------------------------------------------------------------
# Without a GPU: the same kernel source on CPU threads (csrc/cuda/emu/emulator.h), driven as bindings.cpp
# drives the real kernels. This checks indexing, masks, the inactive-step rules, the shared-memory carving
# and the persistent kernel's grid-sync protocol; not speed, and not the GPU memory model.

EMU_DIR = CUDA_DIR / "emu"
CELL_CODE = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def _struct(name, ints, pointers):
    import ctypes

    fields = [("cell", ctypes.c_int), ("dtype", ctypes.c_int)] if ints else []
    fields += [(n, ctypes.c_int64) for n in ("T", "B", "H", "Hout")] if ints else []
    fields += [("reverse", ctypes.c_bool)] if ints else []
    fields += [(n, ctypes.c_void_p) for n in pointers]
    return type(name, (ctypes.Structure,), {"_fields_": fields})


# ctypes mirrors of csrc/cuda/cuda_api.h (checked against sizeof by test_emulator_layout).
FwdParams = _struct("FwdParams", True, ["lengths", "resets", "gx", "w_hh", "b_hh", "h0", "c0", "y", "h_n", "c_n",
                                         "saved", "cs"])
BwdParams = _struct("BwdParams", True, ["lengths", "resets", "dy", "dh_n", "dc_n", "w_hh", "h0", "c0", "y", "saved",
                                         "cs", "dgx", "dgh", "dh0", "dc0", "m"])
StepFwdWork = _struct("StepFwdWork", False, ["gh", "h", "c", "m"])
StepBwdWork = _struct("StepBwdWork", False, ["dh", "dc", "dm"])


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    import ctypes

    cxx = (os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++").split()[0]
    if NVCC is None or shutil.which(cxx) is None:
        pytest.skip("the emulator needs CUDA's headers (found through nvcc) and a host C++ compiler")
    cuda_include = str(Path(NVCC).resolve().parents[1] / "include")
    lib = tmp_path_factory.mktemp("emu") / "emu.so"
    run([cxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-Wall", "-Wextra", "-Wno-unknown-pragmas",
         "-Werror", "-isystem", cuda_include, "-I", str(CSRC), str(EMU_DIR / "harness.cpp"), "-o", str(lib)])
    return ctypes.CDLL(str(lib))


def _nan(*shape, dtype):
    """Fresh outputs are poisoned, so that an element a kernel forgot to write fails the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype)


def _ptr(t):
    return t.data_ptr() if t is not None and t.numel() > 0 else None


class EmulatedOps:
    """The six ops over the emulated kernels, in the scheme given, mirroring bindings.cpp's run_forward and
    run_backward (the step loop with its GEMMs in torch, or one persistent launch)."""

    def __init__(self, lib, scheme, units=None, blocks=2):
        self.lib, self.scheme, self.units, self.blocks = lib, scheme, units, blocks

    def _call(self, fn, *args):
        import ctypes

        args = [ctypes.byref(a) if isinstance(a, ctypes.Structure) else a for a in args]
        args = [ctypes.c_int64(a) if isinstance(a, int) and not isinstance(a, bool) else a for a in args]
        assert fn(*args) == 0, f"{fn.__name__} refused its arguments"

    def _units(self, H):
        return self.units or max(1, -(-H // 3))  # 3 blocks, the last one partly filled when 3 does not divide H

    def _forward(self, cell, gx, w_hh, b_hh, h0, c0, w_hr, lengths, resets, reverse, y, h_n, c_n, saved, cs):
        import ctypes

        T, B, GH = gx.shape
        H, Hout = GH // GATES[cell], h0.shape[1]
        acc = torch.float64 if gx.dtype == torch.float64 else torch.float32
        p = FwdParams(CELL_CODE[cell], DTYPE_CODE[gx.dtype], T, B, H, Hout, reverse, _ptr(lengths), _ptr(resets),
                      _ptr(gx),
                      _ptr(w_hh), _ptr(b_hh), _ptr(h0), _ptr(c0), _ptr(y), _ptr(h_n), _ptr(c_n), _ptr(saved),
                      _ptr(cs))
        if self.scheme == "persistent":
            ws = _nan(2 * B * H, dtype=acc)
            self._call(self.lib.emu_persistent_fwd, p, ctypes.c_int(self._units(H)), _ptr(ws))
            return
        h, c = h0.clone(), (c0.to(acc, copy=True) if c0 is not None else None)
        gh = _nan(B, GH, dtype=gx.dtype)
        m = _nan(B, H, dtype=gx.dtype) if w_hr is not None else None
        hp = _nan(B, Hout, dtype=gx.dtype) if w_hr is not None else None
        w = StepFwdWork(_ptr(gh), _ptr(h), _ptr(c), _ptr(m))
        for s in range(T):
            t = T - 1 - s if reverse else s
            if b_hh is not None:
                torch.addmm(b_hh, h, w_hh.t(), out=gh)
            else:
                torch.mm(h, w_hh.t(), out=gh)
            self._call(self.lib.emu_step_fwd, p, w, t, ctypes.c_uint(self.blocks))
            if w_hr is not None:
                torch.mm(m, w_hr.t(), out=hp)
                self._call(self.lib.emu_proj_fwd_select, p, _ptr(hp), _ptr(h), t, ctypes.c_uint(self.blocks))
        h_n.copy_(h)
        if c_n is not None:
            c_n.copy_(c)

    def _backward(self, cell, dy, dh_n, dc_n, w_hh, h0, c0, w_hr, y, saved, cs, lengths, resets, reverse, dgx, dgh,
                  dh0, dc0, dw_hr):
        import ctypes

        T, B, Hout = dy.shape
        H = dgx.shape[2] // GATES[cell]
        acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
        m = _nan(T, B, H, dtype=dy.dtype) if w_hr is not None else None
        p = BwdParams(CELL_CODE[cell], DTYPE_CODE[dy.dtype], T, B, H, Hout, reverse, _ptr(lengths), _ptr(resets),
                      _ptr(dy),
                      _ptr(dh_n), _ptr(dc_n), _ptr(w_hh), _ptr(h0), _ptr(c0), _ptr(y), _ptr(saved), _ptr(cs),
                      _ptr(dgx), _ptr(dgh), _ptr(dh0), _ptr(dc0), _ptr(m))
        if self.scheme == "persistent":
            units = self._units(H)
            ws = _nan(2 * (-(-H // units)) * B * H, dtype=acc)
            self._call(self.lib.emu_persistent_bwd, p, ctypes.c_int(units), _ptr(ws))
            return
        dh, dc = dh_n.clone(), (dc_n.to(acc, copy=True) if dc_n is not None else None)
        dg = dgh if dgh is not None else dgx
        dht = _nan(T, B, Hout, dtype=dy.dtype) if w_hr is not None else None
        dm = _nan(B, H, dtype=dy.dtype) if w_hr is not None else None
        w = StepBwdWork(_ptr(dh), _ptr(dc), _ptr(dm))
        for s in range(T):
            t = s if reverse else T - 1 - s
            if w_hr is not None:
                self._call(self.lib.emu_proj_bwd_gather, p, _ptr(dh), _ptr(dht), t, ctypes.c_uint(self.blocks))
                torch.mm(dht[t], w_hr, out=dm)
            self._call(self.lib.emu_step_bwd, p, w, t, ctypes.c_uint(self.blocks))
            dh.addmm_(dg[t], w_hh)
        if resets is not None:
            self._call(self.lib.emu_step_bwd_finish, p, _ptr(dh), _ptr(dc), ctypes.c_uint(self.blocks))
        else:
            dh0.copy_(dh)
            if dc0 is not None:
                dc0.copy_(dc)
        if w_hr is not None:
            torch.mm(dht.reshape(T * B, Hout).t(), m.reshape(T * B, H), out=dw_hr)

    def lstm_fwd(self, gx, w_hh, h0, c0, w_hr, lengths, resets, reverse, save):
        T, B, G4 = gx.shape
        H, Hout, dt = G4 // 4, h0.shape[1], gx.dtype
        y, h_n, c_n = _nan(T, B, Hout, dtype=dt), _nan(B, Hout, dtype=dt), _nan(B, H, dtype=dt)
        gates = _nan(T, B, 4 * H, dtype=dt) if save else gx.new_empty(0)
        cs = _nan(T, B, H, dtype=dt) if save else gx.new_empty(0)
        self._forward("lstm", gx, w_hh, None, h0, c0, w_hr, lengths, resets, reverse, y, h_n, c_n, gates, cs)
        return y, h_n, c_n, gates, cs

    def lstm_bwd(self, dy, dh_n, dc_n, w_hh, c0, w_hr, gates, cs, lengths, resets, reverse):
        T, B, Hout = dy.shape
        H, dt = gates.shape[2] // 4, dy.dtype
        dgx, dh0, dc0 = _nan(T, B, 4 * H, dtype=dt), _nan(B, Hout, dtype=dt), _nan(B, H, dtype=dt)
        dw_hr = _nan(Hout, H, dtype=dt) if w_hr is not None else dy.new_empty(0)
        self._backward("lstm", dy, dh_n, dc_n, w_hh, None, c0, w_hr, None, gates, cs, lengths, resets, reverse, dgx,
                       None, dh0, dc0, dw_hr)
        return dgx, dh0, dc0, dw_hr

    def gru_fwd(self, gx, w_hh, b_hh, h0, lengths, resets, reverse, save):
        T, B, G3 = gx.shape
        H, dt = G3 // 3, gx.dtype
        y, h_n = _nan(T, B, H, dtype=dt), _nan(B, H, dtype=dt)
        saved = _nan(T, B, 4 * H, dtype=dt) if save else gx.new_empty(0)
        self._forward("gru", gx, w_hh, b_hh, h0, None, None, lengths, resets, reverse, y, h_n, None, saved, None)
        return y, h_n, saved

    def gru_bwd(self, dy, dh_n, w_hh, y, h0, saved, lengths, resets, reverse):
        T, B, H = dy.shape
        dgx, dgh, dh0 = _nan(T, B, 3 * H, dtype=dy.dtype), _nan(T, B, 3 * H, dtype=dy.dtype), _nan(B, H,
                                                                                                  dtype=dy.dtype)
        self._backward("gru", dy, dh_n, None, w_hh, h0, None, None, y, saved, None, lengths, resets, reverse, dgx, dgh,
                       dh0, None, None)
        return dgx, dgh, dh0

    def rnn_fwd(self, gx, w_hh, h0, lengths, resets, reverse, relu):
        T, B, H = gx.shape
        y, h_n = _nan(T, B, H, dtype=gx.dtype), _nan(B, H, dtype=gx.dtype)
        cell = "rnn_relu" if relu else "rnn_tanh"
        self._forward(cell, gx, w_hh, None, h0, None, None, lengths, resets, reverse, y, h_n, None, None, None)
        return y, h_n

    def rnn_bwd(self, dy, dh_n, w_hh, y, lengths, resets, reverse, relu):
        T, B, H = dy.shape
        dgx, dh0 = _nan(T, B, H, dtype=dy.dtype), _nan(B, H, dtype=dy.dtype)
        cell = "rnn_relu" if relu else "rnn_tanh"
        self._backward(cell, dy, dh_n, None, w_hh, None, None, None, y, None, None, lengths, resets, reverse, dgx, None,
                       dh0, None, None)
        return dgx, dh0


@pytest.mark.slow
def test_emulator_layout(emulator):
    import ctypes

    emulator.emu_sizeof.restype = ctypes.c_size_t
    for which, struct in enumerate((FwdParams, BwdParams, StepFwdWork, StepBwdWork)):
        assert emulator.emu_sizeof(which) == ctypes.sizeof(struct), f"ctypes mirror of {struct.__name__} is stale"


# (T, B, H, proj, lengths, reverse). H=10 in 3 blocks of 4, 4, 2 units; B=1 (tile 1), 3 (tile 4), 13 (tile 8,
# two passes); T=1. The step scheme runs on 2 blocks of 256 threads: B*H > 512 exercises the grid-stride loop.
EMU_SHAPES = [
    (5, 3, 10, 0, False, False),
    (6, 5, 10, 0, True, True),
    (4, 1, 7, 0, True, False),
    (3, 13, 10, 0, True, True),
    (1, 2, 6, 0, False, True),
    (3, 60, 11, 0, True, False),
]
EMU_PROJ_SHAPES = [(5, 4, 9, 4, True, False), (4, 3, 8, 3, True, True)]


# fp64 on every shape (an indexing error shows as a 1e8x miss there); fp32 on two, for the float paths.
EMU_DTYPE_SHAPES = [(torch.float64, s) for s in EMU_SHAPES] + [(torch.float32, EMU_SHAPES[1]),
                                                               (torch.float32, EMU_SHAPES[3])]


# The persistent kernel is planned for B <= kPersistentMaxBatch = 16 only (cuda_api.h).
EMU_CASES = [
    pytest.param(dtype, shape, scheme, id=f"{str(dtype)[6:]}-{shape_id(shape)}-{scheme}")
    for dtype, shape in EMU_DTYPE_SHAPES
    for scheme in ("step", "persistent")
    if scheme == "step" or shape[1] <= 16
]


@pytest.mark.slow
@pytest.mark.parametrize("dtype,shape,emu_scheme", EMU_CASES)
@pytest.mark.parametrize("cell", CELLS)
def test_emulated_kernels_match_reference(emulator, cell, shape, dtype, emu_scheme):
    check_against_reference(cell, shape, dtype, emu_scheme, EmulatedOps(emulator, emu_scheme), "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("shape", EMU_PROJ_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_emulated_lstm_projection(emulator, shape, dtype):
    check_against_reference("lstm", shape, dtype, "step", EmulatedOps(emulator, "step"), "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("emu_scheme", ["step", "persistent"])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_emulated_low_precision(emulator, cell, dtype, emu_scheme):
    check_against_reference(cell, EMU_SHAPES[1], dtype, emu_scheme, EmulatedOps(emulator, emu_scheme), "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("units", [1, 5])
@pytest.mark.parametrize("cell", CELLS)
def test_emulated_persistent_block_counts(emulator, cell, units):
    """One unit per block (5 blocks) and all units in one block (its own partials only)."""
    check_against_reference(cell, (3, 3, 5, 0, True, True), torch.float64, "persistent",
                            EmulatedOps(emulator, "persistent", units=units), "cpu")


# Episode resets (docs/contract.md): the emulated kernels against the reference ops in fp64, values and
# gradients, for every mask pattern of make_resets: at step 0, at the last step, everywhere, at each
# sequence's own last step, random, and all false (= None bit for bit), with lengths, reverse, several
# block layouts and batch tiles, and the projection.
RESET_PATTERNS = ("first", "last", "all", "seq_ends", "random", "none")
# (T, B, H, proj, lengths, reverse): 3 blocks of 4, 4, 2 units; batch tiles 4 (B=3, 4) and 8 (B=13, two
# passes); B=60 runs the step kernels' grid-stride loop (step scheme only, as in EMU_CASES).
EMU_RESET_SHAPES = [
    (5, 3, 10, 0, False, False),
    (6, 4, 10, 0, True, True),
    (5, 13, 10, 0, True, False),
    (4, 60, 11, 0, True, True),
]
EMU_RESET_CASES = [
    pytest.param(shape, pattern, scheme, id=f"{shape_id(shape)}-{pattern}-{scheme}")
    for shape in EMU_RESET_SHAPES
    for pattern in RESET_PATTERNS
    for scheme in ("step", "persistent")
    if scheme == "step" or shape[1] <= 16
]


@pytest.mark.slow
@pytest.mark.parametrize("shape,pattern,emu_scheme", EMU_RESET_CASES)
@pytest.mark.parametrize("cell", CELLS)
def test_emulated_resets_match_reference(emulator, cell, shape, pattern, emu_scheme):
    check_against_reference(cell, shape, torch.float64, emu_scheme, EmulatedOps(emulator, emu_scheme), "cpu",
                            resets=pattern)


@pytest.mark.slow
@pytest.mark.parametrize("pattern", RESET_PATTERNS)
@pytest.mark.parametrize("shape", EMU_PROJ_SHAPES, ids=shape_id)
def test_emulated_resets_lstm_projection(emulator, shape, pattern):
    check_against_reference("lstm", shape, torch.float64, "step", EmulatedOps(emulator, "step"), "cpu",
                            resets=pattern)


@pytest.mark.slow
@pytest.mark.parametrize("units", [1, 5])
@pytest.mark.parametrize("cell", CELLS)
def test_emulated_resets_persistent_block_counts(emulator, cell, units):
    """One unit per block (5 blocks) and all units in one block, with a random mask and lengths, reverse."""
    check_against_reference(cell, (4, 3, 5, 0, True, True), torch.float64, "persistent",
                            EmulatedOps(emulator, "persistent", units=units), "cpu", resets="random")


@pytest.mark.slow
@pytest.mark.parametrize("pattern", ["random", "none"])
@pytest.mark.parametrize("emu_scheme", ["step", "persistent"])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_emulated_resets_low_precision(emulator, cell, dtype, emu_scheme, pattern):
    """The float paths with a random mask (tolerances of `tolerance`, as without resets), and all false =
    None bit for bit where the state is rounded (step_bwd_finish's dc0 against copy_)."""
    check_against_reference(cell, EMU_RESET_SHAPES[1], dtype, emu_scheme, EmulatedOps(emulator, emu_scheme), "cpu",
                            resets=pattern)


@pytest.mark.slow
@pytest.mark.parametrize("pattern", ["all", "random"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("emu_scheme", ["step", "persistent"])
@pytest.mark.parametrize("cell", CELLS)
def test_emulated_resets_ignored_where_inactive(emulator, cell, emu_scheme, reverse, pattern):
    """Lengths 0 (never active: the mask is ignored at every step, h_n = h0, dh0 = dh_n), T and in
    between: a reset at an inactive step changes nothing (docs/contract.md)."""
    check_against_reference(cell, (5, 4, 7, 0, True, reverse), torch.float64, emu_scheme,
                            EmulatedOps(emulator, emu_scheme), "cpu", resets=pattern, lengths=[0, 5, 2, 1])
