"""The drop-in surface: construction, state_dict both ways, pickling, repr, convert(), cells, dropout, errors."""

import copy
import io
import os
import pickle
import platform
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
from conftest import backend_params
from parity import (
    FASTRNN_CLASSES, FP32_TOL, FP64_TOL, TORCH_CLASSES, Case, CountOps, assert_all_close, assert_close, make_inputs,
    make_pair, run_case,
)

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
CELL_CLASSES = {
    "lstm": (nn.LSTMCell, fastrnn.LSTMCell),
    "gru": (nn.GRUCell, fastrnn.GRUCell),
    "rnn_tanh": (nn.RNNCell, fastrnn.RNNCell),
    "rnn_relu": (nn.RNNCell, fastrnn.RNNCell),
}


def _kwargs(cell):
    return {"nonlinearity": cell[4:]} if cell.startswith("rnn") else {}


@pytest.mark.parametrize("cell", CELLS)
def test_same_parameters_and_state_dict(cell):
    kw = dict(num_layers=2, bidirectional=True, bias=False, **_kwargs(cell))
    if cell == "lstm":
        kw["proj_size"] = 3
    ours = FASTRNN_CLASSES[cell](5, 7, **kw)
    theirs = TORCH_CLASSES[cell](5, 7, **kw)
    assert isinstance(ours, TORCH_CLASSES[cell])
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in theirs.named_parameters()]
    assert repr(ours) == repr(theirs)
    ours.load_state_dict(theirs.state_dict())  # torch -> fastrnn
    theirs2 = TORCH_CLASSES[cell](5, 7, **kw)
    theirs2.load_state_dict(ours.state_dict())  # fastrnn -> torch
    for (n, a), (_, b) in zip(theirs.state_dict().items(), theirs2.state_dict().items()):
        assert torch.equal(a, b), n


def test_initialisation_matches_torch():
    torch.manual_seed(3)
    theirs = nn.LSTM(5, 7, num_layers=2)
    torch.manual_seed(3)
    ours = fastrnn.LSTM(5, 7, num_layers=2)
    for (n, a), (_, b) in zip(theirs.named_parameters(), ours.named_parameters()):
        assert torch.equal(a, b), n


def test_constructor_errors_are_torchs():
    for args, kw in [((5, 7), dict(proj_size=7)), ((5, 7), dict(num_layers=0)), ((5, 7), dict(dropout=2.0)),
                     ((5, 0), {})]:
        with pytest.raises(ValueError) as theirs:
            nn.LSTM(*args, **kw)
        with pytest.raises(ValueError) as ours:
            fastrnn.LSTM(*args, **kw)
        assert str(ours.value) == str(theirs.value)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        fastrnn.GRU(3, 4, backend="fast")
    with pytest.raises(ValueError, match="Unknown nonlinearity"):
        fastrnn.RNN(3, 4, nonlinearity="gelu")


def test_pickle_and_torch_save_roundtrip():
    model = fastrnn.GRU(4, 6, num_layers=2, backend="reference")
    x = torch.randn(5, 2, 4)
    clone = pickle.loads(pickle.dumps(model))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = fastrnn.GRU(4, 6, num_layers=2, backend="reference")
    fresh.load_state_dict(torch.load(buf))
    assert type(clone) is fastrnn.GRU and clone.backend == "reference"
    assert torch.equal(clone(x)[0], model(x)[0])
    assert torch.equal(fresh(x)[0], model(x)[0])


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.rnn = nn.LSTM(4, 6, batch_first=True, bidirectional=True)
        self.head = nn.Sequential(nn.GRU(12, 5), nn.Linear(5, 3))
        self.cell = nn.RNNCell(3, 3, nonlinearity="relu")


def test_convert_swaps_in_place_and_shares_parameters():
    model = Tagger()
    params_before = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens = torch.randint(0, 10, (2, 7))
    ref = model.rnn(model.embed(tokens))[0]
    assert fastrnn.convert(model, backend="reference") is model
    assert type(model.rnn) is fastrnn.LSTM and type(model.head[0]) is fastrnn.GRU
    assert type(model.cell) is fastrnn.RNNCell and model.cell.nonlinearity == "relu"
    assert all(a is b for a, b in zip(params_before, model.parameters()))
    out = model.rnn(model.embed(tokens))[0]
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    before = model.rnn.weight_hh_l0.detach().clone()
    optimizer.step()  # the optimizer built before convert() updates the converted module's weights
    assert not torch.equal(before, model.rnn.weight_hh_l0)
    assert isinstance(fastrnn.convert(nn.GRU(2, 3)), fastrnn.GRU)


@pytest.mark.parametrize("cell", CELLS)
def test_forward_uses_the_parameters_in_place_now(cell):
    """torch.func.functional_call, a reassigned Parameter and a parametrization: forward reads the module's
    parameters as they are at the call, like torch.nn (whose forward refreshes its _flat_weights)."""
    kw = dict(num_layers=2, **_kwargs(cell))
    ours, theirs = FASTRNN_CLASSES[cell](3, 4, **kw), TORCH_CLASSES[cell](3, 4, **kw)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, 2, 3)
    swapped = {name: torch.randn_like(p) for name, p in theirs.named_parameters()}
    expected = torch.func.functional_call(theirs, swapped, (x,))[0]
    torch.testing.assert_close(torch.func.functional_call(ours, swapped, (x,))[0], expected)
    torch.testing.assert_close(ours(x)[0], theirs(x)[0])  # and back to its own parameters afterwards
    for m in (ours, theirs):
        m.weight_hh_l1 = nn.Parameter(swapped["weight_hh_l1"])
    torch.testing.assert_close(ours(x)[0], theirs(x)[0])
    for m in (ours, theirs):  # a parametrized weight is computed, not stored in _parameters
        torch.nn.utils.parametrize.register_parametrization(m, "weight_ih_l0", _Double())
    torch.testing.assert_close(ours(x)[0], theirs(x)[0])


