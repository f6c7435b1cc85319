"""The compiled extension fastrnn._C: its schemas, torch.library.opcheck of every op, its CPU kernels
against the reference ops in every dtype, its input checks, and the CMake build of the same library.

The module-level import fails when fastrnn._C is not built (scripts/env.sh builds it): a missing build is an
error here, not a skip, since the parity suite would silently run without the `cpu` backend.
"""

import itertools
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import fastrnn
from fastrnn.backends import native, ops, schemas
from parity import CountOps, reset_mask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF = ops("reference")


def test_schemas_equal_the_python_ones():
    for name, schema in schemas.SCHEMAS.items():
        assert str(getattr(torch.ops.fastrnn, name).default._schema) == f"fastrnn::{name}{schema}", name


def test_registered_backend_and_auto():
    assert "cpu" in native.devices()
    import fastrnn

    assert "cpu" in fastrnn.available_backends("cpu")
    assert fastrnn.backends.resolve("auto", "cpu") == "cpu"


FALLBACK_CHECK = textwrap.dedent(
    """
    import sys, warnings
    sys.modules["fastrnn._C"] = None  # as if the extension were not built
    import torch, fastrnn
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = fastrnn.GRU(4, 5)  # a GRU: auto may hand an LSTM to torch.nn, which resolves no backend
        m(torch.randn(3, 2, 4))
        m(torch.randn(3, 2, 4))
    assert "cpu" not in fastrnn.available_backends("cpu")
    assert fastrnn.backends.resolve("auto", "cpu") == "reference"
    messages = [str(w.message) for w in caught if "fastrnn._C" in str(w.message)]
    assert len(messages) == 1, messages
    assert "pip install --no-build-isolation ." in messages[0], messages[0]
    print("fallback OK")
    """
)


def test_missing_extension_falls_back_with_one_warning():
    # FASTRNN_EXTENSION=prebuilt: no compile on first use (fastrnn/_jit.py; tests/test_install.py tests that).
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), FASTRNN_EXTENSION="prebuilt")
    run = subprocess.run([sys.executable, "-c", FALLBACK_CHECK], capture_output=True, text=True, env=env)
    assert run.returncode == 0 and "fallback OK" in run.stdout, run.stdout + run.stderr


# ----- inputs -----------------------------------------------------------------------------------------


def rand(*shape, dtype):
    # Scaled so that pre-activations stay in the sensitive range of sigmoid/tanh.
    return (torch.randn(*shape, dtype=torch.float64) * 0.5).to(dtype)


def weight(rows, cols, dtype):
    """Like torch's init (scale 1/sqrt(fan_in)). Weights of scale 0.5 at H=70 make the recurrence chaotic
    (spectral radius ~4): fp32 itself then drifts 2e-5 from fp64 in 7 steps, on the reference backend too."""
    return (torch.randn(rows, cols, dtype=torch.float64) * cols**-0.5).to(dtype)


def lengths_for(B, T, kind):
    """None, or int64 [B] with values in [0, T]: one full-length row, the rest random (0 included); "sorted":
    in decreasing order, as the modules pass a PackedSequence's rows (the step product then skips the rows
    past the last one still running: recurrence.h, active_rows)."""
    if kind is None:
        return None
    lengths = torch.randint(0, T + 1, (B,))
    if B:
        lengths[0] = T
    return lengths.sort(descending=True).values if kind == "sorted" else lengths


def lstm_args(T, B, H, proj, dtype, lengths, reverse, resets=None):
    Hout = proj or H
    fwd = (
        rand(T, B, 4 * H, dtype=dtype),
        weight(4 * H, Hout, dtype),
        rand(B, Hout, dtype=dtype),
        rand(B, H, dtype=dtype),
        weight(Hout, H, dtype) if proj else None,
        lengths,
        resets,
        reverse,
    )
    gx, w_hh, h0, c0, w_hr = fwd[:5]
    _, _, _, gates, cs = REF["lstm_fwd"](*fwd, True)
    bwd = (rand(T, B, Hout, dtype=dtype), rand(B, Hout, dtype=dtype), rand(B, H, dtype=dtype), w_hh, c0, w_hr,
           gates, cs, lengths, resets, reverse)
    return fwd, bwd


def gru_args(T, B, H, bias, dtype, lengths, reverse, resets=None):
    gx, w_hh, h0 = rand(T, B, 3 * H, dtype=dtype), weight(3 * H, H, dtype), rand(B, H, dtype=dtype)
    b_hh = rand(3 * H, dtype=dtype) if bias else None
    fwd = (gx, w_hh, b_hh, h0, lengths, resets, reverse)
    y, _, saved = REF["gru_fwd"](*fwd, True)
    bwd = (rand(T, B, H, dtype=dtype), rand(B, H, dtype=dtype), w_hh, y, h0, saved, lengths, resets, reverse)
    return fwd, bwd


def rnn_args(T, B, H, relu, dtype, lengths, reverse, resets=None):
    gx, w_hh, h0 = rand(T, B, H, dtype=dtype), weight(H, H, dtype), rand(B, H, dtype=dtype)
    fwd = (gx, w_hh, h0, lengths, resets, reverse, relu)
    y, _ = REF["rnn_fwd"](*fwd)
    bwd = (rand(T, B, H, dtype=dtype), rand(B, H, dtype=dtype), w_hh, y, lengths, resets, reverse, relu)
    return fwd, bwd


# ----- opcheck ----------------------------------------------------------------------------------------

OPCHECK = [
    pytest.param(dtype, T, B, lengths, reverse,
                 id=f"{str(dtype)[6:]}-T{T}-B{B}-{lengths or 'full'}-{'rev' if reverse else 'fwd'}")
    for dtype, (T, B), lengths, reverse in itertools.product(
        (torch.float64, torch.float32), ((3, 2), (1, 3)), (None, "var"), (False, True)
    )
]


@pytest.mark.parametrize("dtype,T,B,lengths,reverse", OPCHECK)
def test_opcheck(dtype, T, B, lengths, reverse):
    lengths = lengths_for(B, T, lengths)
    for proj in (0, 2):
        fwd, bwd = lstm_args(T, B, 3, proj, dtype, lengths, reverse)
        for save in (True, False):
            torch.library.opcheck(torch.ops.fastrnn.lstm_fwd.default, fwd + (save,))
        torch.library.opcheck(torch.ops.fastrnn.lstm_fwd.default, fwd + (True, rand(4 * 3, dtype=dtype)))
        torch.library.opcheck(torch.ops.fastrnn.lstm_bwd.default, bwd)
    for bias in (True, False):
        fwd, bwd = gru_args(T, B, 3, bias, dtype, lengths, reverse)
        for save in (True, False):
            torch.library.opcheck(torch.ops.fastrnn.gru_fwd.default, fwd + (save,))
        torch.library.opcheck(torch.ops.fastrnn.gru_fwd.default, fwd + (False, rand(3 * 3, dtype=dtype)))
        torch.library.opcheck(torch.ops.fastrnn.gru_bwd.default, bwd)
    for relu in (False, True):
        fwd, bwd = rnn_args(T, B, 3, relu, dtype, lengths, reverse)
        torch.library.opcheck(torch.ops.fastrnn.rnn_fwd.default, fwd)
        torch.library.opcheck(torch.ops.fastrnn.rnn_fwd.default, fwd + (rand(3, dtype=dtype),))
        torch.library.opcheck(torch.ops.fastrnn.rnn_bwd.default, bwd)


@pytest.mark.parametrize("dtype,lengths,reverse", [
    pytest.param(torch.float64, "var", True, id="fp64-var-rev"),
    pytest.param(torch.float32, None, False, id="fp32-full-fwd"),
])
def test_opcheck_with_resets(dtype, lengths, reverse):
    T, B = 3, 3
    lengths, resets = lengths_for(B, T, lengths), reset_mask("random", T, B)
    resets[1, 1] = True  # at least one reset
    fwd, bwd = lstm_args(T, B, 3, 2, dtype, lengths, reverse, resets)
    torch.library.opcheck(torch.ops.fastrnn.lstm_fwd.default, fwd + (True,))
    torch.library.opcheck(torch.ops.fastrnn.lstm_bwd.default, bwd)
    fwd, bwd = gru_args(T, B, 3, True, dtype, lengths, reverse, resets)
    torch.library.opcheck(torch.ops.fastrnn.gru_fwd.default, fwd + (True,))
    torch.library.opcheck(torch.ops.fastrnn.gru_bwd.default, bwd)
    fwd, bwd = rnn_args(T, B, 3, False, dtype, lengths, reverse, resets)
    torch.library.opcheck(torch.ops.fastrnn.rnn_fwd.default, fwd)
    torch.library.opcheck(torch.ops.fastrnn.rnn_bwd.default, bwd)


# ----- the kernels against the reference ops ----------------------------------------------------------

# fp64: summation order only. fp32: ~1e-6 seen at T=9, H=70. fp16/bf16: both sides round the same fp32
# results to storage, so they differ by an ulp of the storage type where a rounding boundary falls between
# two fp32 values (bf16: 2^-8 = 3.9e-3 relative, fp16: 2^-11 = 4.9e-4), and such one-ulp differences in the
# saved gates feed the later steps. The bounds are relative to the largest magnitude of each output.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def assert_close(name, out, ref, tol):
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{name}: dtype {out.dtype} != {ref.dtype}"
    if ref.numel() == 0:
        return
    assert not out.isnan().any(), f"{name}: NaN"
    err = (out.double() - ref.double()).abs()
    scale = max(1.0, ref.double().abs().max().item())
    worst = err.argmax().item()
    assert err.max().item() <= tol * scale, (
        f"{name}: max error {err.max().item():.3g} > {tol:.1g} x {scale:.3g} at flat index {worst} "
        f"(got {out.flatten()[worst].item():.6g}, reference {ref.flatten()[worst].item():.6g})"
    )


def compare(op, args, names, tol):
    out, ref = getattr(torch.ops.fastrnn, op)(*args), REF[op](*args)
    for name, o, r in zip(names, out, ref):
        assert_close(f"{op} {name}", o, r, tol)


KERNEL_CASES = [
    pytest.param(dtype, T, B, H, lengths, reverse,
                 id=f"{str(dtype)[6:]}-T{T}-B{B}-H{H}-{lengths or 'full'}-{'rev' if reverse else 'fwd'}")
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    for (T, B, H), lengths, reverse in itertools.product(
        ((1, 1, 13), (9, 5, 70), (4, 0, 8), (6, 3, 8)), (None, "var", "sorted"), (False, True)
    )
]


@pytest.mark.parametrize("dtype,T,B,H,lengths,reverse", KERNEL_CASES)
def test_kernels_match_reference(dtype, T, B, H, lengths, reverse):
    check_kernels(dtype, T, B, H, lengths, reverse)


