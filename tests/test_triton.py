"""Triton-backend tests beyond the parity suite (which runs it through the modules like every backend).

Here the six ops are called directly: each against the reference op in both kernel paths (the per-step
kernels and the persistent kernel), with every fresh tensor poisoned with NaN so that an element a kernel
forgets to write fails; the two paths against each other in fp32/fp16/bf16; empty batches; bad input;
the plan; torch.library's opcheck and torch.compile; the interpreter's triton/numpy guard; a forced
persistent kernel that does not fit the device's shared memory; (slow) every kernel compiled for sm_80/
sm_90 as a launch compiles it, and the forced persistent test sizes fitting an H100/H200; (gpu) CUDA-graph
capture and a module on a second GPU. On a machine without a GPU, tests/conftest.py has switched triton's
interpreter on.
"""

import os
import re
import subprocess
import sys

import pytest
import torch

import fastrnn
import gpu_checks
from fastrnn.backends import ops
from parity import assert_close, reset_mask

pytest.importorskip("triton")
from fastrnn.backends.triton import recurrence as rec  # noqa: E402

# An installed triton whose interpreter breaks with the installed numpy would otherwise only drop the
# CPU device from the backend and skip this file: fail the collection instead, with the reason.
if rec.interpreter_problem():
    pytest.fail(f"the triton interpreter cannot run here: {rec.interpreter_problem()}", pytrace=False)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    "triton" not in fastrnn.available_backends(DEVICE), reason=f"the triton backend cannot run on {DEVICE} here"
)

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
FWD_OUT = {"lstm": ("y", "h_n", "c_n", "gates", "cs"), "gru": ("y", "h_n", "saved"), "rnn": ("y", "h_n")}
BWD_OUT = {"lstm": ("dgx", "dh0", "dc0", "dw_hr"), "gru": ("dgx", "dgh", "dh0"), "rnn": ("dgx", "dh0")}


def family(cell):
    return cell.split("_")[0]


def make_case(cell, T, B, H, P=0, lengths=None, reverse=False, bias=True, dtype=torch.float64, seed=0, resets=None):
    """(forward op name, its arguments, a function of the forward outputs -> (backward op name, arguments)).
    resets: the kind of reset_mask."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=DEVICE)

    Hout = P or H
    G = GATES[cell]
    lens = torch.tensor(lengths, dtype=torch.int64, device=DEVICE) if lengths is not None else None
    rst = reset_mask(resets, T, B, seed)
    rst = rst.to(DEVICE) if rst is not None else None
    # W_hh at 1/sqrt(H) keeps the recurrence away from saturation, so gradients stay informative.
    gx, w, h0 = r(T, B, G * H), r(G * H, Hout, scale=H**-0.5), r(B, Hout)
    dy, dh_n = r(T, B, Hout), r(B, Hout)
    if cell == "lstm":
        c0, w_hr, dc_n = r(B, H), (r(Hout, H, scale=H**-0.5) if P else None), r(B, H)
        fwd = (gx, w, h0, c0, w_hr, lens, rst, reverse, True)

        def bwd(out):
            return "lstm_bwd", (dy, dh_n, dc_n, w, c0, w_hr, out[3], out[4], lens, rst, reverse)
        return "lstm_fwd", fwd, bwd
    if cell == "gru":
        fwd = (gx, w, r(3 * H) if bias else None, h0, lens, rst, reverse, True)

        def bwd(out):
            return "gru_bwd", (dy, dh_n, w, out[0], h0, out[2], lens, rst, reverse)
        return "gru_fwd", fwd, bwd
    relu = cell == "rnn_relu"

    def bwd(out):
        return "rnn_bwd", (dy, dh_n, w, out[0], lens, rst, reverse, relu)
    return "rnn_fwd", (gx, w, h0, lens, rst, reverse, relu), bwd


@pytest.fixture
def poison(monkeypatch):
    """Every tensor the ops allocate with new_empty (outputs and workspaces) starts as NaN."""
    new_empty = torch.Tensor.new_empty

    def poisoned(self, *args, **kwargs):
        t = new_empty(self, *args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned)


def run_both(cell, case, kind):
    """Forward and backward of the triton ops (kernel path `kind`) and of the reference ops, the backward
    of both fed the reference forward's saved tensors."""
    fwd_name, fwd_args, bwd_of = case
    with rec.force_kernel(kind):
        out = ops("triton")[fwd_name](*fwd_args)
    ref = ops("reference")[fwd_name](*fwd_args)
    bwd_name, bwd_args = bwd_of(ref)
    with rec.force_kernel(kind):
        bout = ops("triton")[bwd_name](*bwd_args)
    bref = ops("reference")[bwd_name](*bwd_args)
    names = FWD_OUT[family(cell)] + BWD_OUT[family(cell)]
    return dict(zip(names, tuple(ref) + tuple(bref))), dict(zip(names, tuple(out) + tuple(bout)))