@pytest.mark.parametrize("cell", CELLS)
def test_returned_states_take_in_place_ops(cell):
    """h_n / c_n are fresh tensors as in torch.nn, not views: truncated BPTT's h.detach_() works."""
    kw = _kwargs(cell)
    ours = FASTRNN_CLASSES[cell](3, 4, **kw)
    states = ours(torch.randn(5, 2, 3))[1]
    for s in states if cell == "lstm" else (states,):
        assert s._base is None
        s.detach_()


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("form", ["batched", "unbatched", "nohx"])
def test_cells(cell, form, device, backend):
    torch_cls, ours_cls = CELL_CLASSES[cell]
    oracle = torch_cls(4, 5, **_kwargs(cell)).double()
    model = ours_cls(4, 5, backend=backend, **_kwargs(cell)).double()
    model.load_state_dict(oracle.state_dict())
    model.to(device)
    shape = (3,) if form != "unbatched" else ()
    x = torch.randn(*shape, 4, dtype=torch.float64)
    states = [torch.randn(*shape, 5, dtype=torch.float64) for _ in range(2 if cell == "lstm" else 1)]

    def go(module, dev):
        xs = x.to(dev).requires_grad_()
        st = [s.to(dev).requires_grad_() for s in states]
        hx = None if form == "nohx" else (tuple(st) if cell == "lstm" else st[0])
        out = module(xs, hx)
        outs = list(out) if isinstance(out, tuple) else [out]
        leaves = [xs] + ([] if form == "nohx" else st) + list(module.parameters())
        grads = torch.autograd.grad(sum((o * (k + 1)).sum() for k, o in enumerate(outs)), leaves)
        return {f"t{k}": t.detach().cpu() for k, t in enumerate(outs + list(grads))}

    assert_all_close(go(oracle, "cpu"), go(model, device), **FP64_TOL)  # fp64 on both sides


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("cell", CELLS)
def test_cells_with_hidden_size_zero(cell, device, backend):
    """torch.nn's cells take hidden_size 0 and return [B, 0] states (the Triton ops once raised)."""
    torch_cls, ours_cls = CELL_CLASSES[cell]
    x = torch.randn(3, 10, device=device, requires_grad=True)
    expected = torch_cls(10, 0, **_kwargs(cell)).to(device)(x)
    got = ours_cls(10, 0, backend=backend, **_kwargs(cell)).to(device)(x)
    expected, got = (list(t) if isinstance(t, tuple) else [t] for t in (expected, got))
    assert [tuple(t.shape) for t in got] == [tuple(t.shape) for t in expected] == [(3, 0)] * len(expected)
    (dx,) = torch.autograd.grad(sum(t.sum() for t in got), x)
    assert torch.equal(dx, torch.zeros_like(x))


# ----- dropout between layers -----


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("cell", CELLS)
def test_dropout_eval_and_p0_are_exact(cell, device, backend):
    for p, training in ((0.5, False), (0.0, True)):
        case = Case(cell, layers=2, bidirectional=True, training=training, extra=dict(dropout=p))
        ref, out = run_case(case, backend, device)
        assert_all_close(ref, out, **FP64_TOL)  # run_case: fp64 on both sides


def _train_case(case, backend, device):
    x, state, _ = make_inputs(case)
    oracle, model = make_pair(case, backend, torch.float64, device)
    ys = [m(x.to(dev), tuple(s.to(dev) for s in state) if isinstance(state, tuple) else state.to(dev))[0].cpu()
          for m, dev in ((oracle, "cpu"), (model, device))]
    return {"y": ys[0].detach()}, {"y": ys[1].detach()}


@pytest.mark.parametrize("device,backend", backend_params())
def test_dropout_p1_zeroes_between_layers(device, backend):
    """p=1: the second layer sees zeros, exactly as torch.nn's (its output depends on h0 and biases only)."""
    case = Case("lstm", layers=2, extra=dict(dropout=1.0))
    ref, out = _train_case(case, backend, device)
    assert_all_close(ref, out, **FP64_TOL)  # fp64 on both sides


@pytest.mark.parametrize("device,backend", backend_params())
def test_dropout_is_inverted_dropout_of_each_inner_layer_output(device, backend):
    """Training with p=0.4: the same as running the layers one by one with F.dropout(p) on the output of
    every layer but the last, drawing from the same RNG stream — the mask is random, its law is dropout's."""
    model = fastrnn.GRU(3, 4, num_layers=3, dropout=0.4, backend=backend).double().to(device)
    x = torch.randn(6, 2, 3, dtype=torch.float64, device=device)
    torch.manual_seed(7)
    y, _ = model(x)
    singles = []  # built before seeding: their initialisation draws from the RNG too
    for layer in range(3):
        single = fastrnn.GRU(3 if layer == 0 else 4, 4, backend=backend).double().to(device)
        single.load_state_dict({k.replace(f"_l{layer}", "_l0"): v for k, v in model.state_dict().items()
                                if k.endswith(f"_l{layer}")})
        singles.append(single)
    torch.manual_seed(7)
    layer_in = x
    for layer, single in enumerate(singles):
        layer_in = single(layer_in)[0]
        if layer < 2:
            layer_in = torch.nn.functional.dropout(layer_in, 0.4, training=True)
    # Both sides run the same backend's ops on the same fp64 shapes: only summation order may differ.
    torch.testing.assert_close(y, layer_in, atol=1e-12, rtol=1e-12)
    torch.manual_seed(8)
    assert not torch.equal(model(x)[0], y), "a new seed must draw a new mask"


# ----- bad input: torch.nn's exception type and message -----