@pytest.mark.parametrize("path", ["aten", "packed", "in_place"])
@pytest.mark.parametrize("dtype,T,B,H,lengths,reverse", [
    pytest.param(torch.float32, 6, 5, 70, "var", True, id="fp32-T6-B5-H70-var-rev"),
    pytest.param(torch.float64, 5, 9, 33, "var", False, id="fp64-T5-B9-H33-var-fwd"),
    pytest.param(torch.bfloat16, 4, 6, 40, None, True, id="bf16-T4-B6-H40-full-rev"),
    # Past the packed product's 64-row chunk and 256-deep K slice (recurrence.h, by_blocks).
    pytest.param(torch.float32, 3, 67, 260, "var", False, id="fp32-T3-B67-H260-var-fwd"),
    pytest.param(torch.float64, 2, 65, 257, None, True, id="fp64-T2-B65-H257-full-rev"),
    # Rows sorted by decreasing length: the product of a step skips the finished rows, here within a register
    # tile, across the 64-row chunks, and in bf16 (AMX from 8 rows where the CPU has it).
    pytest.param(torch.float32, 9, 70, 40, "sorted", False, id="fp32-T9-B70-H40-sorted-fwd"),
    pytest.param(torch.float64, 8, 67, 33, "sorted", True, id="fp64-T8-B67-H33-sorted-rev"),
    pytest.param(torch.bfloat16, 7, 20, 32, "sorted", False, id="bf16-T7-B20-H32-sorted-fwd"),
    # H a multiple of every panel width: the backward's strided path when forced (several tiles and chunks).
    pytest.param(torch.float32, 5, 70, 64, "sorted", True, id="fp32-T5-B70-H64-sorted-rev"),
    pytest.param(torch.float64, 4, 9, 32, "var", False, id="fp64-T4-B9-H32-var-fwd"),
])
def test_both_gemm_paths(path, dtype, T, B, H, lengths, reverse, monkeypatch):
    """The step product forced through the library GEMM (+ a separate gate pass), the packed, fused path and
    W_hh where it lies (the forward's dot path; the backward's strided path where H is a multiple of the panel
    width: H = 64 and 32 here, else packed) (csrc/cpu/recurrence.h, HiddenGemm): at these sizes `auto` would
    always pick packed."""
    monkeypatch.setenv("FASTRNN_CPU_GEMM", path)
    check_kernels(dtype, T, B, H, lengths, reverse)


def test_kernels_with_an_odd_thread_count():
    """Short steps run in one parallel region that splits the unit blocks by the team's size
    (recurrence.h, run_steps): 3 threads, more than this machine has cores, give uneven shares."""
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        check_kernels(torch.float64, 9, 5, 70, "var", True)
        check_kernels(torch.float32, 6, 1, 40, None, False)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [2, 3])
def test_rows_split_among_the_threads(threads, monkeypatch):
    """A recurrence's rows (the batch) split among the threads, each taking every column block of its rows,
    instead of the column blocks (recurrence.h, HiddenGemm::row_split_threads): from kMinSplitRows (4) rows a
    thread with a W_hh of at most kMaxSplitBytes (1 MB), else by columns; FASTRNN_CPU_SPLIT=rows forces it from
    one row a thread, =columns never. The counter shows the rule's limits; both ways every op matches the
    reference ops (lengths sorted: the rows still running are shared among the threads, the finished ones
    after them; resets; 3 threads: uneven shares; bf16). (Not bit for bit: a register tile of 1-2 rows sums
    odd and even k apart, gemm.h panel_tile, and the two ways cut the rows into tiles differently.)"""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    split = torch.ops.fastrnn_cpu.row_split_recurrences
    try:
        def splits(B, H):
            fwd, _ = rnn_args(3, B, H, False, torch.float32, None, False)
            before = split()
            torch.ops.fastrnn.rnn_fwd(*fwd)
            return split() - before

        # Two threads' 4 rows at least (as many threads as have 4 rows each), at most 1 MB of W_hh.
        assert splits(8, 40) == 1
        assert splits(7, 40) == 0
        assert splits(4 * threads, 512) == 1  # W_hh 512 x 512 fp32: 1 MB
        assert splits(4 * threads, 513) == 0
        monkeypatch.setenv("FASTRNN_CPU_SPLIT", "columns")
        assert splits(4 * threads, 40) == 0
        monkeypatch.setenv("FASTRNN_CPU_SPLIT", "rows")
        assert splits(2, 513) == 1

        for mode in ("rows", "columns"):
            monkeypatch.setenv("FASTRNN_CPU_SPLIT", mode)
            check_kernels(torch.float32, 7, 9, 70, "sorted", True, "random")
            check_kernels(torch.float64, 5, 8, 33, "var", False)
            check_kernels(torch.bfloat16, 4, 10, 40, None, True)
    finally:
        torch.set_num_threads(previous)


def test_gemm_path_switch_is_checked(monkeypatch):
    monkeypatch.setenv("FASTRNN_CPU_GEMM", "mkl")
    fwd, _ = rnn_args(2, 2, 4, False, torch.float32, None, False)
    with pytest.raises(RuntimeError, match="FASTRNN_CPU_GEMM must be auto, aten, packed or in_place, got 'mkl'"):
        torch.ops.fastrnn.rnn_fwd(*fwd)


def check_kernels(dtype, T, B, H, lengths, reverse, resets=None):
    """Every op of every cell against the reference ops; lengths and resets: kinds of lengths_for and
    parity.reset_mask."""
    tol = TOL[dtype]
    lengths, resets = lengths_for(B, T, lengths), reset_mask(resets, T, B)
    for proj in (0, 5):
        fwd, bwd = lstm_args(T, B, H, proj, dtype, lengths, reverse, resets)
        for save in (True, False):
            compare("lstm_fwd", fwd + (save,), ("y", "h_n", "c_n", "gates", "cs"), tol)
        compare("lstm_bwd", bwd, ("dgx", "dh0", "dc0", "dw_hr"), tol)
    for bias in (True, False):
        fwd, bwd = gru_args(T, B, H, bias, dtype, lengths, reverse, resets)
        for save in (True, False):
            compare("gru_fwd", fwd + (save,), ("y", "h_n", "saved"), tol)
        compare("gru_bwd", bwd, ("dgx", "dgh", "dh0"), tol)
    for relu in (False, True):
        fwd, bwd = rnn_args(T, B, H, relu, dtype, lengths, reverse, resets)
        compare("rnn_fwd", fwd, ("y", "h_n"), tol)
        compare("rnn_bwd", bwd, ("dgx", "dh0"), tol)


# ----- episode resets (docs/contract.md: step t starts from a zero state, no gradient across it) -------

RESET_CASES = [
    pytest.param(torch.float64, 7, 5, 70, lengths, reverse, resets,
                 id=f"fp64-T7-B5-H70-{lengths or 'full'}-{'rev' if reverse else 'fwd'}-{resets}")
    for resets in ("first", "last", "all", "none", "random")
    for lengths, reverse in ((None, False), ("var", True))
] + [
    pytest.param(dtype, 6, 3, 8, "var", reverse, "random",
                 id=f"{str(dtype)[6:]}-T6-B3-H8-var-{'rev' if reverse else 'fwd'}-random")
    for dtype in (torch.float32, torch.bfloat16, torch.float16)
    for reverse in (False, True)
] + [
    pytest.param(torch.float64, 4, 0, 8, "var", False, "random", id="fp64-T4-B0-H8-var-fwd-random"),
    pytest.param(torch.float64, 1, 3, 13, None, True, "all", id="fp64-T1-B3-H13-full-rev-all"),
]


@pytest.mark.parametrize("dtype,T,B,H,lengths,reverse,resets", RESET_CASES)
def test_kernels_with_resets(dtype, T, B, H, lengths, reverse, resets):
    check_kernels(dtype, T, B, H, lengths, reverse, resets)


@pytest.mark.parametrize("path", ["aten", "packed", "in_place"])
@pytest.mark.parametrize("dtype,T,B,H,lengths,reverse", [
    pytest.param(torch.float32, 3, 67, 260, "var", False, id="fp32-T3-B67-H260-var-fwd"),
    pytest.param(torch.float64, 5, 9, 33, "var", True, id="fp64-T5-B9-H33-var-rev"),
])
def test_resets_on_both_gemm_paths(path, dtype, T, B, H, lengths, reverse, monkeypatch):
    """Every step product (and, at B=67, H=260, a parallel region per step; at B=9, one region for all)."""
    monkeypatch.setenv("FASTRNN_CPU_GEMM", path)
    check_kernels(dtype, T, B, H, lengths, reverse, "random")


def test_resets_with_an_odd_thread_count():
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        check_kernels(torch.float64, 9, 5, 70, "var", True, "random")
    finally:
        torch.set_num_threads(previous)


def test_resets_all_false_is_none_bit_for_bit():
    """A mask without a reset takes exactly the path of resets=None (torch.equal, every output)."""
    T, B = 5, 4
    lengths, none = lengths_for(B, T, "var"), torch.zeros(T, B, dtype=torch.bool)
    for H, reverse in ((70, False), (260, True)):  # one parallel region for all steps / one a step
        for proj in (0, 5):
            fwd, bwd = lstm_args(T, B, H, proj, torch.float32, lengths, reverse)
            with_mask = lambda args: args[:6] + (none,) + args[7:]
            assert_equal_outputs("lstm_fwd", fwd + (True,), with_mask(fwd) + (True,))
            assert_equal_outputs("lstm_bwd", bwd, bwd[:9] + (none,) + bwd[10:])
        fwd, bwd = gru_args(T, B, H, True, torch.float32, lengths, reverse)
        assert_equal_outputs("gru_fwd", fwd + (True,), fwd[:5] + (none,) + fwd[6:] + (True,))
        assert_equal_outputs("gru_bwd", bwd, bwd[:7] + (none,) + bwd[8:])
        fwd, bwd = rnn_args(T, B, H, False, torch.float32, lengths, reverse)
        assert_equal_outputs("rnn_fwd", fwd, fwd[:4] + (none,) + fwd[5:])
        assert_equal_outputs("rnn_bwd", bwd, bwd[:5] + (none,) + bwd[6:])


def assert_equal_outputs(op, args, args_with_mask):
    for i, (a, b) in enumerate(zip(getattr(torch.ops.fastrnn, op)(*args), getattr(torch.ops.fastrnn, op)(*args_with_mask))):
        assert torch.equal(a, b), f"{op} output {i}"


def test_saturation_is_finite():
    """Pre-activations of +-1e4 saturate every gate to 0/1 and tanh to +-1: no inf/inf, no NaN."""
    T, B, H = 3, 2, 16
    gx = torch.full((T, B, 4 * H), 1e4)
    gx[:, 1] = -1e4
    y, h_n, c_n, gates, cs = torch.ops.fastrnn.lstm_fwd(gx, torch.zeros(4 * H, H), torch.zeros(B, H),
                                                        torch.zeros(B, H), None, None, None, False, True)
    assert torch.isfinite(y).all() and torch.isfinite(gates).all()
    assert set(gates.unique().tolist()) <= {0.0, 1.0, -1.0}
    y, _ = torch.ops.fastrnn.rnn_fwd(gx[..., :H].contiguous(), torch.zeros(H, H), torch.zeros(B, H), None, None, False, False)
    assert y[:, 0].eq(1).all() and y[:, 1].eq(-1).all()


def activation_sweep():
    """fp32 points over the whole range: dense in [-20, 20], then magnitudes 1e-30..1e4 of both signs, and
    saturating and infinite values."""
    mags = torch.logspace(-30, 4, 20001, dtype=torch.float64)
    x = torch.cat([torch.linspace(-20, 20, 400001, dtype=torch.float64), mags, -mags,
                   torch.tensor([0.0, 88.0, -88.0, 1e30, -1e30, float("inf"), float("-inf")], dtype=torch.float64)])
    return x.float()


def max_ulps(out, x64_result):
    """Worst error in fp32 ulps of the exact result (ignoring denormal results, whose ulp is fixed)."""
    ref = x64_result
    normal = ref.abs() >= torch.finfo(torch.float32).tiny
    ulp = torch.finfo(torch.float32).eps * ref.abs()
    return ((out.double() - ref).abs()[normal] / ulp[normal]).max().item()


