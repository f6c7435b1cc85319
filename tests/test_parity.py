"""The parity suite: every backend, every forward form, against torch.nn in fp64 with the same state_dict.

A backend joins by being reported by fastrnn.available_backends (conftest.backend_params).
"""

import copy

import pytest
import torch

from conftest import backend_params, case_params, interpreted
from parity import (
    FP32_TOL, FP64_TOL, Case, assert_all_close, make_inputs, make_pair, max_errors, output_shapes, run, run_case,
)

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")

# Shapes and forms, crossed with every cell. Each line pairs several features so that the suite covers
# layers {1,2,3} x bidirectional x batch_first x bias x packed (sorted/unsorted, lengths 1..T) x unbatched
# x hx-or-not without the full cartesian product; odd sizes on purpose (H=37, T=1, T=63, B=1, B=0).
FORMS = [
    dict(),
    dict(layers=2, bidirectional=True, batch_first=True),
    dict(layers=3, bias=False, hx=False),
    dict(layers=2, packed="sorted", T=7, B=4),
    dict(layers=2, bidirectional=True, packed="unsorted", T=7, B=5),
    dict(bidirectional=True, batch_first=True, packed="unsorted", T=6, B=4, bias=False),
    dict(layers=2, bidirectional=True, unbatched=True),
    dict(bidirectional=True, unbatched=True, batch_first=True, hx=False),
    dict(T=1, B=1, H=37, bidirectional=True),
    dict(T=1, B=2, packed="unsorted"),
    dict(B=0, layers=2, bidirectional=True),
    dict(T=63, B=5, H=37, I=7, bidirectional=True, packed="unsorted"),
]
PROJ_FORMS = [
    dict(proj=3),
    dict(proj=4, layers=2, bidirectional=True, packed="unsorted", T=7, B=5),
    dict(proj=2, unbatched=True, bidirectional=True, batch_first=True),
]

CASES = [Case(cell, **form) for cell in CELLS for form in FORMS] + [Case("lstm", **form) for form in PROJ_FORMS]



@pytest.mark.parametrize("case,device,backend", case_params(CASES))
def test_parity_fp64(case, device, backend):
    ref, out = run_case(case, backend, device, torch.float64)
    assert_all_close(ref, out, **FP64_TOL)


FP32_CASES = [c for c in CASES if c.T < 63] + [Case("lstm", T=63, B=5, H=37, I=7, proj=5, bidirectional=True)]


@pytest.mark.parametrize("case,device,backend", case_params(FP32_CASES[::3]))
def test_parity_fp32(case, device, backend):
    ref, out = run_case(case, backend, device, torch.float32)
    assert_all_close(ref, out, **FP32_TOL)