def _bad_inputs(cell):
    lstm = cell == "lstm"
    good_h = (torch.zeros(1, 3, 6), torch.zeros(1, 3, 6)) if lstm else torch.zeros(1, 3, 6)

    def state(*shape):
        return (torch.zeros(*shape), torch.zeros(*shape)) if lstm else torch.zeros(*shape)

    return {
        "4d-input": (torch.zeros(2, 3, 4, 5), None),
        "1d-input": (torch.zeros(4), None),
        "wrong-input-size": (torch.zeros(5, 3, 7), None),
        "wrong-batch-in-hx": (torch.zeros(5, 3, 4), state(1, 2, 6)),
        "wrong-hidden-size": (torch.zeros(5, 3, 4), state(1, 3, 5)),
        "wrong-layers-in-hx": (torch.zeros(5, 3, 4), state(2, 3, 6)),
        "2d-hx-for-batched": (torch.zeros(5, 3, 4), state(3, 6)),
        "3d-hx-for-unbatched": (torch.zeros(5, 4), good_h),
        "dtype-mismatch": (torch.zeros(5, 3, 4, dtype=torch.float64), None),
        "zero-length-sequence": (torch.zeros(0, 3, 4), None),
        "zero-length-unbatched": (torch.zeros(0, 4), None),
    }


# Every backend: the zero-length sequence once returned an empty output on cpu and triton.
@pytest.mark.parametrize("device,backend", [p for p in backend_params() if p.values[0] == "cpu"])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("what", list(_bad_inputs("lstm")))
def test_bad_input_raises_like_torch(cell, what, device, backend):
    x, hx = _bad_inputs(cell)[what]
    theirs = TORCH_CLASSES[cell](4, 6, **_kwargs(cell))
    ours = FASTRNN_CLASSES[cell](4, 6, backend=backend, **_kwargs(cell))
    with pytest.raises(Exception) as expected:
        theirs(x, hx)
    with pytest.raises(Exception) as got:
        ours(x, hx)
    assert type(got.value) is type(expected.value)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("cell", CELLS)
def test_cell_bad_input_raises_like_torch(cell):
    torch_cls, ours_cls = CELL_CLASSES[cell]
    theirs, ours = torch_cls(4, 6, **_kwargs(cell)), ours_cls(4, 6, backend="reference", **_kwargs(cell))
    n = 2 if cell == "lstm" else 1

    def state(*shape):
        return tuple(torch.zeros(*shape) for _ in range(n)) if n == 2 else torch.zeros(*shape)

    for x, hx in [(torch.zeros(2, 3, 4), None), (torch.zeros(3, 5), None), (torch.zeros(3, 4), state(2, 6)),
                  (torch.zeros(3, 4), state(3, 7)), (torch.zeros(3, 4), state(1, 3, 6))]:
        with pytest.raises(Exception) as expected:
            theirs(x, hx)
        with pytest.raises(Exception) as got:
            ours(x, hx)
        assert type(got.value) is type(expected.value) and str(got.value) == str(expected.value)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("first", ["project", "pad"])
@pytest.mark.parametrize("cell", CELLS)
def test_packed_rows_projected_or_padded_first(cell, first, device, backend, monkeypatch):
    """A PackedSequence of unequal lengths: the first layer projects its rows and pads the projection, or pads
    the rows first (autograd.projects_before_padding chooses; forced here); both orders give torch.nn's outputs
    and gradients, with 2 layers and both directions, and the order taken is the one asked for (every
    first-layer projection sees the packed rows, or none does)."""
    from fastrnn import autograd

    monkeypatch.setattr(autograd, "projects_before_padding", lambda *args: first == "project")
    seen = []
    projection = autograd.input_projection

    def spy(x, w_ih, b_in, backend, batch_sizes=None):
        seen.append(batch_sizes is not None)
        return projection(x, w_ih, b_in, backend, batch_sizes)

    monkeypatch.setattr(autograd, "input_projection", spy)
    case = Case(cell, T=6, B=4, layers=2, bidirectional=True, packed="unsorted")
    ref, out = run_case(case, backend, device)
    assert_all_close(ref, out, **FP64_TOL)
    assert seen == [first == "project"] * 2 + [False] * 2


@pytest.mark.parametrize("path", ["pad_rows", "index_copy"])
def test_padded_equals_torch_pad(path, monkeypatch):
    """autograd.padded (fastrnn_cpu::pad_rows on the CPU; elsewhere, under torch.compile and the torch.func
    transforms, index_copy_ with a gradient to take, torch's pad without) equals
    torch.nn.utils.rnn.pad_packed_sequence, and so does its gradient, twice differentiable; in bf16 too."""
    from torch.nn.utils.rnn import pad_packed_sequence

    from fastrnn import autograd

    if path == "index_copy":
        monkeypatch.setattr(autograd, "transformed", lambda: True)
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor([5, 4, 2, 1]))
    rows = packed.data.clone().requires_grad_()
    expected, _ = pad_packed_sequence(packed._replace(data=rows))
    with torch.no_grad():
        assert torch.equal(autograd.padded(rows, packed.batch_sizes), expected)
        assert torch.equal(autograd.padded(rows.bfloat16(), packed.batch_sizes), expected.bfloat16())
    got = autograd.padded(rows, packed.batch_sizes)
    assert torch.equal(got, expected)
    weight = torch.randn_like(expected)
    (g_expected,) = torch.autograd.grad((expected * weight).sum(), rows, create_graph=True)
    (g_got,) = torch.autograd.grad((got * weight).sum(), rows, create_graph=True)
    assert torch.equal(g_got, g_expected)
    assert torch.autograd.gradcheck(lambda r: autograd.padded(r, packed.batch_sizes), (rows,))
    assert torch.autograd.gradgradcheck(lambda r: autograd.padded(r, packed.batch_sizes), (rows,))