def test_tanh_and_sigmoid_accuracy():
    """The vectorised fp32 tanh and sigmoid (on the inline exp of csrc/cpu/vec_math.h), seen through the ops
    with zero weights and state: rnn_fwd's y = tanh(gx), lstm_fwd's saved input gate = sigmoid(gx_i). The points are
    laid out as [1, B, H] with H = 37 (4 vectors and a 5-element scalar tail), so both paths see every
    region. Bound: 4 ulps (measured: 1.5 for tanh, 1.6 for sigmoid; torch.tanh, Sleef, is at 0.5)."""
    x = activation_sweep()
    H = 37
    B = -(-x.numel() // H)
    x = torch.cat([x, x.new_zeros(B * H - x.numel())]).view(1, B, H)
    zeros = torch.zeros(B, H)
    y, _ = torch.ops.fastrnn.rnn_fwd(x, torch.zeros(H, H), zeros, None, None, False, False)
    assert not y.isnan().any()
    assert max_ulps(y, torch.tanh(x.double())) <= 4
    gx = torch.cat([x, x.new_zeros(1, B, 3 * H)], dim=2)
    gates = torch.ops.fastrnn.lstm_fwd(gx, torch.zeros(4 * H, H), zeros, zeros, None, None, None, False, True)[3]
    assert not gates.isnan().any()
    assert max_ulps(gates[..., :H], torch.sigmoid(x.double())) <= 4


def test_outputs_are_fresh():
    """No output aliases an input, even when the math type equals the storage type (fp32: no conversion)."""
    fwd, bwd = rnn_args(2, 3, 4, False, torch.float32, None, False)
    y, h_n = torch.ops.fastrnn.rnn_fwd(*fwd)
    assert h_n.data_ptr() != fwd[2].data_ptr()
    dgx, dh0 = torch.ops.fastrnn.rnn_bwd(*bwd)
    assert dh0.data_ptr() != bwd[1].data_ptr()



# ----- the packed W_hh kept across calls (csrc/cpu/panel_cache.h) ------------------------------------

CACHE_CELLS = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}
# fp32 against torch.nn (I=6, H=20, T=4, B=2, the weights these tests set, up to 1.0 off the initialisation):
# summation order alone differs by up to 7.2e-6 in y on the default capability and 3.9e-6 on avx2/avx512
# (Intel Xeon, commit bc8d053), while panels left stale by a change of one weight element of 1.0 move y by
# 1e-3 to 0.8 (3 cells x 5 seeds): the bound (<= 1.2e-4 at |y| <= 1) sits ~3x above the first, 8x below the
# second.
CACHE_TOLERANCE = dict(atol=2e-5, rtol=1e-4)


def cache_twins(cell, I=6, H=20, seed=0):
    """A torch.nn layer and a fastrnn twin (backend="cpu") holding equal weights of their own."""
    import fastrnn

    torch.manual_seed(seed)
    ref = CACHE_CELLS[cell](I, H)
    fast = getattr(fastrnn, cell.upper())(I, H, backend="cpu")
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def assert_same_layer(ref, fast, x):
    with torch.no_grad():
        y_ref, y_fast = ref(x)[0], fast(x)[0]
    torch.testing.assert_close(y_fast, y_ref, **CACHE_TOLERANCE)


def cache_hits():
    return torch.ops.fastrnn_cpu.panel_cache_hits()


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_panel_cache_is_used_and_follows_every_kind_of_weight_change(cell, monkeypatch):
    """Repeated inference reuses W_hh's packed panels (the hit counter grows), and every way of changing the
    weights between calls is seen: an in-place optimizer step (bumps the version counter), a write through
    `.data` (keeps it: the RL soft target update), load_state_dict, and a tensor at a new address. The input
    projection stays off the packed panels here (packed_projection), so the counter counts W_hh's alone
    (test_packed_projection_rule changes W_ih)."""
    from fastrnn import autograd

    monkeypatch.delenv("FASTRNN_CPU_WEIGHT_CACHE", raising=False)
    monkeypatch.setattr(autograd, "packed_projection", lambda *args: False)
    ref, fast = cache_twins(cell)
    x = torch.randn(5, 3, 6)
    before = cache_hits()
    for _ in range(4):
        assert_same_layer(ref, fast, x)
    assert cache_hits() >= before + 2, "the cache is never hit on repeated calls with the same weights"

    # An optimizer step (in place, version counter bumped), the same step on the twin.
    for module in (ref, fast):
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        module(x)[0].square().sum().backward()
        optimizer.step()
    for _ in range(3):
        assert_same_layer(ref, fast, x)

    # `.data` writes keep the version counter: only the content check sees them.
    for _ in range(3):
        assert_same_layer(ref, fast, x)
    new = torch.randn_like(ref.weight_hh_l0)
    ref.weight_hh_l0.data.copy_(new)
    fast.weight_hh_l0.data.copy_(new)
    hits = cache_hits()
    assert_same_layer(ref, fast, x)
    assert cache_hits() == hits, "panels of the old weights were reused after a .data write"
    fast.weight_hh_l0.data[0, 0] += 1.0  # one element of one row
    ref.weight_hh_l0.data[0, 0] += 1.0
    assert_same_layer(ref, fast, x)

    # load_state_dict from another initialisation.
    other, _ = cache_twins(cell, seed=1)
    ref.load_state_dict(other.state_dict())
    fast.load_state_dict(other.state_dict())
    for _ in range(3):
        assert_same_layer(ref, fast, x)

    # A new tensor (new address) assigned to the parameter.
    fast.weight_hh_l0 = torch.nn.Parameter(other.weight_hh_l0.detach() * 0.5)
    ref.weight_hh_l0 = torch.nn.Parameter(other.weight_hh_l0.detach() * 0.5)
    for _ in range(3):
        assert_same_layer(ref, fast, x)