LENGTHS5 = [4, 1, 0, 3, 2]  # every kind of row: full, short, empty, and unsorted
CASES = [
    pytest.param("lstm", dict(T=4, B=5, H=37, lengths=LENGTHS5), id="lstm-T4-B5-H37-lengths"),
    pytest.param("lstm", dict(T=4, B=5, H=37, lengths=LENGTHS5, reverse=True), id="lstm-T4-B5-H37-lengths-rev"),
    pytest.param("lstm", dict(T=3, B=1, H=37, P=19, reverse=True), id="lstm-T3-B1-H37-proj19-rev"),
    pytest.param("lstm", dict(T=4, B=3, H=37, P=5, lengths=[2, 4, 3]), id="lstm-T4-B3-H37-proj5-lengths"),
    pytest.param("lstm", dict(T=1, B=2, H=17), id="lstm-T1-B2-H17"),
    pytest.param("gru", dict(T=4, B=5, H=37, lengths=LENGTHS5, reverse=True), id="gru-T4-B5-H37-lengths-rev"),
    pytest.param("gru", dict(T=4, B=5, H=37, lengths=LENGTHS5), id="gru-T4-B5-H37-lengths"),
    pytest.param("gru", dict(T=2, B=1, H=37, bias=False), id="gru-T2-B1-H37-nobias"),
    pytest.param("rnn_tanh", dict(T=4, B=5, H=37, reverse=True), id="rnn_tanh-T4-B5-H37-rev"),
    pytest.param("rnn_relu", dict(T=4, B=5, H=37, lengths=LENGTHS5, reverse=True), id="rnn_relu-T4-B5-H37-lengths-rev"),
]
KINDS = ["step", "persistent"]
# The persistent kernels hold all of W_hh on chip. At H=37 (padded to 64) the fp64 LSTM backward needs
# 205-238 KB of shared memory on sm_90 (compile_check with the launch's specialisation; 237,824 B under
# triton 3.6), over the 232,448 B an H100/H200 block may use, and forcing it is an error
# (test_forced_persistent_that_cannot_fit_is_a_clear_error). The persistent cases therefore use H=29
# (padded to 32): 45-78 KB (test_forced_persistent_test_sizes_fit_sm90). Still two K slabs and masks.
PERSISTENT_H = 29


def kind_cases(kind):
    """CASES as forced onto `kind`: the persistent kernel at sizes that fit a GPU."""
    out = []
    for p in CASES:
        (cell, sizes), case_id = p.values, p.id
        if kind == "persistent" and sizes["H"] > PERSISTENT_H:
            case_id = case_id.replace(f"H{sizes['H']}", f"H{PERSISTENT_H}")
            sizes = dict(sizes, H=PERSISTENT_H)
        out.append(pytest.param(cell, sizes, kind, id=f"{case_id}-{kind}"))
    return out