def test_pad_rows_checks_its_arguments():
    pad_rows = torch.ops.fastrnn_cpu.pad_rows
    with pytest.raises(RuntimeError, match="batch_sizes must be non-increasing"):
        pad_rows(torch.zeros(5, 2), torch.tensor([2, 3]))
    with pytest.raises(RuntimeError, match="batch_sizes sum to 5, rows has 4"):
        pad_rows(torch.zeros(4, 2), torch.tensor([3, 2]))
    with pytest.raises(RuntimeError, match="batch_sizes must be a 1-D int64 CPU tensor"):
        pad_rows(torch.zeros(5, 2), torch.tensor([3.0, 2.0]))
    assert pad_rows(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)).shape == (0, 0, 2)


def test_packed_input_with_wrong_hx_is_rejected():
    x = pack_padded_sequence(torch.zeros(5, 3, 4), torch.tensor([5, 3, 2]))
    with pytest.raises(RuntimeError, match=r"Expected hidden size \(1, 3, 6\), got \[1, 2, 6\]"):
        fastrnn.GRU(4, 6, backend="reference")(x, torch.zeros(1, 2, 6))


def test_backend_on_wrong_device_is_a_clear_error():
    with pytest.raises((ValueError, RuntimeError), match="backend 'cuda'"):
        fastrnn.LSTM(3, 4, backend="cuda")(torch.zeros(2, 1, 3))


def test_available_backends():
    names = fastrnn.available_backends()
    assert "reference" in names
    assert set(names) <= {"reference", "cpu", "cuda", "triton"}