def test_panel_cache_sees_a_change_anywhere_in_a_large_weight(monkeypatch):
    """From 256 KB the cache compares a weight with its copy on every thread, a 64 KB chunk at a time
    (panel_cache.h, bytes_equal): a `.data` write of one element in the first chunk, the middle or the last
    (another thread's share) is seen. Against the same layer with the cache off (packed afresh: the same bits)."""
    from fastrnn import autograd

    monkeypatch.delenv("FASTRNN_CPU_WEIGHT_CACHE", raising=False)
    monkeypatch.setattr(autograd, "packed_projection", lambda *args: False)  # the counter counts W_hh's alone
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the split needs two threads (a 1-core machine oversubscribes; correct either way)
    try:
        torch.manual_seed(0)
        fast = fastrnn.GRU(16, 200, backend="cpu")  # W_hh [600, 200]: 480 KB
        w = fast.weight_hh_l0.data.view(-1)
        x = torch.randn(8, 2, 16)

        def uncached():  # packed afresh (with the cache off, auto would take the dot path: HiddenGemm::dot_wins)
            monkeypatch.setenv("FASTRNN_CPU_WEIGHT_CACHE", "0")
            monkeypatch.setenv("FASTRNN_CPU_GEMM", "packed")
            y = fast(x)[0]
            monkeypatch.delenv("FASTRNN_CPU_WEIGHT_CACHE")
            monkeypatch.delenv("FASTRNN_CPU_GEMM")
            return y

        with torch.no_grad():
            for position in (0, w.numel() // 2, w.numel() - 1):
                for _ in range(3):  # the second call keeps a copy, the third reuses the panels
                    fast(x)
                hits = cache_hits()
                assert torch.equal(fast(x)[0], uncached()) and cache_hits() == hits + 1
                w[position] += 1.0
                y = fast(x)[0]
                assert cache_hits() == hits + 1, f"stale panels reused after a change at element {position}"
                assert torch.equal(y, uncached()), position
    finally:
        torch.set_num_threads(threads)


def test_panel_cache_is_not_shared_between_modules(monkeypatch):
    """Two layers of the same shape, called in turn (inference and training), each with its own weights; and
    two layers sharing one weight tensor."""
    monkeypatch.delenv("FASTRNN_CPU_WEIGHT_CACHE", raising=False)
    x = torch.randn(4, 2, 6)
    pairs = [cache_twins("lstm", seed=s) for s in (0, 1)]
    for _ in range(4):
        for ref, fast in pairs:
            assert_same_layer(ref, fast, x)
    for ref, fast in pairs:  # gradients too (the backward packs W_hh in another layout)
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        ref(xr)[0].sum().backward()
        fast(xf)[0].sum().backward()
        torch.testing.assert_close(xf.grad, xr.grad, **CACHE_TOLERANCE)
        torch.testing.assert_close(fast.weight_hh_l0.grad, ref.weight_hh_l0.grad,
                                   **CACHE_TOLERANCE)
    (ref_a, fast_a), (ref_b, fast_b) = pairs
    fast_b.weight_hh_l0 = fast_a.weight_hh_l0  # one Parameter in two modules
    ref_b.weight_hh_l0 = ref_a.weight_hh_l0
    for _ in range(3):
        assert_same_layer(ref_a, fast_a, x)
        assert_same_layer(ref_b, fast_b, x)


# The hidden size of a W_hh just over the panel cache's 1 MB (csrc/cpu/panel_cache.h, kMaxBytes) per cell.
UNCACHED_H = {"lstm": 260, "gru": 300, "rnn": 520}


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_uncached_weights_are_multiplied_where_they_lie(capability, cell, monkeypatch):
    """A W_hh the panel cache does not keep (over 1 MB, or the cache off) is read where it lies instead of packed
    (recurrence.h, HiddenGemm). The forward: on the dot path up to kMaxDotRowSteps = 256 rows x steps (64 for
    bf16 weights the copy packs as bf16 pairs) and 64 rows, else through the library GEMM for fewer than 8
    steps (kMinStepsToPack), else packed. The backward: on the strided path up to kMaxStridedSteps = 3 steps and
    one register tile of rows where H is a multiple of the panel width, else packed. A kept weight is packed.
    The counters of in-place and library products tell the paths apart (both sides of each limit); every result
    against the reference ops."""
    monkeypatch.delenv("FASTRNN_CPU_GEMM", raising=False)
    counters = (torch.ops.fastrnn_cpu.in_place_products, torch.ops.fastrnn_cpu.library_products)
    make = {"lstm": lstm_args, "gru": gru_args, "rnn": rnn_args}[cell]
    option = {"lstm": 0, "gru": True, "rnn": False}[cell]  # no projection, b_hh, tanh
    names = {"lstm": (("y", "h_n", "c_n", "gates", "cs"), ("dgx", "dh0", "dc0", "dw_hr")),
             "gru": (("y", "h_n", "saved"), ("dgx", "dh0", "dw_hh", "db_hh")),
             "rnn": (("y", "h_n"), ("dgx", "dh0"))}[cell]
    tile = 8 if native.cpu_capability() == "avx512" else 4  # fp32 rows of a register tile (gemm.h, tile_rows)
    # (dtype, FASTRNN_CPU_WEIGHT_CACHE, T, B, H, the forward's path, the backward's). B <= 3 rows keep A in L1,
    # where every capability packs on its own (recurrence.h, packed_wins). H = 20 and UNCACHED_H are not
    # multiples of the panel width (16 or 32 floats): the backward packs; H = 32 is.
    f32, bf16 = torch.float32, torch.bfloat16
    cases = [(f32, "0", 7, 3, 20, "in_place", "packed"), (f32, "0", 1, 3, 20, "in_place", "packed"),
             (f32, "0", 85, 3, 20, "in_place", "packed"), (f32, "0", 86, 3, 20, "packed", "packed"),
             (f32, "0", 4, 64, 20, "in_place", "packed"), (f32, "0", 5, 64, 20, "library", "packed"),
             (f32, "0", 1, 65, 20, "library", "packed"), (f32, "0", 8, 65, 20, "packed", "packed"),
             (f32, "1", 1, 3, 20, "packed", "packed"), (f32, "1", 1, 3, UNCACHED_H[cell], "in_place", "packed"),
             (f32, "1", 86, 3, UNCACHED_H[cell], "packed", "packed"),
             (f32, "0", 3, 3, 32, "in_place", "in_place"), (f32, "0", 4, 3, 32, "in_place", "packed"),
             (f32, "0", 3, tile, 32, "in_place", "in_place"), (f32, "0", 3, tile + 1, 32, "in_place", "packed"),
             (f32, "1", 3, 3, 32, "packed", "packed")]
    # bf16 weights that this copy would pack as bf16 pairs: the dot path up to 64 rows x steps
    # (kMaxDotRowStepsBf16), never the strided path.
    pairs = torch.ops.fastrnn_cpu.bf16_dot_products() >= 0
    cases += [(bf16, "0", 21, 3, 20, "in_place", "packed"),
              (bf16, "0", 22, 3, 20, "packed" if pairs else "in_place", "packed"),
              (bf16, "0", 2, 3, 32, "in_place", "packed" if pairs else "in_place")]
    for dtype, cache, T, B, H, forward, backward in cases:
        monkeypatch.setenv("FASTRNN_CPU_WEIGHT_CACHE", cache)
        fwd, bwd = make(T, B, H, option, dtype, None, False)
        tol = TOL[dtype]
        for path, op, args, outputs in ((forward, "fwd", fwd if cell == "rnn" else fwd + (True,), names[0]),
                                        (backward, "bwd", bwd, names[1])):
            for _ in range(3 if op == "fwd" else 1):  # a kept weight is reused from its third call
                before = [count() for count in counters]
                compare(f"{cell}_{op}", args, outputs, tol)
                taken = [count() - b for count, b in zip(counters, before)]
                assert taken == [int(path == "in_place"), int(path == "library")], (op, dtype, cache, T, B, H, path)


def test_panel_cache_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("FASTRNN_CPU_WEIGHT_CACHE", "0")
    ref, fast = cache_twins("gru")
    x = torch.randn(3, 2, 6)
    before = cache_hits()
    for _ in range(4):
        assert_same_layer(ref, fast, x)
    assert cache_hits() == before

# ----- the ISA capabilities (csrc/cpu/kernels.h, dispatch.cpp) ---------------------------------------

BUILT = native.built_cpu_capabilities()


def test_the_best_capability_runs():
    """At load the kernels of the best capability this CPU runs (of those built) are active, unless a
    variable lowers it (then this test's process would show it: the suite runs without one)."""
    assert native.supported_cpu_capabilities()[0] == "default"
    assert BUILT and BUILT[0] == "default" and set(BUILT) <= set(native.supported_cpu_capabilities())
    if not (os.environ.get("FASTRNN_CPU_CAPABILITY") or os.environ.get("ATEN_CPU_CAPABILITY")):
        assert native.cpu_capability() == BUILT[-1]


def test_every_supported_capability_is_built():
    """A build on x86-64 has every capability (fastrnn/_build.py): this machine can run the
    ones listed, so each must load here, or its path would go untested."""
    if os.environ.get("FASTRNN_CPU_CAPABILITIES"):
        pytest.skip("built with a chosen subset of capabilities (FASTRNN_CPU_CAPABILITIES)")
    assert BUILT == native.supported_cpu_capabilities()


@pytest.fixture(params=BUILT)
def capability(request):
    """Runs the test with the kernels of one capability active, then restores the one active before."""
    previous = native.cpu_capability()
    assert native.set_cpu_capability(request.param) == request.param
    try:
        assert native.cpu_capability() == request.param
        vector = torch.ops.fastrnn_cpu.vector_floats()
        assert vector == (16 if request.param == "avx512" else 8), vector
        yield request.param
    finally:
        native.set_cpu_capability(previous)


# Odd sizes against each capability's vector (8 or 16 floats) and panel (2 vectors) widths, the 64-row chunk
# and the K slice (recurrence.h), both GEMM paths.
@pytest.mark.parametrize("path", ["auto", "aten", "packed", "in_place"])
@pytest.mark.parametrize("dtype,T,B,H,lengths,reverse", [
    pytest.param(torch.float32, 9, 5, 70, "var", True, id="fp32-T9-B5-H70-var-rev"),
    pytest.param(torch.float64, 5, 9, 33, "var", False, id="fp64-T5-B9-H33-var-fwd"),
    pytest.param(torch.bfloat16, 4, 6, 40, None, True, id="bf16-T4-B6-H40-full-rev"),
    pytest.param(torch.float16, 3, 2, 17, None, False, id="fp16-T3-B2-H17-full-fwd"),
    pytest.param(torch.float32, 3, 67, 260, "var", False, id="fp32-T3-B67-H260-var-fwd"),
    # bf16 at B >= 8: the step products on AMX where the CPU has it (a 64-row chunk and a 3-row one).
    pytest.param(torch.bfloat16, 3, 67, 260, "var", True, id="bf16-T3-B67-H260-var-rev"),
    # Rows sorted by decreasing length: each step's product skips the finished rows (recurrence.h, active_rows).
    pytest.param(torch.float32, 9, 70, 40, "sorted", True, id="fp32-T9-B70-H40-sorted-rev"),
    pytest.param(torch.float64, 7, 13, 33, "sorted", False, id="fp64-T7-B13-H33-sorted-fwd"),
])
def test_kernels_of_every_capability(capability, path, dtype, T, B, H, lengths, reverse, monkeypatch):
    monkeypatch.setenv("FASTRNN_CPU_GEMM", path)
    check_kernels(dtype, T, B, H, lengths, reverse)


# Every step product of each capability (auto picks one of them); B=67, H=260: a parallel region a step.
@pytest.mark.parametrize("path", ["aten", "packed", "in_place"])
@pytest.mark.parametrize("dtype,T,B,H,lengths,reverse,resets", [
    pytest.param(torch.float32, 9, 5, 70, "var", True, "random", id="fp32-T9-B5-H70-var-rev-random"),
    pytest.param(torch.bfloat16, 4, 6, 40, "var", False, "random", id="bf16-T4-B6-H40-var-fwd-random"),
    pytest.param(torch.float32, 2, 67, 260, "var", True, "random", id="fp32-T2-B67-H260-var-rev-random"),
])
def test_resets_of_every_capability(capability, path, dtype, T, B, H, lengths, reverse, resets, monkeypatch):
    monkeypatch.setenv("FASTRNN_CPU_GEMM", path)
    check_kernels(dtype, T, B, H, lengths, reverse, resets)


def test_large_outputs_are_streamed(capability, monkeypatch):
    """The outputs no op reads back (the forward's saved gates, with them the LSTM's and GRU's y, the backward's
    dgx and dgh) are written with streaming stores in the AVX2 and AVX-512 copies from kStreamMinBytes (32 MB)
    of fp32, and in inference the LSTM's and GRU's y from kStreamMinBytesInference (2 MB; recurrence.h,
    streamed); FASTRNN_CPU_STREAM=always|never forces it, anything else is an error.
    The counter shows the rule; forced on, every op gives the same results bit for bit as forced off
    (unaligned rows and the tails of odd widths take plain stores) and matches the reference ops."""
    count = torch.ops.fastrnn_cpu.streamed_outputs
    copy_streams = capability != "default"

    def rnn_bwd_streams(T):  # dgx [T, 1024, 16] fp32: 32 MB at T = 512
        B, H = 1024, 16
        args = (rand(T, B, H, dtype=torch.float32), rand(B, H, dtype=torch.float32),
                weight(H, H, torch.float32), torch.rand(T, B, H) - 0.5, None, None, False, False)
        before = count()
        torch.ops.fastrnn.rnn_bwd(*args)
        return count() - before

    monkeypatch.delenv("FASTRNN_CPU_STREAM", raising=False)
    assert rnn_bwd_streams(512) == int(copy_streams)
    assert rnn_bwd_streams(511) == 0
    monkeypatch.setenv("FASTRNN_CPU_STREAM", "never")
    assert rnn_bwd_streams(512) == 0
    monkeypatch.setenv("FASTRNN_CPU_STREAM", "always")
    assert rnn_bwd_streams(2) == int(copy_streams)

    def gru_fwd_streams(T):  # inference: y [T, 64, 64] fp32, 2 MB at T = 128
        B, H = 64, 64
        args = (rand(T, B, 3 * H, dtype=torch.float32), weight(3 * H, H, torch.float32),
                rand(3 * H, dtype=torch.float32), rand(B, H, dtype=torch.float32), None, None, False, False)
        before = count()
        torch.ops.fastrnn.gru_fwd(*args)
        return count() - before

    monkeypatch.delenv("FASTRNN_CPU_STREAM")
    assert gru_fwd_streams(128) == int(copy_streams)
    assert gru_fwd_streams(127) == 0
    monkeypatch.setenv("FASTRNN_CPU_STREAM", "sometimes")
    with pytest.raises(RuntimeError, match="FASTRNN_CPU_STREAM must be always or never"):
        rnn_bwd_streams(2)

    def outputs(op, args, mode):
        monkeypatch.setenv("FASTRNN_CPU_STREAM", mode)
        return getattr(torch.ops.fastrnn, op)(*args)

    for T, B, H, lengths, reverse in ((9, 5, 70, "var", True), (3, 67, 64, None, False), (4, 3, 13, None, False)):
        lengths = lengths_for(B, T, lengths)
        calls = []
        for proj in (0, 5):
            fwd, bwd = lstm_args(T, B, H, proj, torch.float32, lengths, reverse)
            calls += [("lstm_fwd", fwd + (True,)), ("lstm_bwd", bwd)]
            if not proj:  # inference: y alone (with proj_size y is a copy of the projection's product)
                calls += [("lstm_fwd", fwd + (False,))]
        fwd, bwd = gru_args(T, B, H, True, torch.float32, lengths, reverse)
        calls += [("gru_fwd", fwd + (True,)), ("gru_fwd", fwd + (False,)), ("gru_bwd", bwd)]
        fwd, bwd = rnn_args(T, B, H, False, torch.float32, lengths, reverse)
        calls += [("rnn_bwd", bwd)]
        for op, args in calls:
            before = count()
            streamed = outputs(op, args, "always")
            assert count() - before == int(copy_streams), op
            for a, b in zip(streamed, outputs(op, args, "never")):
                assert torch.equal(a, b), (op, T, B, H)
    monkeypatch.setenv("FASTRNN_CPU_STREAM", "always")
    check_kernels(torch.float32, 9, 5, 70, "var", True, "random")
    check_kernels(torch.bfloat16, 4, 6, 40, None, True)


def test_activations_of_every_capability(capability):
    test_tanh_and_sigmoid_accuracy()
    test_saturation_is_finite()


# ----- bf16 / fp16 (docs/cpu.md, "bf16 and fp16") -----------------------------------------------------


def cpu_flags():
    """The feature flags of this CPU as Linux reports them (empty where /proc/cpuinfo is not there)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []


HAS_BF16_DOT = "avx512_bf16" in cpu_flags()
HAS_AMX_BF16 = "amx_bf16" in cpu_flags()


def test_bf16_dot_product_is_taken_where_the_cpu_has_it(capability, monkeypatch):
    """bf16 weights run the step product on avx512_bf16 (vdpbf16ps) exactly when the AVX-512 copy is active
    and the CPU has the instruction, and never when FASTRNN_CPU_BF16_DOT=0 or for fp32/fp16 weights. The
    kernels count the step products built on it (torch.ops.fastrnn_cpu.bf16_dot_products(); -1: this copy
    cannot use it on this CPU). On and off give different bits from step 1 on (the state h is rounded to
    bf16 for the product), both within the kernels' bf16 bound of the reference."""
    count = torch.ops.fastrnn_cpu.bf16_dot_products
    if capability != "avx512" or not HAS_BF16_DOT:
        assert count() == -1
        return
    monkeypatch.setenv("FASTRNN_CPU_BF16_AMX", "0")  # B=3 stays on vdpbf16ps anyway (kAmxMinRows)
    fwd, bwd = lstm_args(5, 3, 40, 0, torch.bfloat16, None, False)
    before = count()
    monkeypatch.setenv("FASTRNN_CPU_BF16_DOT", "0")
    off_fwd = torch.ops.fastrnn.lstm_fwd(*fwd, True)
    off_bwd = torch.ops.fastrnn.lstm_bwd(*bwd)
    assert count() == before
    monkeypatch.delenv("FASTRNN_CPU_BF16_DOT")
    on_fwd = torch.ops.fastrnn.lstm_fwd(*fwd, True)
    assert count() == before + 1
    on_bwd = torch.ops.fastrnn.lstm_bwd(*bwd)
    assert count() == before + 2
    assert not torch.equal(on_fwd[0], off_fwd[0]) and not torch.equal(on_bwd[0], off_bwd[0])
    for out in (on_fwd, off_fwd):
        assert_close("lstm_fwd y", out[0], REF["lstm_fwd"](*fwd, True)[0], TOL[torch.bfloat16])
    for dtype in (torch.float32, torch.float16):
        torch.ops.fastrnn.lstm_fwd(*lstm_args(5, 3, 40, 0, dtype, None, False)[0], True)
    assert count() == before + 2  # only bf16 weights take it


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch.backends.mkldnn.flags() sets it
def test_bf16_amx_is_taken_where_the_cpu_has_it(capability, monkeypatch):
    """bf16 step products run on AMX (the same pair panels through torch's oneDNN micro-kernel, fp32 sums)
    exactly when the AVX-512 copy is active, torch's micro-kernel runs bf16 on AMX here
    (cpublas::could_pack), the batch is at least 8 (or FASTRNN_CPU_BF16_AMX=1) and FASTRNN_CPU_BF16_AMX is
    not 0; counted by torch.ops.fastrnn_cpu.bf16_amx_products() (-1: not available). AMX and vdpbf16ps
    round the same operands (bf16 weights, h rounded to bf16) and sum in fp32, so they agree to the fp32
    sums' order, and both stay within the kernels' bf16 bound of the reference."""
    count, dots = torch.ops.fastrnn_cpu.bf16_amx_products, torch.ops.fastrnn_cpu.bf16_dot_products
    if capability != "avx512" or not HAS_AMX_BF16:
        assert count() == -1
        return
    if count() == -1:
        pytest.skip("the CPU has amx_bf16 but torch's oneDNN micro-kernel does not run bf16 on AMX here")
    for B, env, on_amx in ((9, None, True), (3, None, False), (3, "1", True), (9, "0", False)):
        if env is None:
            monkeypatch.delenv("FASTRNN_CPU_BF16_AMX", raising=False)
        else:
            monkeypatch.setenv("FASTRNN_CPU_BF16_AMX", env)
        fwd, bwd = lstm_args(6, B, 40, 0, torch.bfloat16, None, True)
        before, before_dot = count(), dots()
        out_fwd = torch.ops.fastrnn.lstm_fwd(*fwd, True)
        out_bwd = torch.ops.fastrnn.lstm_bwd(*bwd)
        assert (count() - before, dots() - before_dot) == ((2, 0) if on_amx else (0, 2)), (B, env)
        assert_close("lstm_fwd y", out_fwd[0], REF["lstm_fwd"](*fwd, True)[0], TOL[torch.bfloat16])
        for i, (ours, ref) in enumerate(zip(out_bwd, REF["lstm_bwd"](*bwd))):
            if ours is not None:
                assert_close(f"lstm_bwd output {i}", ours, ref, TOL[torch.bfloat16])
    monkeypatch.setenv("FASTRNN_CPU_BF16_AMX", "1")
    before = count()
    for dtype in (torch.float32, torch.float16):
        torch.ops.fastrnn.lstm_fwd(*lstm_args(5, 9, 40, 0, dtype, None, False)[0], True)
    assert count() == before  # only bf16 weights take it
    with torch.backends.mkldnn.flags(enabled=False):  # torch's micro-kernel is off: vdpbf16ps, no error
        assert count() == -1
        before_dot = dots()
        torch.ops.fastrnn.lstm_fwd(*lstm_args(5, 9, 40, 0, torch.bfloat16, None, False)[0], True)
        assert dots() == before_dot + 1
    assert count() == before


# Module error against the fp64 oracle, relative to the largest magnitude of each fp64 tensor (y, dx and
# every parameter's gradient), next to torch.nn's own error in the same dtype. The bound is the issue's: at
# most 2x torch.nn's error. torch.nn in bf16 on the CPU runs the LSTM through oneDNN (bf16 matmuls, fp32
# gates and cell state) and the GRU/RNN through ATen's generic cell loop in bf16 (each step's product and
# pointwise math rounded to bf16); fastrnn keeps the states and the pointwise math in fp32 and rounds only
# the stored outputs (and, on avx512_bf16, h_{t-1} for the product). Measured here (Zen 5, every capability,
# dot product on and off): bf16 torch.nn 3.0e-3..1.4e-2, fastrnn 2.3e-3..6.8e-3, worst ratio 1.04; fp16
# torch.nn 4.5e-4..1.5e-3, fastrnn 2.5e-4..6.6e-4, worst ratio 0.98 (docs/cpu.md, "bf16 and fp16"). bf16-amx
# forces the steps onto AMX (FASTRNN_CPU_BF16_AMX=1) where the CPU has it (a Xeon with AMX: passes, every cell).
@pytest.mark.parametrize("dtype,bf16_dot,bf16_amx", [
    pytest.param(torch.bfloat16, "1", "0", id="bf16"),
    pytest.param(torch.bfloat16, "1", "1", id="bf16-amx"),
    pytest.param(torch.bfloat16, "0", "0", id="bf16-dot-off"),
    pytest.param(torch.float16, "1", "0", id="fp16"),
])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_low_precision_error_within_twice_torch_nn(capability, cell, dtype, bf16_dot, bf16_amx, monkeypatch):
    import fastrnn

    monkeypatch.setenv("FASTRNN_CPU_BF16_DOT", bf16_dot)
    monkeypatch.setenv("FASTRNN_CPU_BF16_AMX", bf16_amx)
    if bf16_amx == "1" and torch.ops.fastrnn_cpu.bf16_amx_products() < 0:
        pytest.skip("no bf16 step products on AMX here (needs the avx512 copy and a CPU with AMX)")
    T, B, I, H = 30, 5, 24, 40
    torch.manual_seed(0)
    ref_cls, fast_cls = {"lstm": (torch.nn.LSTM, fastrnn.LSTM), "gru": (torch.nn.GRU, fastrnn.GRU),
                         "rnn": (torch.nn.RNN, fastrnn.RNN)}[cell]
    oracle = ref_cls(I, H).double()
    x64 = torch.randn(T, B, I, dtype=torch.float64)
    dy = torch.randn(T, B, H, dtype=torch.float64)

    def outputs(module, dt):
        module = module.to(dt)
        x = x64.detach().to(dt).clone().requires_grad_()
        y = module(x)[0]
        (y.double() * dy).sum().backward()
        return [y.detach().double(), x.grad.double()] + [p.grad.double() for p in module.parameters()]

    exact = outputs(oracle, torch.float64)
    low_ref = ref_cls(I, H)
    low_ref.load_state_dict(oracle.state_dict())
    fast = fast_cls(I, H, backend="cpu")
    fast.load_state_dict(oracle.state_dict())
    names = ["y", "dx"] + [n for n, _ in fast.named_parameters()]
    for name, ours, theirs, e in zip(names, outputs(fast, dtype), outputs(low_ref, dtype), exact):
        scale = e.abs().max().item()
        err, ref_err = (ours - e).abs().max().item() / scale, (theirs - e).abs().max().item() / scale
        # torch.nn's error is itself a few roundings of the dtype; the floor (one rounding: 2^-8 bf16,
        # 2^-11 fp16) keeps a lucky torch.nn tensor from making the bound tighter than one rounding.
        floor = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
        assert err <= 2 * max(ref_err, floor), f"{cell} {name}: error {err:.3g} > 2 x torch.nn's {ref_err:.3g}"


def test_capability_errors():
    with pytest.raises(RuntimeError, match="the capability must be default, avx2 or avx512, got 'sse9'"):
        native.set_cpu_capability("sse9")
    above = [c for c in ("avx2", "avx512") if c not in native.supported_cpu_capabilities()]
    for name in above:  # only on a CPU without it
        with pytest.raises(RuntimeError, match=f"this CPU cannot run {name}"):
            native.set_cpu_capability(name)


CAPABILITY_CHECK = "from fastrnn.backends import native; print('capability', native.cpu_capability())"


def run_with_env(code, **env):
    full = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key in ("FASTRNN_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY"):
        full.pop(key, None)
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


@pytest.mark.parametrize("variable", ["FASTRNN_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY"])
def test_a_variable_lowers_the_capability(variable):
    """Each lower capability forced at load, in a fresh process (the choice is made once, at import)."""
    for name in BUILT[:-1] or BUILT:
        run = run_with_env(CAPABILITY_CHECK, **{variable: name})
        assert run.returncode == 0, run.stderr[-3000:]
        assert f"capability {name}" in run.stdout, run.stdout + run.stderr[-3000:]


def test_a_variable_never_raises_the_capability():
    """Asking for more than the CPU runs gives what it runs (as ATEN_CPU_CAPABILITY does for torch)."""
    run = run_with_env(CAPABILITY_CHECK, FASTRNN_CPU_CAPABILITY="avx512")
    assert run.returncode == 0 and f"capability {BUILT[-1]}" in run.stdout, run.stdout + run.stderr[-3000:]


def test_a_wrong_variable_is_an_error():
    """A typo must not silently run another path: the native backend does not load, and backend="auto"
    falls back with the registry's warning that carries the message."""
    code = ("import warnings, torch, fastrnn\n"
            "from fastrnn import backends\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    print('auto', backends.resolve('auto', torch.device('cpu')))\n"
            "print('warning', ' '.join(str(x.message) for x in w))\n")
    run = run_with_env(code, FASTRNN_CPU_CAPABILITY="avx3")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "auto reference" in run.stdout, run.stdout
    assert "FASTRNN_CPU_CAPABILITY must be default, avx2 or avx512, got 'avx3'" in run.stdout, run.stdout


def _functions_using(library, pattern):
    """{function symbol: first matching instruction} over `objdump -d` of a library."""
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", library], capture_output=True, text=True,
                          check=True).stdout
    found, function = {}, None
    for line in text.splitlines():
        if line.endswith(">:"):
            function = line[line.index("<") + 1:-2]
        elif function is not None and function not in found and pattern.search(line):
            found[function] = line.strip()
    return found


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
def test_no_wide_instruction_outside_its_capability():
    """The promise that one build runs on any x86-64 CPU, checked on the machine code: the op library
    (what runs before and during the choice, and the default copy) has no AVX instruction at all; the avx2
    library no AVX-512 one (a zmm or mask register, an EVEX-only register, or an EVEX-only instruction
    such as vpternlog). A violation names the function, e.g. an inline function of a header compiled
    with the wrong flags."""
    import re

    import fastrnn._C

    here = os.path.dirname(fastrnn._C.__file__)
    avx = re.compile(r":\s+v[a-z0-9]+\s|%ymm|%zmm")  # a VEX/EVEX mnemonic (vmovaps, vfmadd...) or register
    avx512 = re.compile(r"%zmm|%k[0-7]\b|%[xy]mm(1[6-9]|2[0-9]|3[01])\b|\{1to|vpternlog|vperm[it]2|vpmov[a-z]*2m|"
                        r"vpmovm2|vrndscale|vgetexp|vscalef|vfixupimm|vpcompress|vexpand|vprol|vpror|valign[dq]")
    found = _functions_using(fastrnn._C.__file__, avx)
    if torch.version.cuda is not None:
        # A CUDA build links CUDA's host runtime code into fastrnn._C, which may carry its own
        # CPUID-guarded AVX paths; the promise is about the code compiled from csrc/ and the headers it uses.
        found = {f: i for f, i in found.items() if any(n in f for n in ("fastrnn", "at::", "c10::", "std::"))}
    assert not found, f"fastrnn._C (no ISA flags) has AVX instructions in {dict(list(found.items())[:5])}"
    libraries = [f for f in os.listdir(here) if f.startswith("_C_avx2.") and f.endswith(".so")]
    if "avx2" in BUILT:
        assert libraries, os.listdir(here)
    for f in libraries:
        found = _functions_using(os.path.join(here, f), avx512)
        assert not found, f"{f} has AVX-512 instructions in {dict(list(found.items())[:5])}"
    # avx512_bf16 is not part of the avx512 capability: its instructions may sit only in the tile that
    # runs after the CPUID check (gemm.h, bf16_pair_tile), in no other function of any library.
    bf16 = re.compile(r":\s+v(dpbf16ps|cvtne2ps2bf16|cvtneps2bf16)\s")
    for f in os.listdir(here):
        if f.startswith("_C") and f.endswith(".so"):
            found = {fn: i for fn, i in _functions_using(os.path.join(here, f), bf16).items()
                     if "bf16_pair_tile" not in fn}
            assert not found, f"{f} has avx512_bf16 instructions outside bf16_pair_tile: {found}"
    avx512_libraries = [f for f in os.listdir(here) if f.startswith("_C_avx512.") and f.endswith(".so")]
    for f in avx512_libraries:
        assert any("bf16_pair_tile" in fn for fn in _functions_using(os.path.join(here, f), bf16)), f