# fp64: the kernels and the reference differ only in summation order (observed <= 3e-15).
FP64_TOL = dict(atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("cell,sizes,kind", kind_cases("step") + kind_cases("persistent"))
def test_ops_match_reference_fp64(cell, sizes, kind, poison):
    ref, out = run_both(cell, make_case(cell, **sizes), kind)
    for name in ref:
        assert_close(f"{kind}:{name}", ref[name], out[name], **FP64_TOL)


# Episode resets (issue 15): the mask inside every kernel, against the reference backend's _cut_at_resets.
RESET_CASES = [
    pytest.param("lstm", dict(T=4, B=5, H=37, lengths=LENGTHS5, resets="random"), id="lstm-lengths-random"),
    pytest.param("lstm", dict(T=4, B=5, H=37, lengths=LENGTHS5, reverse=True, resets="random"),
                 id="lstm-lengths-rev-random"),
    pytest.param("lstm", dict(T=4, B=3, H=37, P=5, lengths=[2, 4, 3], resets="random"), id="lstm-proj5-lengths-random"),
    pytest.param("lstm", dict(T=3, B=2, H=37, P=19, reverse=True, resets="first"), id="lstm-proj19-rev-first"),
    pytest.param("lstm", dict(T=3, B=2, H=37, resets="first"), id="lstm-first"),
    pytest.param("lstm", dict(T=3, B=2, H=37, resets="last"), id="lstm-last"),
    pytest.param("lstm", dict(T=3, B=2, H=37, lengths=[3, 2], resets="all"), id="lstm-lengths-all"),
    pytest.param("gru", dict(T=4, B=5, H=37, lengths=LENGTHS5, reverse=True, resets="random"),
                 id="gru-lengths-rev-random"),
    pytest.param("gru", dict(T=4, B=5, H=37, lengths=LENGTHS5, resets="random"), id="gru-lengths-random"),
    pytest.param("gru", dict(T=3, B=2, H=37, bias=False, resets="all"), id="gru-nobias-all"),
    pytest.param("rnn_tanh", dict(T=4, B=5, H=37, reverse=True, resets="random"), id="rnn_tanh-rev-random"),
    pytest.param("rnn_relu", dict(T=4, B=5, H=37, lengths=LENGTHS5, resets="last"), id="rnn_relu-lengths-last"),
]


def reset_kind_cases():
    out = []
    for kind in KINDS:
        for p in RESET_CASES:
            (cell, sizes), case_id = p.values, p.id
            if kind == "persistent":  # sizes that fit a GPU block (PERSISTENT_H above)
                sizes = dict(sizes, H=min(sizes["H"], PERSISTENT_H))
            out.append(pytest.param(cell, sizes, kind, id=f"{case_id}-{kind}"))
    return out


@pytest.mark.parametrize("cell,sizes,kind", reset_kind_cases())
def test_resets_match_reference_fp64(cell, sizes, kind, poison):
    ref, out = run_both(cell, make_case(cell, **sizes), kind)
    for name in ref:
        assert_close(f"{kind}:{name}", ref[name], out[name], **FP64_TOL)
    # The mask changes the result here (else this test could not catch a kernel that ignores it).
    no_resets, _ = run_both(cell, make_case(cell, **dict(sizes, resets=None)), kind)
    changed = [name for name in ref if not torch.equal(ref[name], no_resets[name])]
    assert "y" in changed and any(n.startswith("d") for n in changed), f"resets changed only {changed}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cell,sizes", [
    pytest.param("lstm", dict(T=4, B=3, H=20, P=9, lengths=[4, 2, 3]), id="lstm-proj9-lengths"),
    pytest.param("lstm", dict(T=4, B=3, H=20, reverse=True), id="lstm-rev"),
    pytest.param("gru", dict(T=4, B=3, H=20, lengths=[4, 2, 3], reverse=True), id="gru-lengths-rev"),
    pytest.param("rnn_relu", dict(T=4, B=3, H=20), id="rnn_relu"),
])
def test_all_false_resets_equal_none_bit_for_bit(cell, sizes, kind):
    """An all-false mask gives the result of resets=None exactly (fp32: any difference in the order of
    operations would show in the last bits)."""
    _, none = run_both(cell, make_case(cell, dtype=torch.float32, **sizes), kind)
    _, all_false = run_both(cell, make_case(cell, dtype=torch.float32, resets="none", **sizes), kind)
    for name in none:
        assert torch.equal(none[name], all_false[name]), f"{kind}:{name} differs with an all-false mask"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_resets_in_low_precision(dtype):
    """fp32 and bf16 with resets and lengths: both paths agree with each other as without resets
    (PATH_TOL), and fp32 also with the reference."""
    case = make_case("lstm", T=5, B=3, H=20, P=9, lengths=[5, 2, 4], resets="random", dtype=dtype)
    ref, step = run_both("lstm", case, "step")
    _, persistent = run_both("lstm", case, "persistent")
    for name in step:
        assert step[name].dtype == dtype, f"{name} is {step[name].dtype}"
        assert_close(f"persistent-vs-step:{name}", step[name].double(), persistent[name].double(), **PATH_TOL[dtype])
        if dtype == torch.float32:
            assert_close(f"step-vs-reference:{name}", ref[name], step[name], **PATH_TOL[dtype])