LOW_CASES = [
    Case(cell, T=20, B=4, I=16, H=32, layers=2, bidirectional=True, packed="unsorted") for cell in CELLS
] + [Case("lstm", T=20, B=4, I=16, H=32, proj=8, bidirectional=True)]
# The same forms at a size the Triton interpreter runs in seconds (fp16/bf16 tiles need H >= 16 to matter).
LOW_CASES_SMALL = [
    Case(cell, T=5, B=3, I=8, H=16, bidirectional=True, packed="unsorted") for cell in CELLS
] + [Case("lstm", T=5, B=3, I=8, H=16, proj=4)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case,device,backend", case_params(LOW_CASES, LOW_CASES_SMALL))
def test_parity_low_precision(case, device, backend, dtype):
    """The flash-attention rule: fastrnn's error against the fp64 oracle is at most twice torch.nn's own
    error in the same dtype on the same device (plus a floor of a few ulps for tensors torch gets exact)."""
    x, state, lengths = make_inputs(case)
    oracle, model = make_pair(case, backend, dtype, device)
    torch_low = copy.deepcopy(oracle).to(device=device, dtype=dtype)
    weights = [torch.randn(s, dtype=torch.float64) for s in output_shapes(case, x, lengths)]
    results = {
        name: run(module, case, x, state, lengths, weights, dev, dt)
        for name, module, dev, dt in (("oracle", oracle, "cpu", torch.float64), ("torch", torch_low, device, dtype),
                                      ("fastrnn", model, device, dtype))
    }
    ours, theirs = max_errors(results["oracle"], results["fastrnn"]), max_errors(results["oracle"], results["torch"])
    eps = torch.finfo(dtype).eps
    for name in ours:
        assert not torch.isnan(results["fastrnn"][name]).any(), f"{name}: NaN"
        scale = float(results["oracle"][name].abs().max()) or 1.0
        bound = 2 * theirs[name] + 4 * eps * scale
        assert ours[name] <= bound, (
            f"{name}: error {ours[name]:.3g} vs torch.nn {dtype} {theirs[name]:.3g} (bound {bound:.3g})"
        )


# gradcheck runs ~700 forwards: not under the Triton interpreter, where test_parity_fp64 already checks
# every gradient of the interpreted kernels against the fp64 oracle.
@pytest.mark.parametrize("device,backend", [p for p in backend_params() if not interpreted(*p.values)])
@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck(cell, device, backend):
    """torch.autograd.gradcheck through the module (input, state and every parameter) in fp64."""
    case = Case(cell, T=4, B=3, I=3, H=4, layers=2, bidirectional=True, packed="unsorted",
                proj=2 if cell == "lstm" else 0)
    x, state, lengths = make_inputs(case)
    _, model = make_pair(case, backend, torch.float64, device)
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    states = list(state) if isinstance(state, tuple) else [state]

    def f(x, *rest):
        st, ps = rest[: len(states)], rest[len(states):]
        hx = tuple(st) if cell == "lstm" else st[0]
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, hidden = torch.func.functional_call(model, dict(zip(names, ps)), (packed, hx))
        hidden = hidden if isinstance(hidden, tuple) else (hidden,)
        return (out.data, *hidden)

    inputs = [t.to(device).requires_grad_() for t in [x, *states]] + [p.to(device) for p in params]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", backend_params())
def test_non_finite_propagates(device, backend):
    """inf/NaN in the input reach the outputs as in torch.nn (no silent clamping)."""
    case = Case("lstm", T=4, B=3)
    x, state, _ = make_inputs(case)
    x[1, 0, 0] = float("nan")
    x[2, 1, 0] = float("inf")
    oracle, model = make_pair(case, backend, torch.float64, device)
    with torch.no_grad():
        y_ref, _ = oracle(x, state)
        y, _ = model(x.to(device), tuple(s.to(device) for s in state))
    assert torch.equal(torch.isnan(y.cpu()), torch.isnan(y_ref))
    assert torch.equal(torch.isinf(y.cpu()), torch.isinf(y_ref))


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("cell", CELLS)
def test_inference_path_matches(cell, device, backend):
    """Under no_grad the forward ops skip saving activations (save=False): the outputs must not change."""
    case = Case(cell, T=6, B=4, layers=2, bidirectional=True, packed="unsorted", proj=3 if cell == "lstm" else 0)
    x, state, lengths = make_inputs(case)
    _, model = make_pair(case, backend, torch.float64, device)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x.to(device), lengths, enforce_sorted=False)
    hx = tuple(s.to(device) for s in state) if isinstance(state, tuple) else state.to(device)
    with torch.no_grad():
        y_inf, h_inf = model(packed, hx)
    y, h = model(packed, hx)
    assert y.data.requires_grad
    torch.testing.assert_close(y_inf.data, y.data.detach(), atol=0, rtol=0)
    torch.testing.assert_close(h_inf, tuple(t.detach() for t in h) if isinstance(h, tuple) else h.detach(),
                               atol=0, rtol=0)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("cell", CELLS)
def test_input_bias_in_the_op_is_the_bias_added_to_gx(cell, dtype, device, backend):
    """The forward ops' b_gx (docs/contract.md) gives the bits of the same bias added to gx beforehand (fp32 and
    fp64 sum in the same order), with lengths, resets and reverse, saving or not. The cpu backend's modules pass
    their input bias there (autograd.split_input_bias), so the parity suite checks it through the modules too."""
    from fastrnn.backends import ops

    T, B, H = 5, 3, 6
    gates = {"lstm": 4, "gru": 3}.get(cell, 1)
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.rand(*shape, generator=g, dtype=dtype) - 0.5).to(device)

    gx, b_gx = rand(T, B, gates * H), rand(gates * H)
    w_hh, h0, c0, b_hh = rand(gates * H, H), rand(B, H), rand(B, H), rand(3 * H)
    lengths = torch.tensor([5, 2, 4], device=device)
    resets = torch.zeros(T, B, dtype=torch.bool)
    resets[2, 0] = resets[3, 2] = True
    resets = resets.to(device)
    fwd = ops(backend)[f"{cell.split('_')[0]}_fwd"]
    for reverse, save in ((False, True), (True, False)):
        def run(gx, *b_gx):
            if cell == "lstm":
                return fwd(gx, w_hh, h0, c0, None, lengths, resets, reverse, save, *b_gx)
            if cell == "gru":
                return fwd(gx, w_hh, b_hh, h0, lengths, resets, reverse, save, *b_gx)
            return fwd(gx, w_hh, h0, lengths, resets, reverse, cell == "rnn_relu", *b_gx)

        with_bias, added = run(gx, b_gx), run(gx + b_gx)
        for name, got, want in zip(("y", "h_n", "c_n or saved", "saved", "saved"), with_bias, added):
            assert torch.equal(got, want), f"{name} (reverse={reverse}, save={save})"
        assert not torch.equal(with_bias[0], run(gx)[0]), "b_gx was not added"