# ----- the big GEMMs (csrc/cpu/linear.cpp) -------------------------------------------------------------


@pytest.mark.parametrize("blas", ["onednn", "onednn-linear-op", "mkl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_linear_and_mm_match_torch(blas, dtype, monkeypatch):
    """fastrnn_cpu::linear / mm against torch.nn.functional.linear / torch.mm on odd, transposed, strided and
    empty operands, on every path (FASTRNN_CPU_BLAS; on oneDNN, its matmul into our output or its linear op).
    fp32 tolerance: a different summation order over K = 67; bf16: both round the fp32 accumulator to bf16 (an
    ulp, 2^-8 relative)."""
    monkeypatch.setenv("FASTRNN_CPU_BLAS", blas.split("-")[0])
    if blas == "onednn-linear-op":  # where torch's mkldnn_matmul is not used (linear.cpp, onednn_matmul)
        monkeypatch.setenv("FASTRNN_CPU_ONEDNN_MATMUL", "0")
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 8e-3}[dtype]
    x, w, b = torch.randn(37, 67, dtype=dtype), torch.randn(29, 67, dtype=dtype), torch.randn(29, dtype=dtype)
    assert_close("linear", native.linear(x, w, b), torch.nn.functional.linear(x, w, b), tol)
    assert_close("linear no bias", native.linear(x, w), torch.nn.functional.linear(x, w), tol)
    assert_close("mm", native.mm(x, w.t()), torch.mm(x, w.t()), tol)
    assert_close("mm transposed a", native.mm(x.t(), x), torch.mm(x.t(), x), tol)
    assert_close("linear strided x", native.linear(x[:, :60], w[:, :60], b), torch.nn.functional.linear(
        x[:, :60], w[:, :60], b), tol)
    # A weight gradient's dgx^T x (a transposed view as a, far larger than b): oneDNN's linear op runs it as
    # (b^T a^T)^T, its matmul takes the view as it is.
    g, y = torch.randn(67, 41, dtype=dtype), torch.randn(67, 5, dtype=dtype)
    for b_operand in (y, y.t().contiguous().t()):
        out = native.mm(g.t(), b_operand)
        assert out.is_contiguous()
        assert_close("mm large transposed a", out, torch.mm(g.t(), b_operand), tol)
    assert native.linear(x[:0], w, b).shape == (0, 29)
    with pytest.raises(RuntimeError, match=r"fastrnn_cpu::linear: input \[37, 67\] and weight \[29, 66\] do not match"):
        native.linear(x, w[:, 1:], b)


def test_cpu_vendor_matches_the_cpu_and_the_default_blas(monkeypatch):
    """native.CPU_VENDOR, which auto's measured rules key on, is the CPU's vendor as /proc/cpuinfo names it
    (Linux), and the big GEMMs' default path follows it: MKL on Intel CPUs, oneDNN elsewhere (where torch has it)."""
    assert native.CPU_VENDOR in ("intel", "amd", "other")
    try:
        with open("/proc/cpuinfo") as f:
            vendor_ids = {line.split(":")[1].strip() for line in f if line.startswith("vendor_id")}
    except OSError:
        vendor_ids = set()
    if vendor_ids:
        names = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}
        assert native.CPU_VENDOR == names.get(vendor_ids.pop(), "other")
    monkeypatch.delenv("FASTRNN_CPU_BLAS", raising=False)
    if native.CPU_VENDOR == "intel" or not torch.backends.mkldnn.is_available():
        assert native.blas() == "mkl"
    else:
        assert native.blas() == "onednn"