# The two paths round at the same points (the state to the storage dtype before each GEMM, dgx before the
# recurrent GEMM), so they differ only by the summation order inside the GEMMs: a rounding flip of one ulp
# somewhere, carried a few steps. Tolerances: 1e-5 for fp32 (as the parity suite's); 2 ulps at 1 for
# fp16 (2 * 2^-10) and bf16 (2 * 2^-7).
PATH_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
            torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}


@pytest.mark.parametrize("dtype", list(PATH_TOL), ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("cell,sizes", [
    pytest.param("lstm", dict(T=5, B=3, H=20, P=9, lengths=[5, 2, 4]), id="lstm-proj9-lengths"),
    pytest.param("lstm", dict(T=5, B=3, H=20, reverse=True), id="lstm-rev"),
    pytest.param("gru", dict(T=5, B=3, H=20, lengths=[5, 2, 4], reverse=True), id="gru-lengths-rev"),
    pytest.param("rnn_tanh", dict(T=5, B=3, H=20), id="rnn_tanh"),
])
def test_step_and_persistent_paths_agree(cell, sizes, dtype):
    case = make_case(cell, dtype=dtype, **sizes)
    ref_step, step = run_both(cell, case, "step")
    _, persistent = run_both(cell, case, "persistent")
    for name in step:
        assert step[name].dtype == dtype, f"{name} is {step[name].dtype}"
        assert_close(f"persistent-vs-step:{name}", step[name].double(), persistent[name].double(), **PATH_TOL[dtype])
    if dtype == torch.float32:
        for name in step:
            assert_close(f"step-vs-reference:{name}", ref_step[name], step[name], **PATH_TOL[dtype])


# The overflow is the point of the test; numpy (the interpreter) warns about it, a GPU does not.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_saturated_gates_stay_finite_and_exact(cell, dtype):
    """Pre-activations of +-200 overflow exp() in every activation: the result must be exactly 0, 1 or -1,
    never NaN (inf/inf), in both paths."""
    fwd_name, fwd_args, _ = make_case(cell, T=3, B=2, H=20, dtype=dtype)
    gx = fwd_args[0]
    fwd_args = (torch.where(gx > 0, 200.0, -200.0).to(dtype),) + fwd_args[1:]
    ref = ops("reference")[fwd_name](*fwd_args)
    for kind in KINDS:
        with rec.force_kernel(kind):
            out = ops("triton")[fwd_name](*fwd_args)
        for name, a, b in zip(FWD_OUT[family(cell)], ref, out):
            assert torch.isfinite(b).all(), f"{kind}:{name} has non-finite values"
            assert_close(f"{kind}:{name}", a.double(), b.double(), **PATH_TOL[dtype])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cell", list(GATES))
def test_empty_batch_returns_empty_outputs_and_passes_state(cell, kind):
    fwd_name, fwd_args, bwd_of = make_case(cell, T=3, B=0, H=5, P=2 if cell == "lstm" else 0)
    with rec.force_kernel(kind):
        out = ops("triton")[fwd_name](*fwd_args)
        bwd_name, bwd_args = bwd_of(out)
        bout = ops("triton")[bwd_name](*bwd_args)
    ref = ops("reference")[fwd_name](*fwd_args)
    bref = ops("reference")[bwd_name](*bwd_args)
    for name, a, b in zip(FWD_OUT[family(cell)] + BWD_OUT[family(cell)], tuple(ref) + tuple(bref), out + bout):
        assert a.shape == b.shape, f"{name}: {tuple(b.shape)} instead of {tuple(a.shape)}"
        assert_close(name, a, b, **FP64_TOL)


def lstm_args(T=3, B=2, H=5, dtype=torch.float64):
    return list(make_case("lstm", T=T, B=B, H=H, dtype=dtype)[1])


@pytest.mark.parametrize("change,error,match", [
    (lambda a: a.__setitem__(1, a[1][:, :-1]), ValueError, r"lstm_fwd: w_hh has shape \(20, 4\), expected \(20, 5\)"),
    (lambda a: a.__setitem__(0, a[0][0]), ValueError, r"lstm_fwd: gx must be \[T, B, \*\]"),
    (lambda a: a.__setitem__(0, a[0][..., :-1]), ValueError, r"gx has 19 columns, expected 4\*H"),
    (lambda a: a.__setitem__(3, a[3].float()), TypeError, r"c0 is torch.float32 .* expected torch.float64"),
    (lambda a: a.__setitem__(5, torch.tensor([3, 1], dtype=torch.int32, device=DEVICE)), TypeError,
     "lengths must be int64"),
    (lambda a: a.__setitem__(5, torch.tensor([3, 1, 2], device=DEVICE)), ValueError, r"lengths has shape \(3,\)"),
    (lambda a: a.__setitem__(2, a[2][:, :3]), ValueError, "without w_hr, h0 must have H=5 columns"),
    (lambda a: a.__setitem__(6, torch.zeros(3, 2, dtype=torch.uint8, device=DEVICE)), TypeError,
     r"lstm_fwd: resets must be bool on .*, got torch.uint8"),
    (lambda a: a.__setitem__(6, torch.zeros(2, 3, dtype=torch.bool, device=DEVICE)), ValueError,
     r"lstm_fwd: resets has shape \(2, 3\), expected \(3, 2\)"),
    (lambda a: a.__setitem__(6, torch.zeros(3, dtype=torch.bool, device=DEVICE)), ValueError,
     r"resets has shape \(3,\), expected \(3, 2\)"),
    (lambda a: a.__setitem__(6, torch.zeros(2, 3, dtype=torch.bool, device=DEVICE).t()), ValueError,
     r"lstm_fwd: resets must be contiguous"),
])
def test_bad_input_is_a_clear_error(change, error, match):
    args = lstm_args()
    change(args)
    with pytest.raises(error, match=match):
        ops("triton")["lstm_fwd"](*args)


RESETS_AT = {"lstm_fwd": 6, "lstm_bwd": 9, "gru_fwd": 5, "gru_bwd": 7, "rnn_fwd": 4, "rnn_bwd": 5}


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_bad_resets_in_every_op_are_clear_errors(cell):
    """Every op validates its mask (check_inputs): a [B, T] mask and an int mask, forward and backward."""
    fwd_name, fwd_args, bwd_of = make_case(cell, T=3, B=2, H=5, resets="random")
    bwd_name, bwd_args = bwd_of(ops("reference")[fwd_name](*fwd_args))
    for name, args in ((fwd_name, fwd_args), (bwd_name, bwd_args)):
        i = RESETS_AT[name]
        assert args[i] is not None and args[i].shape == (3, 2), f"{name}: resets is not argument {i}"
        bad = list(args)
        bad[i] = args[i].t().contiguous()
        with pytest.raises(ValueError, match=rf"{name}: resets has shape \(2, 3\), expected \(3, 2\)"):
            ops("triton")[name](*bad)
        bad[i] = args[i].to(torch.int64)
        with pytest.raises(TypeError, match=rf"{name}: resets must be bool on .*, got torch.int64"):
            ops("triton")[name](*bad)


def test_resets_on_another_device_is_a_clear_error():
    """The launcher itself (through the op, a meta tensor among the arguments sends the call to the fake
    kernel; on a GPU machine a CPU mask with CUDA tensors takes this path)."""
    from fastrnn.backends.triton import lstm

    args = lstm_args()
    args[6] = torch.zeros(3, 2, dtype=torch.bool, device="meta")
    with pytest.raises(TypeError, match=rf"lstm_fwd: resets must be bool on {DEVICE}.*, got torch.bool on meta"):
        lstm.lstm_fwd(*args)


def test_unsupported_dtype_is_a_clear_error():
    x = torch.zeros(2, 1, 4, dtype=torch.int32, device=DEVICE)
    with pytest.raises(TypeError, match="dtype torch.int32 is not supported"):
        ops("triton")["rnn_fwd"](x, torch.zeros(4, 4, dtype=torch.int32, device=DEVICE),
                                 torch.zeros(1, 4, dtype=torch.int32, device=DEVICE), None, None, False, False)


@pytest.mark.parametrize("G,H,dtype,persistent", [
    (4, 64, torch.float16, True),     # 4*64*64*2 B = 32 KiB of W_hh
    (4, 128, torch.float16, False),   # 128 KiB: spills on sm_80/sm_90 (compile_check)
    (4, 64, torch.bfloat16, True),    # widened to fp32 on chip: 64 KiB, the limit
    (4, 32, torch.float32, True),     # 16 KiB, the limit for an fp32 GEMM without TF32 (FMAs)
    (4, 64, torch.float32, False),    # 64 KiB of FMA operands
    (4, 32, torch.float64, True),     # 32 KiB
    (4, 64, torch.float64, False),    # 128 KiB
    (3, 37, torch.float16, True),     # H padded to 64: 24 KiB
    (1, 128, torch.float16, True),    # 32 KiB
])
def test_plan_runs_persistent_only_when_the_weights_fit(G, H, dtype, persistent):
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert rec.plan(B=8, H=H, Hout=H, G=G, proj=False, dtype=dtype).persistent is persistent
    finally:
        torch.set_float32_matmul_precision(before)


def test_plan_pads_small_projections_and_keeps_fp64_projections_small():
    """Sizes the launch-exact compile check found spilling (docs/triton.md): proj_size <= 16 next to
    HP = 64..256, and fp64 LSTM with a projection at HP = 32."""
    p = rec.plan(8, 64, 16, 4, True, torch.float16)
    assert p.persistent and (p.HP, p.OP) == (64, 32), p
    assert not rec.plan(8, 128, 16, 4, True, torch.float16).persistent, "OP=64: 80 KiB of weights"
    assert rec.plan(8, 16, 8, 4, True, torch.float64).persistent
    assert not rec.plan(8, 32, 16, 4, True, torch.float64).persistent
    assert rec.plan(8, 32, 32, 4, False, torch.float64).persistent, "without a projection the 64 KiB budget"


def test_tf32_only_behind_torchs_switch():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert rec.plan(8, 64, 64, 4, False, torch.float32).prec == "ieee"
        torch.set_float32_matmul_precision("high")
        tf32 = rec.plan(8, 64, 64, 4, False, torch.float32)
        assert tf32.prec == "tf32"
        assert tf32.persistent, "with TF32 an fp32 GEMM is an MMA and gets the 64 KiB budget"
        assert rec.plan(8, 64, 64, 4, False, torch.float64).prec == "ieee"
    finally:
        torch.set_float32_matmul_precision(before)


def test_devices_follow_the_interpreter_and_cuda():
    assert ("cpu" in rec.devices()) == (rec.interpreting() and rec.interpreter_problem() is None)
    assert ("cuda" in rec.devices()) == torch.cuda.is_available()


@pytest.mark.parametrize("triton_version,numpy_version,ok", [
    ("3.6.0", "2.4.6", False),  # seen: 33 tests failed (int() of a one-element array)
    ("3.6.0", "2.3.5", True),
    ("3.9.0", "2.4.6", True),   # this machine
    ("3.10.1", "2.5.0", True),
])
def test_interpreter_refuses_the_triton_numpy_pair_that_breaks_it(monkeypatch, triton_version, numpy_version, ok):
    import numpy
    import triton

    monkeypatch.setattr(rec, "interpreting", lambda: True)
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    problem = rec.interpreter_problem()
    assert (problem is None) == ok, problem
    if not ok:
        assert "install triton>=3.9 or numpy<2.4" in problem
        assert "cpu" not in rec.devices()


def test_forced_persistent_that_cannot_fit_is_a_clear_error(monkeypatch):
    """The check is on the compiled kernel's shared memory (faked here: no GPU compiles here) against the
    device's limit: forced, it raises; chosen by the plan, the op runs the step kernels instead."""
    calls = []

    def needs(kernel, grid, args, meta):
        calls.append(kernel.__name__)
        return 237_824

    monkeypatch.setattr(rec, "compiled_shared_memory", needs)
    monkeypatch.setattr(rec, "shared_memory_limit", lambda device: 232_448)
    fwd_name, fwd_args, _ = make_case("lstm", T=3, B=2, H=5)
    with rec.force_kernel("persistent"), pytest.raises(
            rec.PersistentDoesNotFit, match=r"lstm_fwd: force_kernel\('persistent'\), but lstm_fwd_persistent_kernel "
            r"needs 237824 B of shared memory here \(HP=16, OP=16\) and .* allows 232448 B per block"):
        ops("triton")[fwd_name](*fwd_args)
    assert rec.plan(2, 5, 5, 4, False, torch.float64).persistent, "the plan would run this size persistent"
    auto = ops("triton")[fwd_name](*fwd_args)
    assert calls == ["lstm_fwd_persistent_kernel"] * 2
    with rec.force_kernel("step"):
        step = ops("triton")[fwd_name](*fwd_args)
    for name, a, b in zip(FWD_OUT["lstm"], auto, step):
        assert torch.equal(a, b), f"{name}: the fall-back did not run the step kernels"


def test_backend_auto_never_picks_the_interpreter():
    assert fastrnn.backends.resolve("auto", "cpu") != "triton"


@pytest.mark.parametrize("resets", [None, "random"])
@pytest.mark.parametrize("cell", list(GATES))
def test_opcheck(cell, resets):
    fwd_name, fwd_args, bwd_of = make_case(cell, T=3, B=2, H=5, P=3 if cell == "lstm" else 0, lengths=[3, 1],
                                           resets=resets)
    torch.library.opcheck(ops("triton")[fwd_name], fwd_args)
    bwd_name, bwd_args = bwd_of(ops("reference")[fwd_name](*fwd_args))
    torch.library.opcheck(ops("triton")[bwd_name], bwd_args)


def test_compile_sees_one_op_for_every_length():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(gx, w_hh, h0, c0):
        y, h_n, c_n, _, _ = ops("triton")["lstm_fwd"](gx, w_hh, h0, c0, None, None, None, False, False)
        return y.sum() + h_n.sum() + c_n.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, backend=backend, fullgraph=True, dynamic=True)
    for T in (3, 5, 8):  # never T == B: duck sizing would tie them and recompile
        args = lstm_args(T=T)[:4]
        torch.testing.assert_close(compiled(*args), f(*args), atol=1e-12, rtol=1e-12)
    assert len(graphs) == 1, f"{len(graphs)} graphs for 3 sequence lengths"
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.fastrnn_triton.lstm_fwd.default) == 1, f"the op is not one node: {targets}"