@pytest.mark.parametrize("cell", CELLS)
def test_autocast_runs_in_the_autocast_dtype(cell):
    """Under autocast the layers run in the autocast dtype (what torch.nn does on CUDA, where cuDNN's RNN is
    on autocast's lower-precision list; on the CPU torch.nn is inconsistent: LSTM fails inside oneDNN, GRU
    stays fp32, RNN goes bf16), so the result equals the module cast to that dtype on cast input."""
    model = FASTRNN_CLASSES[cell](4, 6, num_layers=2, backend="reference", **_kwargs(cell))
    x = torch.randn(5, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = model(x)
    expected, _ = copy.deepcopy(model).to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_auto_hands_cpu_lstm_of_batch_8_and_more_to_torch_nn(dtype, monkeypatch):
    """backend="auto" runs torch.nn's own LSTM where it measured faster (CPU, fp32 or bf16, B >= 8, padded
    input; docs/api.md): the result is torch.nn's to the bit and no fastrnn op runs. Below that batch (in
    inference: training an fp32 LSTM goes to torch.nn, the next test), for a
    PackedSequence (torch.nn's packed LSTM has no oneDNN path: slower than fastrnn's), in fp16, with an
    explicit backend and under a torch.func transform, fastrnn's ops run."""
    # bf16 goes to torch.nn only where the CPU has avx512_bf16 (test_auto_rules_keyed_on_cpu_features): patched
    # in, so the batch rule runs on any CPU; and an AMD CPU (on Intel CPUs fp32 training of batch 8 stays fastrnn's:
    # test_auto_keeps_fp32_lstm_training_of_batch_1_and_2_with_two_threads).
    monkeypatch.setattr(fastrnn.modules, "_cpu_has_avx512_bf16", lambda: True)
    monkeypatch.setattr(fastrnn.modules, "_cpu_vendor", lambda: "amd")
    model = fastrnn.LSTM(4, 5, num_layers=2, bidirectional=True).to(dtype)
    oracle = nn.LSTM(4, 5, num_layers=2, bidirectional=True).to(dtype)
    oracle.load_state_dict(model.state_dict())
    big = torch.randn(3, fastrnn.modules.AUTO_TORCH_NN_MIN_BATCH, 4, dtype=dtype)
    # bf16 on a CPU with AMX: torch.nn's in inference at any batch; bf16 training stays fastrnn's everywhere
    # (test_auto_rules_keyed_on_cpu_features).
    amx = dtype == torch.bfloat16 and fastrnn.modules._cpu_has_amx()
    for x in (big, big[:, 0]):  # batched, and unbatched ([T, I]: one sequence, batch 1; inference)
        training = x is big and dtype == torch.float32  # the batch rule in fp32 training, in bf16 inference
        with CountOps() as counter, torch.set_grad_enabled(training):
            got = model(x)
        if x is big or amx:
            assert counter.calls == []
            expected = oracle(x)
            assert torch.equal(got[0], expected[0])
            assert all(torch.equal(a, b) for a, b in zip(got[1], expected[1]))
        else:
            assert any("lstm_fwd" in c for c in counter.calls), counter.calls
    packed = pack_padded_sequence(big, torch.full((big.shape[1],), 3))
    half = fastrnn.LSTM(4, 5).half()
    small_inference = [] if amx else [lambda: torch.no_grad()(model)(big[:, :1])]
    for runs_ours in (*small_inference, lambda: model(packed),
                      lambda: fastrnn.LSTM(4, 5, backend="cpu").to(dtype)(big),
                      lambda: half(big.half()),
                      lambda: torch.func.vmap(model)(big.unsqueeze(0))):
        with CountOps() as counter:
            runs_ours()
        assert any("lstm_fwd" in c for c in counter.calls), counter.calls


@pytest.mark.parametrize("features", ["amx", "avx512_bf16", "neither"])
def test_auto_rules_keyed_on_cpu_features(features, monkeypatch):
    """On a CPU with AMX (and avx512_bf16, avx512_fp16: an Intel Xeon of Sapphire Rapids and later), bf16 LSTM
    inference runs torch.nn's forward (oneDNN's LSTM on AMX) at any batch, and fp16 LSTM inference from batch
    32 (AUTO_TORCH_NN_FP16_MIN_BATCH; torch.nn's loop on avx512_fp16 measured faster there, docs/api.md); bf16
    training stays fastrnn's at any batch, fp16 training everywhere. With avx512_bf16 but no AMX (the Zen 5
    rule) bf16 inference from batch 8 runs torch.nn's forward; without avx512_bf16 (an Ice Lake Xeon, a Zen 3:
    oneDNN emulates bf16 or torch.nn has no oneDNN bf16 path) bf16 stays fastrnn's at any batch. The features
    are patched, so every side of the rule runs on any CPU."""
    amx = features == "amx"
    # The batch rule alone (fp32 inference of batch * H <= 1024 is the test below's).
    monkeypatch.setattr(fastrnn.modules, "_fastrnn_runs_small_lstm_inference_faster", lambda hidden_size: False)
    monkeypatch.setattr(fastrnn.modules, "_cpu_has_amx", lambda: amx)
    monkeypatch.setattr(fastrnn.modules, "_cpu_has_avx512_bf16", lambda: features != "neither")
    monkeypatch.setattr(fastrnn.modules, "_torch_fp16_gemm_is_native", lambda: amx)
    B = fastrnn.modules.AUTO_TORCH_NN_FP16_MIN_BATCH
    bf16_batch_rule = features == "avx512_bf16"
    cases = [  # dtype, batch, grad, runs torch.nn
        (torch.bfloat16, 1, False, amx), (torch.bfloat16, 1, True, False),
        (torch.bfloat16, 8, True, False), (torch.bfloat16, 8, False, amx or bf16_batch_rule),
        (torch.float16, B, False, amx), (torch.float16, B // 2, False, False), (torch.float16, B, True, False),
        (torch.float32, 8, False, True), (torch.float32, 1, False, False),
    ]
    for dtype, batch, grad, runs_torch_nn in cases:
        model = fastrnn.LSTM(4, 5).to(dtype)
        oracle = nn.LSTM(4, 5).to(dtype)
        oracle.load_state_dict(model.state_dict())
        x = torch.randn(3, batch, 4, dtype=dtype)
        with torch.set_grad_enabled(grad):
            with CountOps() as counter:
                got = model(x)
            assert (counter.calls == []) == runs_torch_nn, (dtype, batch, grad, counter.calls)
            if runs_torch_nn:
                assert torch.equal(got[0], oracle(x)[0])


@pytest.mark.parametrize("fastrnn_faster", [True, False])
def test_auto_keeps_large_fp32_lstm_training_where_measured_faster(fastrnn_faster, monkeypatch):
    """fp32 LSTM training from AUTO_FP32_TRAINING_MIN_GATES gate values a layer (T * B * 4H) stays fastrnn's
    where _fastrnn_trains_large_lstms_faster() (patched: both sides run on any CPU), torch.nn's below it and
    elsewhere; inference from batch 8 stays torch.nn's at any size."""
    monkeypatch.setattr(fastrnn.modules, "_fastrnn_trains_large_lstms_faster", lambda: fastrnn_faster)
    H = 16
    T, B = 64, -(-fastrnn.modules.AUTO_FP32_TRAINING_MIN_GATES // (64 * 4 * H))  # the least batch at the threshold
    assert (T - 1) * B * 4 * H < fastrnn.modules.AUTO_FP32_TRAINING_MIN_GATES <= T * B * 4 * H
    model = fastrnn.LSTM(3, H, num_layers=2, bidirectional=True)
    oracle = nn.LSTM(3, H, num_layers=2, bidirectional=True).double()
    oracle.load_state_dict(model.state_dict())
    x = torch.randn(T, B, 3)
    for steps, grad, runs_ours in ((T, True, fastrnn_faster), (T - 1, True, False), (T, False, False)):
        with torch.set_grad_enabled(grad), CountOps() as counter:
            got = model(x[:steps])
        assert (counter.calls != []) == runs_ours, (steps, grad, counter.calls)
        assert_close("y", oracle(x[:steps].double())[0].detach(), got[0].detach().double(), **FP32_TOL)


@pytest.mark.parametrize("isa, blas, onednn_matmul, vendor, faults, expected", [
    ("avx512", "onednn", True, "amd", True, True),  # the Zen 5 where it was measured
    ("avx512", "mkl", False, "intel", True, True),  # the Intel Xeon where it was measured
    ("avx512", "onednn", False, "amd", True, False),  # oneDNN's linear op, outputs from torch's allocator
    ("avx512", "mkl", True, "amd", True, False),  # MKL forced on an AMD CPU: its AVX2 code
    ("avx512", "onednn", True, "amd", False, False),  # torch's allocations already warm (huge pages)
    ("avx512", "mkl", False, "intel", False, False),
    ("avx2", "onednn", True, "amd", True, False),
    ("avx2", "mkl", False, "intel", True, False),
])
def test_large_lstm_training_rule_keyed_on_the_measured_paths(isa, blas, onednn_matmul, vendor, faults, expected,
                                                              monkeypatch):
    """_fastrnn_trains_large_lstms_faster holds on the two configurations measured faster (docs/api.md): the
    AVX-512 copy with the big GEMMs on oneDNN's matmul into fastrnn's own outputs (AMD) or on MKL at its AVX-512
    width (Intel), where torch's own large allocations fault; nowhere else."""
    from fastrnn.backends import native

    monkeypatch.setattr(native, "cpu_capability", lambda: isa)
    monkeypatch.setattr(native, "blas", lambda: blas)
    monkeypatch.setattr(native, "onednn_matmul", lambda: onednn_matmul)
    monkeypatch.setattr(fastrnn.modules, "_cpu_vendor", lambda: vendor)
    monkeypatch.setattr(fastrnn.modules, "_torch_large_allocations_fault", lambda: faults)
    assert fastrnn.modules._fastrnn_trains_large_lstms_faster() == expected


def test_auto_keeps_fp32_lstm_training_of_batch_1_and_2_with_two_threads(monkeypatch):
    """fp32 LSTM training of batch up to AUTO_FP32_TRAINING_FASTRNN_MAX_BATCH (2; on Intel CPUs _INTEL, 16), padded,
    any layers and directions, a PackedSequence of one sequence too, stays fastrnn's where its AVX-512 copy runs
    and torch runs two threads or more (measured faster, docs/api.md); from the next batch, at any batch with one
    thread and off the AVX-512 copy, torch.nn's. So does inference from batch 8 up to batch * H =
    AUTO_FP32_INFERENCE_FASTRNN_MAX_BATCH_HIDDEN, on AMD and Intel CPUs (the two measured). Gradients against
    torch.nn in fp64. The capability and the vendor are patched, so the rule runs on any CPU."""
    from fastrnn.backends import native

    max_batch = fastrnn.modules.AUTO_FP32_TRAINING_FASTRNN_MAX_BATCH
    max_batch_intel = fastrnn.modules.AUTO_FP32_TRAINING_FASTRNN_MAX_BATCH_INTEL
    model = fastrnn.LSTM(3, 6, num_layers=2, bidirectional=True)
    oracle = nn.LSTM(3, 6, num_layers=2, bidirectional=True)
    oracle.load_state_dict(model.state_dict())
    threads = torch.get_num_threads()
    try:
        for isa, n_threads, batch, runs_ours, vendor in (
                ("avx512", 2, max_batch, True, "amd"), ("avx512", 2, 1, True, "amd"), ("avx512", 2, 1, True, "intel"),
                ("avx512", 2, 1, True, "other"), ("avx512", 2, max_batch + 1, False, "amd"),
                ("avx512", 2, max_batch_intel, True, "intel"), ("avx512", 2, max_batch_intel + 1, False, "intel"),
                ("avx512", 1, max_batch_intel, False, "intel"),
                ("avx512", 1, 1, False, "amd"), ("avx2", 2, 1, False, "amd")):
            monkeypatch.setattr(native, "cpu_capability", lambda: isa)
            monkeypatch.setattr(fastrnn.modules, "_cpu_vendor", lambda: vendor)
            torch.set_num_threads(n_threads)
            x = torch.randn(5, batch, 3, requires_grad=True)
            with CountOps() as counter:
                y, (h, c) = model(x)
                (y.sum() + h.sum() + c.sum()).backward()
            assert (counter.calls != []) == runs_ours, (isa, n_threads, batch, counter.calls)
            xr = x.detach().double().requires_grad_()
            ref = copy.deepcopy(oracle).double()
            yr, (hr, cr) = ref(xr)
            (yr.sum() + hr.sum() + cr.sum()).backward()
            assert_close("y", yr.detach(), y.detach().double(), **FP32_TOL)
            assert_close("dx", xr.grad, x.grad.double(), **FP32_TOL)
            for (name, p), q in zip(model.named_parameters(), ref.parameters()):
                assert_close(name, q.grad, p.grad.double(), **FP32_TOL)
            if batch == 1:  # a PackedSequence of one sequence: the same rule
                packed = pack_padded_sequence(x.detach(), torch.tensor([x.shape[0]]))
                with CountOps() as counter:
                    model(packed)[0].data.sum().backward()
                assert (counter.calls != []) == runs_ours, ("packed", isa, n_threads, counter.calls)
                # Inference from batch 8 up to batch * H = AUTO_FP32_INFERENCE_FASTRNN_MAX_BATCH_HIDDEN: the same
                # condition on an AMD or Intel CPU (not another vendor's: unmeasured); one batch more, torch.nn's
                # forward (to the bit).
                most = fastrnn.modules.AUTO_FP32_INFERENCE_FASTRNN_MAX_BATCH_HIDDEN // 6
                inference_ours = runs_ours and vendor in ("amd", "intel")
                for rows, ours in ((8, inference_ours), (most, inference_ours), (most + 1, False)):
                    xi = torch.randn(3, rows, 3)
                    with torch.no_grad(), CountOps() as counter:
                        got = model(xi)
                    assert (counter.calls != []) == ours, ("inference", rows, isa, n_threads, vendor, counter.calls)
                    want = oracle(xi)
                    if ours:
                        assert_close("y", want[0].detach().double(), got[0].double(), **FP32_TOL)
                    else:
                        assert torch.equal(got[0], want[0])
            model.zero_grad()
    finally:
        torch.set_num_threads(threads)


def test_auto_small_lstm_inference_on_intel_cpus_up_to_96_units(monkeypatch):
    """fp32 LSTM inference of batch 8 with batch * H <= AUTO_FP32_INFERENCE_FASTRNN_MAX_BATCH_HIDDEN runs fastrnn's
    ops on an Intel CPU up to H = AUTO_FP32_INFERENCE_FASTRNN_MAX_HIDDEN_INTEL (96) and torch.nn's forward above it
    (a tie measured at H = 128 on a Xeon with AMX, docs/api.md), on an AMD CPU at H = 128 too. The capability,
    the vendor and the thread count are set, so the rule runs on any CPU."""
    from fastrnn.backends import native

    most = fastrnn.modules.AUTO_FP32_INFERENCE_FASTRNN_MAX_HIDDEN_INTEL
    monkeypatch.setattr(native, "cpu_capability", lambda: "avx512")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for vendor, hidden, ours in (("intel", most, True), ("intel", most + 1, False), ("amd", 128, True)):
            monkeypatch.setattr(fastrnn.modules, "_cpu_vendor", lambda: vendor)
            model = fastrnn.LSTM(3, hidden)
            oracle = nn.LSTM(3, hidden)
            oracle.load_state_dict(model.state_dict())
            x = torch.randn(4, 8, 3)
            with torch.no_grad(), CountOps() as counter:
                got = model(x)
                want = oracle(x)
            assert (counter.calls != []) == ours, (vendor, hidden, counter.calls)
            if ours:
                assert_close("y", want[0].double(), got[0].double(), **FP32_TOL)
            else:
                assert torch.equal(got[0], want[0])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("vendor", ["amd", "intel"])
@pytest.mark.parametrize("cell", ["GRU", "RNN"])
def test_auto_hands_small_short_calls_of_gru_and_rnn_to_torch_nn(cell, vendor, monkeypatch):
    """backend="auto" runs torch.nn's own GRU/RNN forward for calls of at most AUTO_TORCH_NN_SHORT_CALL_MAX_STEPS
    steps (GRU 1, RNN 3) of fp32 padded input below AUTO_TORCH_NN_SHORT_CALL_MAX_GATES gate values a layer
    (T * B * G * H), _TRAINING when a gradient flows, with any layers and directions; on Intel CPUs up to
    AUTO_TORCH_NN_SHORT_CALL_MAX_STEPS_INTEL (GRU 2, RNN 4) steps below
    AUTO_TORCH_NN_SHORT_CALL_MAX_GATES_INTEL either way, _UNCACHED (GRU 1, RNN 2) with a W_hh over 1 MB (the
    vendor patched, so both rules run on any CPU). The
    result is torch.nn's to the bit and no fastrnn op runs. At the thresholds, one step more, for a PackedSequence,
    fp64, resets and backend="cpu", fastrnn's ops run."""
    modules = fastrnn.modules
    monkeypatch.setattr(modules, "_cpu_vendor", lambda: vendor)
    gates = 3 if cell == "GRU" else 1
    H = 8
    if vendor == "intel":
        most = modules.AUTO_TORCH_NN_SHORT_CALL_MAX_STEPS_INTEL[cell.lower()]
        limit = dict.fromkeys((False, True), modules.AUTO_TORCH_NN_SHORT_CALL_MAX_GATES_INTEL)
    else:
        most = modules.AUTO_TORCH_NN_SHORT_CALL_MAX_STEPS[cell.lower()]
        limit = {False: modules.AUTO_TORCH_NN_SHORT_CALL_MAX_GATES,
                 True: modules.AUTO_TORCH_NN_SHORT_CALL_MAX_GATES_TRAINING}
    assert most == {("GRU", "amd"): 1, ("RNN", "amd"): 3, ("GRU", "intel"): 2, ("RNN", "intel"): 4}[cell, vendor]
    model = getattr(fastrnn, cell)(4, H)
    oracle = getattr(nn, cell)(4, H)
    oracle.load_state_dict(model.state_dict())

    def last_batch_below(grad, steps=1):  # the largest batch of fewer gate values than the limit
        return (limit[grad] - 1) // (steps * gates * H)

    def runs_torch_nn(module, x, grad, **kwargs):
        with torch.set_grad_enabled(grad), CountOps() as counter:
            got = module(x, **kwargs)
        return counter.calls == [], got

    for grad in (False, True):
        for steps in range(1, most + 1):
            below = last_batch_below(grad, steps)
            for x in (torch.randn(steps, below, 4), torch.randn(steps, 4)):  # batched, and unbatched (batch 1)
                torch_nn, got = runs_torch_nn(model, x, grad)
                assert torch_nn, (grad, x.shape)
                expected = oracle(x)
                assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
            assert not runs_torch_nn(model, torch.randn(steps, below + 1, 4), grad)[0], (grad, steps)  # the limit
        below = last_batch_below(grad)
        batch_first = getattr(fastrnn, cell)(4, H, batch_first=True)
        assert runs_torch_nn(batch_first, torch.randn(below, 1, 4), grad)[0]
        assert not runs_torch_nn(batch_first, torch.randn(below, most + 1, 4), grad)[0]
        for kwargs in ({"num_layers": 2}, {"bidirectional": True}):  # the gate values of one layer decide
            stacked = getattr(fastrnn, cell)(4, H, **kwargs)
            stacked_oracle = getattr(nn, cell)(4, H, **kwargs)
            stacked_oracle.load_state_dict(stacked.state_dict())
            x = torch.randn(most, last_batch_below(grad, most), 4)
            torch_nn, got = runs_torch_nn(stacked, x, grad)
            assert torch_nn and torch.equal(got[0], stacked_oracle(x)[0]), (grad, kwargs)
            assert not runs_torch_nn(stacked, torch.randn(1, below + 1, 4), grad)[0], (grad, kwargs)
        not_ours = [  # each runs fastrnn's ops
            (model, torch.randn(most + 1, 1, 4), {}),  # one step more
            (model, torch.randn(1, 1, 4), {"resets": torch.zeros(1, 1, dtype=torch.bool)}),
            (getattr(fastrnn, cell)(4, H, backend="cpu"), torch.randn(1, 1, 4), {}),
            (copy.deepcopy(model).double(), torch.randn(1, 1, 4, dtype=torch.float64), {}),
            (model, pack_padded_sequence(torch.randn(1, 2, 4), torch.tensor([1, 1])), {}),
        ]
        for module, x, kwargs in not_ours:
            torch_nn, _ = runs_torch_nn(module, x, grad, **kwargs)
            assert not torch_nn, (grad, module, kwargs)
    if limit[False] != limit[True]:  # between the two limits the rule follows the grad mode
        x = torch.randn(1, last_batch_below(False) + 1, 4)
        assert not runs_torch_nn(model, x, False)[0]
        assert runs_torch_nn(model, x, True)[0]
    if vendor == "intel":  # fewer steps where W_hh is over the panel cache's 1 MB (read where it lies)
        largest_kept = {"GRU": 295, "RNN": 512}[cell]  # G * H * H * 4 bytes <= autograd.PANEL_CACHE_MAX_BYTES
        fewer = modules.AUTO_TORCH_NN_SHORT_CALL_MAX_STEPS_INTEL_UNCACHED[cell.lower()]
        assert fewer == {"GRU": 1, "RNN": 2}[cell]
        for hidden, steps, expected in ((largest_kept, fewer + 1, True), (largest_kept + 1, fewer + 1, False),
                                        (largest_kept + 1, fewer, True)):
            module = getattr(fastrnn, cell)(4, hidden)
            for grad in (False, True):
                assert runs_torch_nn(module, torch.randn(steps, 1, 4), grad)[0] == expected, (hidden, steps, grad)


ALLOCATION_PROBE = "import fastrnn.modules as m; print(m._torch_large_allocations_fault())"


def test_large_allocation_probe():
    """_torch_large_allocations_fault in fresh processes: True with glibc's malloc on Linux unless the kernel
    backs every large mapping with huge pages (THP "always"), False with torch's own huge pages."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp_always = "[always]" in f.read()
    except OSError:
        thp_always = False
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    for extra, expected in (({}, glibc and not thp_always), ({"THP_MEM_ALLOC_ENABLE": "1"}, False)):
        out = subprocess.run([sys.executable, "-c", ALLOCATION_PROBE], env={**env, **extra}, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[-1] == str(expected), (extra, out.stdout)


def test_auto_hands_training_of_fp32_cpu_lstm_to_torch_nn(monkeypatch):
    """On an AMD CPU (patched: Intel CPUs keep training up to batch 16, the test above), below batch 8, from batch 3
    (the batches 1-2 of the test above stay fastrnn's with two threads), an fp32
    LSTM (one layer, 2 layers or 2 directions) runs torch.nn's forward when a gradient will flow (measured
    slower in fastrnn there: docs/api.md), fastrnn's kernels for inference and in bf16; a PackedSequence of one
    sequence in training too unless batches 1-2 stay fastrnn's here (_fastrnn_trains_small_lstms_faster), of
    two sequences fastrnn's (torch.nn's packed loop is slower there)."""
    monkeypatch.setattr(fastrnn.modules, "_cpu_vendor", lambda: "amd")
    x = torch.randn(5, fastrnn.modules.AUTO_FP32_TRAINING_FASTRNN_MAX_BATCH + 1, 4)
    model = fastrnn.LSTM(4, 5)
    small_batches_ours = fastrnn.modules._fastrnn_trains_small_lstms_faster
    for lengths, runs_torch_nn in (([5], not small_batches_ours()), ([5, 3], False)):
        packed = pack_padded_sequence(torch.randn(5, len(lengths), 4), torch.tensor(lengths))
        with CountOps() as counter:
            model(packed)
        assert (counter.calls == []) == runs_torch_nn, counter.calls
    for kw in (dict(), dict(num_layers=2), dict(bidirectional=True)):
        model = fastrnn.LSTM(4, 5, **kw)
        oracle = nn.LSTM(4, 5, **kw)
        oracle.load_state_dict(model.state_dict())
        with CountOps() as counter:
            got = model(x)
        assert counter.calls == []
        assert torch.equal(got[0], oracle(x)[0])
        for runs_ours in (lambda: model.requires_grad_(False)(x), lambda: model.bfloat16().requires_grad_(True)(
                x.bfloat16()), lambda: torch.no_grad()(fastrnn.LSTM(4, 5, **kw))(x)):
            with CountOps() as counter:
                runs_ours()
            assert any("lstm_fwd" in c for c in counter.calls), counter.calls


def test_auto_rule_on_cuda():
    """backend="auto" on CUDA hands to torch.nn (cuDNN) where fastrnn's kernels measured slower on an H200
    (fastrnn.modules._cuda_torch_nn_is_faster): the cuda backend from batch 64 with H >= 512; the triton and
    reference backends always. Batches below 64, or H below 512, stay on the cuda backend (measured faster at
    B = 1-16, unmeasured at 17-63)."""
    rule = fastrnn.modules._cuda_torch_nn_is_faster
    B, H = fastrnn.modules.AUTO_CUDA_TORCH_NN_MIN_BATCH, fastrnn.modules.AUTO_CUDA_TORCH_NN_MIN_HIDDEN
    assert rule("cuda", B, H) and rule("cuda", 4 * B, 2 * H)
    assert not rule("cuda", B - 1, H) and not rule("cuda", B, H - 1) and not rule("cuda", 1, 4096)
    assert all(rule(backend, 1, 8) for backend in ("triton", "reference"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_auto_hands_large_cuda_calls_to_torch_nn(name):
    """On CUDA tensors the module applies _cuda_torch_nn_is_faster to padded fp32/bf16 input (torch.nn's result
    to the bit where it hands over) and keeps fastrnn's kernels with resets, under autocast and in fp64."""
    H = fastrnn.modules.AUTO_CUDA_TORCH_NN_MIN_HIDDEN
    model = getattr(fastrnn, name)(8, H).cuda()
    oracle = getattr(nn, name)(8, H).cuda()
    oracle.load_state_dict(model.state_dict())
    concrete = fastrnn.backends.resolve("auto", torch.device("cuda"))
    for batch in (8, fastrnn.modules.AUTO_CUDA_TORCH_NN_MIN_BATCH):
        x = torch.randn(3, batch, 8, device="cuda")
        hands_over = fastrnn.modules._cuda_torch_nn_is_faster(concrete, batch, H)
        assert model.resolved_backend(x) == ("torch.nn" if hands_over else concrete)
        if hands_over:
            assert torch.equal(model(x)[0], oracle(x)[0])
        assert model.resolved_backend(x, resets=torch.zeros(3, batch, dtype=torch.bool, device="cuda")) == concrete
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert model.resolved_backend(x) == concrete
        assert model.double().resolved_backend(x.double()) == concrete
        model.float()