@pytest.mark.parametrize("path", ["auto", "aten", "packed", "in_place"])
def test_small_linear_matches_torch(capability, path, monkeypatch):
    """fastrnn_cpu::small_linear (the packed panels of the step products, csrc/cpu/small_linear.cpp) against
    F.linear in fp64 in every capability and both product paths (FASTRNN_CPU_GEMM: the AVX2 / default copies
    take the library GEMM for large A): odd K and N against the vector and panel widths, rows past the
    64-row chunk, one row, no bias, strided operands, a second call from the panel cache, empty operands.
    fp32 tolerance: summation order over K = 67 (as test_linear_and_mm_match_torch)."""
    monkeypatch.setenv("FASTRNN_CPU_GEMM", path)
    for M, K, N in ((1, 67, 29), (37, 67, 29), (130, 67, 100), (5, 3, 1)):
        x, w, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
        ref = torch.nn.functional.linear(x.double(), w.double(), b.double()).float()  # fp64, rounded once
        for call in range(2):
            assert_close(f"small_linear {M}x{K}x{N} call {call}", torch.ops.fastrnn_cpu.small_linear(x, w, b), ref, 1e-5)
        assert_close("no bias", native.small_linear(x, w), ref - b, 1e-5)
        # Past the op's autograd layer (grad=False): the same kernel, the same bits; a dispatch mode still sees it.
        with CountOps() as seen:
            below = native.small_linear(x, w, b, grad=False)
        assert torch.equal(below, torch.ops.fastrnn_cpu.small_linear(x, w, b))
        assert seen.calls == ["fastrnn_cpu.small_linear.default"], seen.calls
        assert_close("strided", native.small_linear(x.t().contiguous().t(), w.t().contiguous().t(), b), ref, 1e-5)
    w = torch.randn(29, 67)
    assert native.small_linear(torch.randn(0, 67), w).shape == (0, 29)
    assert native.small_linear(torch.randn(4, 67), w[:0]).shape == (4, 0)
    with pytest.raises(RuntimeError, match=r"small_linear: x \[M, K\] and w \[N, K\] expected"):
        native.small_linear(torch.randn(4, 66), w)
    with pytest.raises(RuntimeError, match="small_linear: fp32 CPU tensors expected"):
        native.small_linear(torch.randn(4, 67, dtype=torch.float64), w.double())
    with pytest.raises(RuntimeError, match=r"small_linear: bias \[N\] fp32 expected"):
        native.small_linear(torch.randn(4, 67), w, torch.randn(28))


def test_packed_projection_rule(monkeypatch):
    """Which input projections run on small_linear (autograd.packed_projection): fp32 inference on the cpu
    backend's AVX-512 copy where fp32 products take oneDNN, W_ih up to the panel cache's 1 MB, 2+ rows; the
    module's output is the same either way. Both sides of each condition, so a broken rule fails here."""
    from fastrnn import autograd

    calls = []
    real = native.small_linear
    # Each call's rows and whether it went through the op's autograd layer (grad=False: nothing requires grad).
    monkeypatch.setattr(native, "small_linear", lambda *a, **k: calls.append((a[0].shape, k["grad"])) or real(*a, **k))
    monkeypatch.setattr(native, "cpu_capability", lambda: "avx512")
    monkeypatch.setattr(native, "blas", lambda: "onednn")
    x, w = torch.randn(3, 2, 8), torch.randn(32, 8)
    rule = autograd.packed_projection
    assert rule("cpu", x, w, training=False)
    assert not rule("cpu", x, w, training=True)  # a small product in training: F.linear, no custom op
    # Training from fastrnn_cpu::linear's threshold (2 * T*B * I * G*H FLOPs), where that op would run.
    rows = autograd.NATIVE_GEMM_MIN_FLOPS_TRAINING // (2 * 8 * 32)
    assert rule("cpu", torch.randn(rows, 1, 8), w, training=True)
    assert not rule("cpu", torch.randn(rows - 1, 1, 8), w, training=True)
    assert not rule("triton", x, w, training=False)
    assert not rule("cpu", x.double(), w.double(), training=False)
    assert not rule("cpu", x[:1, :1], w, training=False)  # one row: a GEMV, faster in torch
    assert rule("cpu", x, torch.randn(1 << 18, 1), training=False)  # exactly 1 MB
    assert not rule("cpu", x, torch.randn((1 << 18) + 1, 1), training=False)
    monkeypatch.setattr(native, "blas", lambda: "mkl")
    assert not rule("cpu", x, w, training=False)
    monkeypatch.setattr(native, "blas", lambda: "onednn")
    monkeypatch.setattr(native, "cpu_capability", lambda: "avx2")
    assert not rule("cpu", x, w, training=False)
    monkeypatch.setattr(native, "cpu_capability", lambda: "avx512")

    ref = torch.nn.LSTM(8, 8)
    model = fastrnn.LSTM(8, 8, backend="cpu")
    model.load_state_dict(ref.state_dict())
    with torch.no_grad():
        y, _ = model(x)
    assert calls == [((6, 8), False)]
    assert_close("module on small_linear", y, ref(x)[0], 1e-5)
    model(x)[0].sum().backward()  # training of a small layer: F.linear
    assert calls == [((6, 8), False)]
    # Training on it (the threshold lowered for this small layer): gradients to x and every parameter.
    monkeypatch.setattr(autograd, "NATIVE_GEMM_MIN_FLOPS_TRAINING", 0)
    model.zero_grad()
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(xr)[0].square().sum().backward()
    model(xf)[0].square().sum().backward()
    assert calls == [((6, 8), False), ((6, 8), True)]
    assert_close("dx", xf.grad, xr.grad, 1e-5)
    for name, p in model.named_parameters():
        assert_close(f"d{name}", p.grad, ref.get_parameter(name).grad, 1e-5)
    # W_ih's panels come from the panel cache from the third call; a `.data` write (version unchanged) is seen.
    with torch.no_grad():
        for _ in range(3):
            model(x)
        new = torch.randn_like(ref.weight_ih_l0)
        ref.weight_ih_l0.data.copy_(new)
        model.weight_ih_l0.data.copy_(new)
        assert_close("after a .data write to W_ih", model(x)[0], ref(x)[0], 1e-5)


def test_small_linear_gradients():
    """small_linear's gradients (linear's formula, native.py) against F.linear's, fp32 (the op is fp32 only),
    with and without bias; and a second derivative through them."""
    x = torch.randn(37, 67, requires_grad=True)
    w = torch.randn(29, 67, requires_grad=True)
    b = torch.randn(29, requires_grad=True)
    grad = torch.randn(37, 29)
    for bias in (b, None):
        ours = torch.autograd.grad(native.small_linear(x, w, bias), [x, w] + ([bias] if bias is not None else []), grad)
        theirs = torch.autograd.grad(torch.nn.functional.linear(x, w, bias),
                                     [x, w] + ([bias] if bias is not None else []), grad)
        for name, o, t in zip(("dx", "dw", "db"), ours, theirs):
            assert_close(name, o, t, 1e-5)
    (dx,) = torch.autograd.grad(native.small_linear(x, w, b).square().sum(), [x], create_graph=True)
    (ours,) = torch.autograd.grad(dx.sum(), [w])
    (dx,) = torch.autograd.grad(torch.nn.functional.linear(x, w, b).square().sum(), [x], create_graph=True)
    (theirs,) = torch.autograd.grad(dx.sum(), [w])
    assert_close("second derivative", ours, theirs, 1e-5)