def run_compile_check(*args):
    env = dict(os.environ, TRITON_INTERPRET="0")
    cmd = [sys.executable, "-m", "fastrnn.backends.triton.compile_check", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    header, *rows = [line.split(",") for line in proc.stdout.splitlines() if line.count(",") > 10]
    return [dict(zip(header, row)) for row in rows]


H100_SHARED_MEMORY = 232_448  # bytes per block (227 KiB opt-in), H100 and H200
# docs/triton.md's resource table: at most 16 B spilled by any kernel the plan chooses with triton 3.9 (a
# register or two around a K loop); the spills removed in issue 13 were 248 B to 8 KB.
SPILL_ALLOWANCE = 16


@pytest.mark.slow
def test_forced_persistent_test_sizes_fit_sm90():
    """The persistent sizes test_ops_match_reference_fp64 forces compile, with the specialisation their
    launches get, to kernels that fit an H100/H200 block's shared memory."""
    cases = []
    for p in kind_cases("persistent"):
        cell, sizes, _ = p.values
        op = family(cell)
        for direction in ("fwd", "bwd"):
            cases.append(f"{op}_{direction}:persistent:{sizes['T']}:{sizes['B']}:{sizes['H']}:{sizes.get('P', 0)}:fp64")
    rows = run_compile_check("--arch", "90", "--resets", "no", "yes", "--case", *sorted(set(cases)))
    assert len(rows) == 2 * len(set(cases)), rows
    for r in rows:
        assert int(r["smem_bytes"]) <= H100_SHARED_MEMORY, f"{r['kernel']} at H={r['H']}: {r['smem_bytes']} B"


@pytest.mark.slow
def test_every_kernel_compiles_for_sm80_and_sm90():
    """triton.compile of every kernel the launchers choose, for real GPU targets (interpreter off, in a
    subprocess): bf16 takes the tf32 MMA path, fp64 the fp64 one; also checks do_not_specialize on s."""
    rows = run_compile_check("--arch", "80", "90", "--dtype", "bf16", "fp64")
    assert len(rows) >= 2 * 2 * 18, f"too few kernels compiled: {len(rows)}"
    # With a reset mask (HAS_RESETS=True, issue 15): sm_90 only, the machine the GPU runs use.
    with_resets = run_compile_check("--arch", "90", "--dtype", "bf16", "fp64", "--resets", "yes")
    assert len(with_resets) == len([r for r in rows if r["arch"] == "sm_90"]), "not every kernel with resets"
    rows += with_resets
    spills = [r for r in rows if int(r["stack_bytes"]) + int(r["local_bytes"]) > SPILL_ALLOWANCE]
    assert not spills, "spilling kernels:\n" + "\n".join(",".join(r.values()) for r in spills)
    # The launch's specialisation reached the compiler: H=512 is divisible by 16 and hinted, H=500 not.
    step = {(r["B"], r["H"]): r["specialisation"] for r in rows
            if r["kernel"] == "rnn_fwd_step_kernel" and r["dtype"] == "bf16"}
    assert " H:i32/16 " in step[("64", "512")] and " H:i32 " in step[("5", "500")], step


# ---------------------------------------------------------------------------------------------------------
# On a GPU (issue 13): CUDA-graph capture of both kernel paths, and the device guard of every launch.


@pytest.mark.gpu
@gpu_checks.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_graph_capture_and_replay(kind, dtype):
    with rec.force_kernel(kind):
        gpu_checks.graph_replay_matches_eager("triton", dtype)


@pytest.mark.gpu
@gpu_checks.needs_two_gpus
@pytest.mark.parametrize("kind", KINDS)
def test_launches_on_the_tensors_device(kind):
    with rec.force_kernel(kind):
        gpu_checks.runs_on_the_tensors_device("triton")


@pytest.mark.gpu
@gpu_checks.needs_cuda
def test_forced_persistent_at_the_shared_memory_edge_runs_or_refuses_clearly():
    """The fp64 LSTM backward at H=37 (HP=64) compiles to 237,824 B of shared memory with triton 3.6 on
    sm_90 and 205,056 B with 3.9, either side of an H100/H200 block's 232,448 B. Forced, it must either
    run and match the reference, or raise PersistentDoesNotFit with both numbers; not triton's
    OutOfResources at launch (what happened before issue 13)."""
    case = make_case("lstm", T=4, B=5, H=37, lengths=LENGTHS5)
    try:
        ref, out = run_both("lstm", case, "persistent")
    except rec.PersistentDoesNotFit as e:
        assert re.search(r"lstm_bwd: .* needs \d+ B of shared memory here .* allows \d+ B per block", str(e)), e
        return
    for name in ref:
        assert_close(f"persistent:{name}", ref[name], out[name], **FP64_TOL)