def test_linear_and_mm_gradients():
    """Their autograd formulas (native.py, register_autograd) against torch's: gradcheck in fp64 (the
    addmm path) and fp32 gradients on the oneDNN path against F.linear's / torch.mm's."""
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(native.linear, (x, w, b))
    assert torch.autograd.gradcheck(native.linear, (x, w, None))
    assert torch.autograd.gradcheck(native.mm, (x, w.t()))
    for fn, ref, args in ((native.linear, torch.nn.functional.linear, (x, w, b)), (native.mm, torch.mm, (x, w.t()))):
        ours = [t.detach().float().requires_grad_() for t in args]
        theirs = [t.detach().float().requires_grad_() for t in args]
        grad = torch.randn(5, 4)
        fn(*ours).backward(grad)
        ref(*theirs).backward(grad)
        for name, o, r in zip(("a", "b", "bias"), ours, theirs):
            assert_close(f"{fn.__name__} d{name}", o.grad, r.grad, 1e-5)


def test_linear_path_rule(monkeypatch):
    """fp32 takes oneDNN where torch has it, except on Intel CPUs, where MKL runs its AVX-512 code (each
    measured faster there, docs/benchmarks.md); the switch is checked; the op traces (fake kernel) inside
    torch.compile, where torch's own mkldnn op cannot."""
    with open("/proc/cpuinfo") as f:
        intel = "GenuineIntel" in f.read()
    onednn = torch.backends.mkldnn.is_available()
    assert torch.ops.fastrnn_cpu.blas() == ("onednn" if onednn and not intel else "mkl")
    # torch's mkldnn_matmul is found and takes fp32 (torch 2.13 does on x86 CPUs with AVX-512 BW/VL/DQ).
    torch_version = tuple(int(v) for v in torch.__version__.split(".")[:2])
    if onednn and torch_version >= (2, 13) and {"avx512bw", "avx512vl", "avx512dq"} <= set(cpu_flags()):
        assert torch.ops.fastrnn_cpu.onednn_matmul()
    monkeypatch.setenv("FASTRNN_CPU_BLAS", "mkl")
    assert torch.ops.fastrnn_cpu.blas() == "mkl"
    monkeypatch.setenv("FASTRNN_CPU_BLAS", "onednn")
    assert torch.ops.fastrnn_cpu.blas() == ("onednn" if onednn else "mkl")
    monkeypatch.setenv("FASTRNN_CPU_BLAS", "blis")
    with pytest.raises(RuntimeError, match="FASTRNN_CPU_BLAS must be onednn or mkl, got 'blis'"):
        native.linear(torch.randn(2, 3), torch.randn(4, 3))
    monkeypatch.delenv("FASTRNN_CPU_BLAS")
    x, w, b = torch.randn(5, 7), torch.randn(8, 7), torch.randn(8)
    compiled = torch.compile(lambda x: native.linear(x, w, b) + 1, fullgraph=True, backend="eager")
    assert_close("compiled linear", compiled(x), torch.nn.functional.linear(x, w, b) + 1, 1e-5)
    torch.library.opcheck(torch.ops.fastrnn_cpu.linear.default, (x, w, b))
    torch.library.opcheck(torch.ops.fastrnn_cpu.mm.default, (x, w.t()))


def test_layer_gemm_size_rule(monkeypatch):
    """autograd.native_gemm on the oneDNN path: fp32 products below NATIVE_GEMM_MIN_FLOPS (forward only) or
    NATIVE_GEMM_MIN_FLOPS_TRAINING (a backward runs too) take torch's own matmul, but not in training with a
    weight of NATIVE_GEMM_MIN_WEIGHT_BYTES_TRAINING (its gradient from the output cache); FASTRNN_CPU_BLAS, set,
    forces the ops at every size. Where they would run MKL only products with an output of
    NATIVE_GEMM_MIN_OUTPUT_BYTES_MKL, or the weight rule's in training, take them (for the output cache), never
    under FASTRNN_CPU_BLAS=mkl."""
    from fastrnn import autograd

    monkeypatch.delenv("FASTRNN_CPU_BLAS", raising=False)
    monkeypatch.setattr(native, "blas", lambda: "onednn")
    sizes = (autograd.NATIVE_GEMM_MIN_FLOPS - 1, autograd.NATIVE_GEMM_MIN_FLOPS,
             autograd.NATIVE_GEMM_MIN_FLOPS_TRAINING - 1, autograd.NATIVE_GEMM_MIN_FLOPS_TRAINING)
    assert [autograd.native_gemm("cpu", torch.float32, f, False) for f in sizes] == [False, True, True, True]
    assert [autograd.native_gemm("cpu", torch.float32, f, True) for f in sizes] == [False, False, False, True]
    big = autograd.NATIVE_GEMM_MIN_WEIGHT_BYTES_TRAINING
    assert [autograd.native_gemm("cpu", torch.float32, 1, True, w) for w in (big - 4, big)] == [False, True]
    assert not autograd.native_gemm("cpu", torch.float32, 1, False, big)  # inference: no gradient to make
    assert not autograd.native_gemm("reference", torch.float32, sizes[-1], True)
    monkeypatch.setenv("FASTRNN_CPU_BLAS", "onednn")
    assert autograd.native_gemm("cpu", torch.float32, 1, True)
    monkeypatch.setattr(native, "blas", lambda: "mkl")
    assert not autograd.native_gemm("cpu", torch.float32, 1, True)
    monkeypatch.delenv("FASTRNN_CPU_BLAS")
    out = autograd.NATIVE_GEMM_MIN_OUTPUT_BYTES_MKL
    for training in (False, True):
        assert [autograd.native_gemm("cpu", torch.float32, sizes[-1] * 100, training, 0, o)
                for o in (out - 4, out)] == [False, True]
        assert autograd.native_gemm("cpu", torch.float32, 1, training, big, 0) == training
    assert not autograd.native_gemm("cpu", torch.float32, sizes[-1] * 100, True, big - 4, out - 4)
    monkeypatch.setenv("FASTRNN_CPU_BLAS", "mkl")
    assert not autograd.native_gemm("cpu", torch.float32, 1, True, big, out)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_relu"])
def test_layers_through_the_gemm_ops(cell, monkeypatch):
    """Layers whose big GEMMs run through fastrnn_cpu::linear / mm (forced: the tests' layers are below
    native_gemm's size rule, and Intel CPUs take MKL) match torch.nn in fp64 within the fp32 tolerance: output,
    state, and the gradients of the input, the initial state and every parameter; 2 layers, bidirectional,
    packed (dW_hh's shifted rows), and a transposed dgx^T x large enough for mm's swapped form."""
    from parity import FP32_TOL, Case, CountOps, assert_all_close, run_case

    monkeypatch.setenv("FASTRNN_CPU_BLAS", "onednn")
    case = Case(cell, T=9, B=4, I=3, H=5, layers=2, bidirectional=True, packed="unsorted")
    with CountOps() as counter:
        ref, out = run_case(case, "cpu", "cpu", torch.float32)
    assert_all_close(ref, out, **FP32_TOL)
    if torch.backends.mkldnn.is_available():
        assert "fastrnn_cpu.linear.default" in counter.calls and "fastrnn_cpu.mm.default" in counter.calls


def test_training_with_a_big_weight_takes_the_gemm_ops(monkeypatch):
    """In training, a layer whose weights reach NATIVE_GEMM_MIN_WEIGHT_BYTES_TRAINING runs its projection and dW_hh
    through fastrnn_cpu::linear / mm at any FLOPs (their weight-sized gradients from the output cache: autograd's
    native_gemm, given each product's weight size); a step more of hidden size below it, torch's own matmul.
    Gradients against torch.nn in fp64 within the fp32 tolerance. The blas setting is patched to oneDNN's, so the
    rule runs on any CPU (the ops take MKL on Intel's)."""
    from fastrnn import autograd
    from parity import FP32_TOL, CountOps, assert_close

    monkeypatch.delenv("FASTRNN_CPU_BLAS", raising=False)
    monkeypatch.setattr(native, "blas", lambda: "onednn")
    big_h = math.isqrt(autograd.NATIVE_GEMM_MIN_WEIGHT_BYTES_TRAINING // (3 * 4)) + 1  # GRU: W is [3H, H]
    for H, native_path in ((big_h, True), (big_h - 2, False)):
        model = fastrnn.GRU(H, H, backend="cpu")
        oracle = torch.nn.GRU(H, H).double()
        oracle.load_state_dict(model.state_dict())
        x = torch.randn(2, 1, H, requires_grad=True)
        with CountOps() as counter:
            model(x)[0].sum().backward()
        calls = counter.calls
        # The projection, then three products: its dx and dW_ih (linear's backward) and dW_hh (one: T*B < 3H).
        want = (1, 3) if native_path else (0, 0)
        assert (calls.count("fastrnn_cpu.linear.default"), calls.count("fastrnn_cpu.mm.default")) == want, (H, calls)
        xr = x.detach().double().requires_grad_()
        oracle(xr)[0].sum().backward()
        assert_close("dx", xr.grad, x.grad.double(), **FP32_TOL)
        for (name, p), q in zip(model.named_parameters(), oracle.parameters()):
            assert_close(name, q.grad, p.grad.double(), **FP32_TOL)


# A child process (FASTRNN_HUGE_PAGES is read once per process): for an op's 8 MB output, and for a projection's
# 8 MB output where the oneDNN path writes into its own (csrc/cpu/linear.cpp, onednn_matmul), whether the mapping
# holding its first whole 2 MB page carries the MADV_HUGEPAGE advice ("hg" in /proc/self/smaps' VmFlags).
HUGE_PAGE_CHECK = """
import torch
from fastrnn.backends import native


def advised(t):
    start = (t.data_ptr() + (2 << 20) - 1) & ~((2 << 20) - 1)
    inside, flags = False, None
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= start < hi
        elif inside and head == "VmFlags:":
            flags = line.split()[1:]
    return "hg" in flags


y, _ = torch.ops.fastrnn.rnn_fwd(torch.zeros(64, 64, 512), torch.zeros(512, 512), torch.zeros(64, 512), None, None,
                                 False, False)
gx = native.linear(torch.zeros(4096, 64), torch.zeros(512, 64), torch.zeros(512))
print(advised(y), advised(gx) if torch.ops.fastrnn_cpu.onednn_matmul() else "n/a")
"""


def _thp_mode():
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"), or None without THP."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


@pytest.mark.skipif(_thp_mode() in (None, "never"), reason="no transparent huge pages here (absent or 'never')")
@pytest.mark.parametrize("setting, advised", [(None, True), ("0", False)])
def test_large_outputs_are_advised_onto_huge_pages(setting, advised):
    """An op's large output (csrc/cpu/memory.h: an 8 MB y) carries the MADV_HUGEPAGE advice ("hg" in its
    mapping's VmFlags), and so does the input projection's where the oneDNN path writes into its own output;
    FASTRNN_HUGE_PAGES=0 leaves both off (read once per process, hence a child process)."""
    env = {k: v for k, v in os.environ.items() if k != "FASTRNN_HUGE_PAGES"}
    if setting is not None:
        env["FASTRNN_HUGE_PAGES"] = setting
    out = subprocess.run([sys.executable, "-c", HUGE_PAGE_CHECK], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    op_output, projection = out.stdout.split()[-2:]
    assert op_output == str(advised)
    if torch.ops.fastrnn_cpu.onednn_matmul() and torch.ops.fastrnn_cpu.blas() == "onednn":
        assert projection == str(advised)


# ----- the output cache (csrc/cpu/output_cache.cpp) ----------------------------------------------------


def test_output_cache_makes_outputs_in_the_blocks_of_dead_ones(capability, monkeypatch):
    """An op's output of 2 MB or more is made in a block a dead output left (the hit counter grows, no block is
    made), never in a live tensor's, and is right there; the capability's copy (small_linear) and the op
    library (linear, on MKL and where it runs oneDNN's matmul into its own output) share one cache;
    fastrnn.empty_cache() frees the kept blocks."""
    x, w = torch.randn(2048, 256, dtype=torch.float64), torch.randn(1024, 256, dtype=torch.float64)
    ref = x @ w.t()
    x, w = x.float(), w.float()  # 8 MB outputs
    fastrnn.empty_cache()
    assert native.output_cache_stats()["free_bytes"] == 0
    a, b = native.small_linear(x, w), native.small_linear(x, w)
    assert a.data_ptr() != b.data_ptr()
    before, freed = native.output_cache_stats(), a.data_ptr()
    del a
    assert native.output_cache_stats()["free_bytes"] == before["free_bytes"] + (8 << 20)
    c = native.small_linear(x, w)  # (a copy that runs linear into a temporary here takes a block for it too)
    after = native.output_cache_stats()
    assert c.data_ptr() == freed and c.data_ptr() != b.data_ptr()
    assert after["hits"] >= before["hits"] + 1 and after["made"] == before["made"]
    assert_close("small_linear in a kept block", c, ref.float(), 1e-5)
    for blas in ("mkl", "onednn"):
        monkeypatch.setenv("FASTRNN_CPU_BLAS", blas)
        if blas == "onednn" and not native.onednn_matmul():
            continue  # oneDNN's linear op allocates its output itself
        freed = c.data_ptr()
        del c
        c = native.linear(x, w)
        assert c.data_ptr() == freed
        assert_close(f"linear ({blas}) in a kept block", c, ref.float(), 1e-5)
    del b, c
    assert fastrnn.empty_cache() >= 8 << 20
    assert native.output_cache_stats()["free_bytes"] == 0


def test_output_cache_releases_the_blocks_an_output_outgrows(capability):
    """An output larger than every free block of its size class (a sequence that grew) is made after those
    blocks went back to the system: the free 4 MB block of a dead output is gone once a 6 MB output is made
    (what stays free is whole 6 MB blocks, a temporary's where the copy runs linear into one)."""
    w = torch.randn(1024, 256)
    fastrnn.empty_cache()
    native.small_linear(torch.randn(1024, 256), w)  # a 4 MB output, dead at once
    kept = native.output_cache_stats()["free_bytes"]
    assert kept > 0 and kept % (4 << 20) == 0
    grown = native.small_linear(torch.randn(1536, 256), w)  # 6 MB
    assert native.output_cache_stats()["free_bytes"] % (6 << 20) == 0
    del grown
    assert native.output_cache_stats()["free_bytes"] in (6 << 20, 12 << 20)
    fastrnn.empty_cache()


# A child process (FASTRNN_CPU_OUTPUT_CACHE_MB is read once per process, at the first large output): three 4 MB
# outputs die; what the cache keeps then, what empty_output_cache frees, and what is left. (Where the running
# copy computes small_linear through linear into a temporary, the AVX2 and default copies at these sizes, the
# temporaries' blocks are kept too.)
OUTPUT_CACHE_CHECK = """
import torch
from fastrnn.backends import native

x, w = torch.randn(1024, 256), torch.randn(1024, 256)
outputs = [native.small_linear(x, w) for _ in range(3)]
del outputs
kept = native.output_cache_stats()["free_bytes"]
print(kept, native.empty_output_cache(), native.output_cache_stats()["free_bytes"])
"""


@pytest.mark.parametrize("setting, kept", [(None, "all"), ("6", 4 << 20), ("0", 0), ("many", None)])
def test_output_cache_keeps_at_most_its_capacity(setting, kept):
    """The default keeps all three dead outputs (and any temporary's block), FASTRNN_CPU_OUTPUT_CACHE_MB=6 one
    (the longest-unused go back to the system), 0 none; a value that is not a whole number of MB is an error at
    the first large output."""
    env = {k: v for k, v in os.environ.items() if k != "FASTRNN_CPU_OUTPUT_CACHE_MB"}
    if setting is not None:
        env["FASTRNN_CPU_OUTPUT_CACHE_MB"] = setting
    out = subprocess.run([sys.executable, "-c", OUTPUT_CACHE_CHECK], env=env, capture_output=True, text=True,
                         timeout=300)
    if kept is None:
        assert out.returncode != 0
        assert ("FASTRNN_CPU_OUTPUT_CACHE_MB must be a whole number of MB (0: no output cache), got 'many'"
                in out.stderr)
        return
    assert out.returncode == 0, out.stderr
    free_bytes, freed, left = (int(v) for v in out.stdout.split()[-3:])
    assert (free_bytes >= 3 * 4 << 20 if kept == "all" else free_bytes == kept), free_bytes
    assert (freed, left) == (free_bytes, 0)


# A child process that forks (the cache's mutex is held across fork() by pthread_atfork handlers and released on
# both sides): after the fork the parent and the child each make an output in the block freed before it.
OUTPUT_CACHE_FORK_CHECK = """
import os
import torch
from fastrnn.backends import native

torch.set_num_threads(1)  # the child of a fork runs no OpenMP threads (as DataLoader workers do)
x, w = torch.randn(1024, 256), torch.randn(1024, 256)
ref = x.double() @ w.double().t()
freed = native.small_linear(x, w).data_ptr()
pid = os.fork()
y = native.small_linear(x, w)
ok = y.data_ptr() == freed and (y.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
if pid == 0:
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
print(ok, os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() here")
def test_output_cache_works_on_both_sides_of_a_fork():
    out = subprocess.run([sys.executable, "-c", OUTPUT_CACHE_FORK_CHECK], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["True", "0"]


# ----- bad input --------------------------------------------------------------------------------------


def test_bad_input_gives_clear_errors():
    fwd, _ = rnn_args(3, 2, 4, False, torch.float32, None, False)
    gx, w_hh, h0 = fwd[:3]
    rnn = torch.ops.fastrnn.rnn_fwd
    with pytest.raises(RuntimeError, match=r"fastrnn::rnn_fwd: h0 \[B, H\] must have dtype Float"):
        rnn(gx, w_hh, h0.double(), None, None, False, False)
    with pytest.raises(RuntimeError, match=r"w_hh \[H, H\] must have shape \[4, 4\], got \[4, 5\]"):
        rnn(gx, torch.zeros(4, 5), h0, None, None, False, False)
    with pytest.raises(RuntimeError, match="gx must be 3-D"):
        rnn(gx[0], w_hh, h0, None, None, False, False)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        rnn(gx, w_hh.t(), h0, None, None, False, False)
    with pytest.raises(RuntimeError, match="gx must be float32, float64, float16 or bfloat16, got Int"):
        rnn(gx.int(), w_hh.int(), h0.int(), None, None, False, False)
    with pytest.raises(RuntimeError, match=r"lengths\[1\] = 4 is outside \[0, T = 3\]"):
        rnn(gx, w_hh, h0, torch.tensor([3, 4]), None, False, False)
    with pytest.raises(RuntimeError, match=r"lengths\[0\] = -1 is outside"):
        rnn(gx, w_hh, h0, torch.tensor([-1, 2]), None, False, False)
    with pytest.raises(RuntimeError, match="lengths must be int64, got Int"):
        rnn(gx, w_hh, h0, torch.tensor([3, 2], dtype=torch.int32), None, False, False)
    with pytest.raises(RuntimeError, match=r"lengths must have shape \[2\]"):
        rnn(gx, w_hh, h0, torch.tensor([3, 2, 1]), None, False, False)
    fwd, _ = lstm_args(3, 2, 4, 0, torch.float32, None, False)
    with pytest.raises(RuntimeError, match=r"fastrnn::lstm_fwd: without w_hr, h0 \[B, Hout\] must have Hout = H = 4"):
        torch.ops.fastrnn.lstm_fwd(fwd[0], torch.zeros(16, 2), torch.zeros(2, 2), fwd[3], None, None, None, False, True)
    with pytest.raises(RuntimeError, match=r"gx \[T, B, 4H\] must have shape \[3, 2, 20\]"):
        torch.ops.fastrnn.lstm_fwd(fwd[0], fwd[1], fwd[2], torch.zeros(2, 5), None, None, None, False, True)


def test_bad_resets_give_clear_errors():
    T, B = 3, 2
    bad = [
        (torch.zeros(T, B, dtype=torch.uint8), "resets must be bool, got Byte"),
        (torch.zeros(T, B + 1, dtype=torch.bool), r"resets must have shape \[3, 2\], got \[3, 3\]"),
        (torch.zeros(B, T, dtype=torch.bool), r"resets must have shape \[3, 2\], got \[2, 3\]"),
        (torch.zeros(T * B, dtype=torch.bool), r"resets must have shape \[3, 2\], got \[6\]"),
        (torch.zeros(B, T, dtype=torch.bool).t(), "resets must be contiguous"),
    ]
    lstm_fwd, lstm_bwd = lstm_args(T, B, 4, 0, torch.float32, None, False)
    gru_fwd, gru_bwd = gru_args(T, B, 4, True, torch.float32, None, False)
    rnn_fwd, rnn_bwd = rnn_args(T, B, 4, False, torch.float32, None, False)
    calls = {  # op name, args with the mask at `index`
        "lstm_fwd": (lstm_fwd + (True,), 6), "lstm_bwd": (lstm_bwd, 9), "gru_fwd": (gru_fwd + (True,), 5),
        "gru_bwd": (gru_bwd, 7), "rnn_fwd": (rnn_fwd, 4), "rnn_bwd": (rnn_bwd, 5),
    }
    for name, (args, index) in calls.items():
        for resets, message in bad:
            with pytest.raises(RuntimeError, match=f"fastrnn::{name}: {message}"):
                getattr(torch.ops.fastrnn, name)(*args[:index], resets, *args[index + 1:])


# ----- the CMake build --------------------------------------------------------------------------------

CMAKE_CHECK = textwrap.dedent(
    """
    import sys, torch
    torch.ops.load_library(sys.argv[1])
    from fastrnn.backends import ops
    ref = ops("reference")
    x = torch.randn(4, 3, 4 * 5, dtype=torch.float64)
    w, h0, c0 = (torch.randn(*s, dtype=torch.float64) for s in ((20, 5), (3, 5), (3, 5)))
    args = (x, w, h0, c0, None, torch.tensor([4, 1, 3]), None, True, True)
    for name in torch.ops.fastrnn_cpu.supported():  # the capability libraries beside it load and run
        assert torch.ops.fastrnn_cpu.set_capability(name) == name
        for out, want in zip(torch.ops.fastrnn.lstm_fwd(*args), ref["lstm_fwd"](*args)):
            torch.testing.assert_close(out, want)
    print("cmake library OK")
    """
)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_build(tmp_path):
    """Builds the op library with CMake (find_package(Torch)) into a temp dir and runs an op from it.

    A Debug build (-O0) compiles about twice as fast and proves the same thing; it is loaded in a fresh
    process because this one already registered the fastrnn namespace from fastrnn._C.
    """
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = subprocess.run(
        ["cmake", "-S", ROOT, "-B", str(tmp_path), "-DCMAKE_BUILD_TYPE=Debug",
         f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"] + generator,
        capture_output=True, text=True,
    )
    assert configure.returncode == 0, configure.stdout[-4000:] + configure.stderr[-4000:]
    jobs = os.environ.get("MAX_JOBS", "2")
    build = subprocess.run(["cmake", "--build", str(tmp_path), "--parallel", jobs], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    library = tmp_path / "libfastrnn_ops.so"
    assert library.exists(), os.listdir(tmp_path)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", CMAKE_CHECK, str(library)], capture_output=True, text=True, env=env)
    assert run.returncode == 0 and "cmake library OK" in run.stdout, run.stdout + run.stderr
