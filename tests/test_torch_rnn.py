"""PyTorch's own recurrent-network tests, adapted: torch.nn's classes swapped for fastrnn's, on every backend.

Each test names the PyTorch test it comes from (test/test_nn.py, test/nn/test_packed_sequence.py,
test/test_autocast.py, test/test_cuda.py's autocast RNN test, torch/testing/_internal/common_modules.py's
RNN samples). The facts those tests check carry over; the code is ours: where PyTorch compares cuDNN with
its CPU path, or one torch path with another, we compare fastrnn with torch.nn itself, in fp64 with the
same state_dict (the oracle of tests/parity.py), and where torch.nn raises we expect the same exception
type and message (or, where the docstring says so, the same type with a clear message of our own).

The Triton interpreter (~1000x slower than the reference backend, see conftest.interpreted) gets T <= 5 and
H <= 8, and in the costliest tests a subset of the rows (per_backend's `interpreter_rows`, named next to
each test) chosen so that every feature still runs on it; every other backend gets PyTorch's sizes and
every row. Whole file on the 2-core Zen 5 (shared, load 4.6-6.8): 185 s wall, 125 s user+sys, 822 tests
(at eb098ba, torch 2.13 CPU, AVX512; 167 of them fail on bugs of issue 12, most fast).
"""

import copy
import io
import itertools
import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import rnn as rnn_utils

import fastrnn
from conftest import backend_params, interpreted
from parity import FP32_TOL, FP64_TOL, assert_close

BACKENDS = backend_params()

TORCH_CLASSES = {"RNN": nn.RNN, "LSTM": nn.LSTM, "GRU": nn.GRU,
                 "RNNCell": nn.RNNCell, "LSTMCell": nn.LSTMCell, "GRUCell": nn.GRUCell}
FASTRNN_CLASSES = {name: getattr(fastrnn, name) for name in TORCH_CLASSES}

# (id, class name, extra constructor arguments): every cell of the layer and the cell modules.
LAYERS = [("rnn_tanh", "RNN", {}), ("rnn_relu", "RNN", {"nonlinearity": "relu"}), ("gru", "GRU", {}),
          ("lstm", "LSTM", {}), ("lstm_proj", "LSTM", {"proj_size": 3})]
CELLS = [("rnn_tanh", "RNNCell", {}), ("rnn_relu", "RNNCell", {"nonlinearity": "relu"}),
         ("gru", "GRUCell", {}), ("lstm", "LSTMCell", {})]


def twins(name, *args, backend, device="cpu", dtype=torch.float64, **kwargs):
    """The torch.nn module (fp64, CPU: the oracle) and its fastrnn twin (`dtype` on `device`), same weights."""
    theirs = TORCH_CLASSES[name](*args, **kwargs).double()
    ours = FASTRNN_CLASSES[name](*args, backend=backend, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours.to(device=device, dtype=dtype)


def small(device, backend, full, interpreter):
    """PyTorch's size, or the interpreter's."""
    return interpreter if interpreted(device, backend) else full


def per_backend(rows, interpreter_rows=None):
    """pytest params (*row values, device, backend), id '<row id>-<backend>-<device>': every row on every
    backend; under the interpreter only the rows whose id is in `interpreter_rows` (all when None)."""
    params = []
    for p in BACKENDS:
        device, backend = p.values
        for row_id, *values in rows:
            if interpreted(device, backend) and interpreter_rows is not None and row_id not in interpreter_rows:
                continue
            params.append(pytest.param(*values, device, backend, id=f"{row_id}-{backend}-{device}", marks=p.marks))
    return params


def _outcome(call):
    try:
        call()
    except Exception as e:  # noqa: BLE001 - the exception itself is what is compared
        return type(e), str(e)
    return None, None


def assert_raises_like_torch(what, theirs, ours, own_message=None):
    """`ours()` raises what `theirs()` (torch.nn) raises: the same type and message, or the same type and a
    message matching `own_message` where fastrnn words the error itself."""
    t_type, t_msg = _outcome(theirs)
    assert t_type is not None, f"{what}: torch.nn accepts this input, so the case tests nothing"
    o_type, o_msg = _outcome(ours)
    expected = f"{t_type.__name__}({t_msg!r})" if own_message is None else f"{t_type.__name__}(/{own_message}/)"
    got = "no exception" if o_type is None else f"{o_type.__name__}({o_msg!r})"
    same_message = o_msg == t_msg if own_message is None else bool(o_msg and re.search(own_message, o_msg))
    assert o_type is t_type and same_message, f"{what}: torch.nn raises {expected}, fastrnn {got}"


def assert_results_close(ref, out, tol, what=""):
    assert ref.keys() == out.keys(), f"{what}compared {sorted(out)}, the oracle has {sorted(ref)}"
    for name in ref:
        if ref[name] is None or out[name] is None:
            assert ref[name] is None and out[name] is None, (
                f"{what}{name}: gradient is {'None' if out[name] is None else 'defined'} in fastrnn, "
                f"{'None' if ref[name] is None else 'defined'} in torch.nn")
            continue
        assert_close(what + name, ref[name], out[name], **tol)


def assert_equal(name, ref, out):
    """Bit for bit; a failure names the tensor, the first differing index and both values."""
    assert ref.dtype == out.dtype and ref.shape == out.shape, (
        f"{name}: {out.dtype} {tuple(out.shape)}, expected {ref.dtype} {tuple(ref.shape)}")
    differ = (ref != out) & ~(ref.isnan() & out.isnan())
    if differ.any():
        idx = tuple(int(i) for i in differ.nonzero()[0])
        raise AssertionError(f"{name}: {int(differ.sum())} elements differ, first at {idx}: got {float(out[idx])!r}, "
                             f"expected {float(ref[idx])!r}")


def _output_weights(outs):
    """Fixed random weights for each output, the same for both modules (their own generator, seed 7)."""
    g = torch.Generator().manual_seed(7)
    return [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]


def forward_backward(module, leaves, build, device="cpu", dtype=torch.float64):
    """Runs `module(*build(leaves))` and backpropagates a fixed random weighting of every output.

    leaves: {name: fp64 CPU tensor}, made leaves in `dtype` on `device`; build(leaves) -> (input, hx), where
    the input may be a PackedSequence or a non-contiguous view built from the leaves. Returns {name: fp64
    CPU tensor}: y (packed data for packed input), h_n[, c_n], d<leaf> and d<parameter> (None if unused).
    """
    made = {n: t.detach().clone().to(device=device, dtype=dtype).requires_grad_() for n, t in leaves.items()}
    inp, hx = build(made)
    out, hidden = module(inp, hx)
    outs = {"y": out.data if isinstance(out, rnn_utils.PackedSequence) else out}
    if isinstance(hidden, tuple):
        outs["h_n"], outs["c_n"] = hidden
    else:
        outs["h_n"] = hidden
    loss = sum((o.double() * w.to(o.device)).sum() for o, w in zip(outs.values(), _output_weights(outs.values())))
    params = dict(module.named_parameters())
    grads = torch.autograd.grad(loss, list(made.values()) + list(params.values()), allow_unused=True)
    result = {n: o.detach().double().cpu() for n, o in outs.items()}
    for n, g in zip([f"d{n}" for n in made] + [f"d{n}" for n in params], grads):
        result[n] = None if g is None else g.double().cpu()
    return result


def noncontiguous(t):
    """The same values as `t` in every other element of a twice-as-large buffer (differentiable)."""
    return torch.stack([torch.zeros_like(t), t], t.dim()).select(t.dim(), 1)


# ----- cells: test_RNN_cell, test_LSTM_cell, test_RNN_cell_no_broadcasting, test_LSTM_cell_forward_* -----


# Under the interpreter (six steps forward and back, ~3 s): every cell with bias, the LSTM also without.
@pytest.mark.parametrize("name,kwargs,bias,device,backend", per_backend(
    [(f"{c}-{'bias' if b else 'nobias'}", n, k, b) for c, n, k in CELLS for b in (True, False)],
    {"rnn_tanh-bias", "rnn_relu-bias", "gru-bias", "lstm-bias", "lstm-nobias"}))
def test_cell_six_steps_match_torch(name, kwargs, bias, device, backend):
    """test_RNN_cell / test_LSTM_cell: six steps, each fed its own state back, then backward of the sum.
    PyTorch calls it a smoke test; here the states and every gradient must equal torch.nn's."""
    H = small(device, backend, 20, 7)
    theirs, ours = twins(name, 10, H, bias=bias, backend=backend, device=device, **kwargs)
    leaves = {"x": torch.randn(3, 10, dtype=torch.float64), "h0": torch.randn(3, H, dtype=torch.float64)}
    if name == "LSTMCell":
        leaves["c0"] = torch.randn(3, H, dtype=torch.float64)

    def run(module, dev):
        made = {n: t.clone().to(dev).requires_grad_() for n, t in leaves.items()}
        state = (made["h0"], made["c0"]) if name == "LSTMCell" else made["h0"]
        for _ in range(6):
            state = module(made["x"], state)
        outs = list(state) if name == "LSTMCell" else [state]
        params = dict(module.named_parameters())
        grads = torch.autograd.grad(sum(o.sum() for o in outs), list(made.values()) + list(params.values()))
        names = ["h6", "c6"][: len(outs)] + [f"d{n}" for n in made] + [f"d{n}" for n in params]
        return {n: t.detach().cpu() for n, t in zip(names, outs + list(grads))}

    assert_results_close(run(theirs, "cpu"), run(ours, device), FP64_TOL)  # fp64 on both sides


def _cell_error_cases():
    """(id, cell class, input shape, state shapes): PyTorch's cell error cases, I=10, H=20, B=3."""
    cases = []
    for name in ("RNNCell", "GRUCell", "LSTMCell"):
        n_states = 2 if name == "LSTMCell" else 1
        bad_states = {
            "hx-batch-1": (1, 20),        # test_RNN_cell_no_broadcasting: no broadcast over the batch
            "hx-hidden-1": (3, 1),        # ... nor over hidden_size
            "hidden-21": (3, 21),         # test_LSTM_cell_forward_hidden_size, module_error_inputs
            "hx-batch-5": (5, 20),        # module_error_inputs: "Input batch size 3 doesn't match ..."
            "hidden-4d": (3, 1, 1, 20),   # module_error_inputs: ValueError, "Expected hidden to be 1D or 2D"
        }
        for case, shape in bad_states.items():
            for k in range(n_states):  # the bad shape in h, then in c
                states = [(3, 20)] * n_states
                states[k] = shape
                cases.append((f"{name}-{case}" + (f"-state{k}" if n_states == 2 else ""), name, (3, 10), states))
        for case, shape in {"input-size-1": (3, 1), "input-size-11": (3, 11), "input-3d": (1, 3, 10)}.items():
            cases.append((f"{name}-{case}", name, shape, [(3, 20)] * n_states))
    return cases


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("case,name,x_shape,state_shapes", _cell_error_cases(), ids=[c[0] for c in _cell_error_cases()])
def test_cell_bad_input_raises_like_torch(case, name, x_shape, state_shapes, device, backend):
    """test_RNN_cell_no_broadcasting, test_LSTM_cell_forward_input_size/_hidden_size and common_modules'
    module_error_inputs_torch_nn_RNN_GRU_Cell: torch.nn's exception type and message."""
    theirs, ours = twins(name, 10, 20, backend=backend, device=device)
    x = torch.randn(*x_shape, dtype=torch.float64)
    states = [torch.randn(*s, dtype=torch.float64) for s in state_shapes]

    def call(module, dev):
        st = [s.to(dev) for s in states]
        return lambda: module(x.to(dev), tuple(st) if len(st) == 2 else st[0])

    assert_raises_like_torch(case, call(theirs, "cpu"), call(ours, device))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("cell,name,kwargs", CELLS, ids=[c[0] for c in CELLS])
@pytest.mark.parametrize("sizes", [(3, 0), (0, 7)], ids=["hidden0", "batch0"])
def test_cell_empty_sizes_match_torch(cell, name, kwargs, sizes, device, backend):
    """test_RNN_cell_forward_zero_hidden_size (RNNCell(10, 0) and GRUCell(10, 0) give a [3, 0] output; the
    LSTMCell too) and a batch of 0: the shapes torch.nn gives, and a backward that runs and gives its
    gradients (zeros)."""
    B, H = sizes
    theirs, ours = twins(name, 10, H, backend=backend, device=device, **kwargs)
    leaves = {"x": torch.randn(B, 10, dtype=torch.float64), "h0": torch.randn(B, H, dtype=torch.float64)}
    if name == "LSTMCell":
        leaves["c0"] = torch.randn(B, H, dtype=torch.float64)

    def run(module, dev):
        made = {n: t.clone().to(dev).requires_grad_() for n, t in leaves.items()}
        out = module(made["x"], (made["h0"], made["c0"]) if name == "LSTMCell" else made["h0"])
        outs = list(out) if isinstance(out, tuple) else [out]
        params = dict(module.named_parameters())
        grads = torch.autograd.grad(sum(o.sum() for o in outs), list(made.values()) + list(params.values()),
                                    allow_unused=True, materialize_grads=True)
        names = ["h1", "c1"][: len(outs)] + [f"d{n}" for n in made] + [f"d{n}" for n in params]
        return {n: t.detach().cpu() for n, t in zip(names, outs + list(grads))}

    assert_results_close(run(theirs, "cpu"), run(ours, device), FP64_TOL)  # fp64 on both sides


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("which", [0, 1], ids=["h", "c"])
def test_lstm_cell_backward_through_one_output(which, device, backend):
    """test_lstmcell_backward_only_one_output_grad (#11872): backward from h alone or c alone (the other
    output's gradient undefined) reaches the input, as in torch.nn."""
    theirs, ours = twins("LSTMCell", 2, 3, backend=backend, device=device)
    s = torch.randn(1, 2, dtype=torch.float64)
    grads = []
    for module, dev in ((theirs, "cpu"), (ours, device)):
        x = s.clone().to(dev).requires_grad_()
        module(x)[which].sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0, f"d{'hc'[which]}/dx is missing or zero"
        grads.append(x.grad.cpu())
    assert_close("dx", grads[0], grads[1], **FP64_TOL)  # fp64 on both sides


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("hx", [True, False], ids=["hx", "nohx"])
@pytest.mark.parametrize("cell,name,kwargs", CELLS, ids=[c[0] for c in CELLS])
def test_cell_without_batch_dim(cell, name, kwargs, hx, device, backend):
    """common_modules' module_inputs_torch_nn_RNN_GRU_Cell / LSTMCell: 1-D input and state (no batch dim)
    equal torch.nn's, and the batched result of a batch of one (no_batch_dim_reference_fn)."""
    theirs, ours = twins(name, 5, 8, backend=backend, device=device, **kwargs)
    x = torch.randn(5, dtype=torch.float64)
    states = [torch.randn(8, dtype=torch.float64) for _ in range(2 if name == "LSTMCell" else 1)]

    def run(module, dev, batched):
        st = [s.to(dev).unsqueeze(0) if batched else s.to(dev) for s in states]
        state = (tuple(st) if len(st) == 2 else st[0]) if hx else None
        out = module(x.to(dev).unsqueeze(0) if batched else x.to(dev), state)
        outs = list(out) if isinstance(out, tuple) else [out]
        return {n: (o.squeeze(0) if batched else o).detach().cpu() for n, o in zip(["h", "c"], outs)}

    ref = run(theirs, "cpu", False)
    assert_results_close(ref, run(ours, device, False), FP64_TOL)  # fp64 on both sides
    assert_results_close(ref, run(ours, device, True), FP64_TOL, "batched of one: ")


# ----- constructor arguments: test_invalid_dropout_p, test_projections_errors_on_gru_and_rnn,
# test_RNN_nonlinearity(_passed_as_arg) -----

CONSTRUCTOR_ERRORS = [
    ("lstm-dropout-negative", "LSTM", (10, 10), dict(dropout=-0.1)),
    ("lstm-dropout-above-1", "LSTM", (10, 10), dict(dropout=1.1)),
    ("gru-dropout-bool", "GRU", (10, 10), dict(dropout=True)),
    ("rnn-dropout-str", "RNN", (10, 10), dict(dropout="0.5")),
    ("rnn-proj", "RNN", (30, 20, 2), dict(proj_size=10)),
    ("gru-proj", "GRU", (30, 20, 2), dict(proj_size=10)),
    ("lstm-proj-equals-hidden", "LSTM", (30, 20, 2), dict(proj_size=20)),
    ("lstm-proj-negative", "LSTM", (30, 20, 2), dict(proj_size=-1)),
    ("lstm-hidden-0", "LSTM", (10, 0), {}),
    ("gru-layers-0", "GRU", (10, 4, 0), {}),
    ("rnn-unknown-nonlinearity", "RNN", (1, 10), dict(nonlinearity="garbage")),
    ("rnn-unknown-nonlinearity-positional", "RNN", (1, 10, 1, "garbage"), {}),
]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("case,name,args,kwargs", CONSTRUCTOR_ERRORS, ids=[c[0] for c in CONSTRUCTOR_ERRORS])
def test_constructor_errors_are_torchs(case, name, args, kwargs, device, backend):
    assert_raises_like_torch(case, lambda: TORCH_CLASSES[name](*args, **kwargs),
                             lambda: FASTRNN_CLASSES[name](*args, backend=backend, **kwargs))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_dropout_with_one_layer_warns_like_torch(device, backend):
    """torch.nn warns that dropout acts between layers only; fastrnn's constructor is torch's, so it must too."""
    messages = []
    for make in (lambda: nn.LSTM(10, 10, dropout=0.5), lambda: fastrnn.LSTM(10, 10, dropout=0.5, backend=backend)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make()
        messages.append([str(w.message) for w in caught if issubclass(w.category, UserWarning)])
    assert messages[0], "torch.nn no longer warns: the case tests nothing"
    assert messages[1] == messages[0], f"torch.nn warns {messages[0]}, fastrnn {messages[1]}"


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("how", ["default", "kwarg", "positional"])
def test_rnn_nonlinearity(how, device, backend):
    """test_RNN_nonlinearity / _passed_as_arg: tanh by default, relu as keyword or as the 4th positional
    argument, and the kernels then really apply relu (the output equals torch.nn's)."""
    args, kwargs, expected = {
        "default": ((2, 3, 1), {}, "tanh"),
        "kwarg": ((2, 3, 1), {"nonlinearity": "relu"}, "relu"),
        "positional": ((2, 3, 1, "relu"), {}, "relu"),
    }[how]
    theirs, ours = twins("RNN", *args, backend=backend, device=device, **kwargs)
    assert ours.nonlinearity == theirs.nonlinearity == expected
    x = torch.randn(4, 3, 2, dtype=torch.float64)
    ref = {"y": theirs(x)[0].detach()}
    assert_results_close(ref, {"y": ours(x.to(device))[0].detach().cpu()}, FP64_TOL)  # fp64 on both sides


# ----- forward arguments: test_rnn_args_check, test_projections_lstm_args_check, test_cudnn_forward_exception -----


def _args_check_cases():
    """(id, class, constructor kwargs, input shape, state shapes (h, c) or (h,)): I=3, H=5, L=2, T=6, B=4,
    bad size 7 (prime, so no size divides it); proj 2."""
    I, H, L, T, B, bad, P = 3, 5, 2, 6, 4, 7, 2
    cases = []
    for name in ("RNN", "GRU", "LSTM"):
        n = 2 if name == "LSTM" else 1
        good_x, good_h = (T, B, I), (L, B, H)
        wrong = {"input-batch": ((T, bad, I), None), "hidden-batch": (good_x, (L, bad, H)),
                 "input-size": ((T, B, bad), None), "hidden-size": (good_x, (L, B, bad)),
                 "hidden-layers": (good_x, (bad, B, H))}
        for case, (x, h) in wrong.items():
            if h is None or n == 1:
                cases.append((f"{name}-{case}", name, {}, x, [h or good_h] * n))
            else:  # test_rnn_args_check: the bad shape in h with a good c, then the other way round
                cases.append((f"{name}-{case}-h", name, {}, x, [h, good_h]))
                cases.append((f"{name}-{case}-c", name, {}, x, [good_h, h]))
    proj = {"proj_size": P}
    good_x, good_h, good_c = (T, B, I), (L, B, P), (L, B, H)
    for case, x, h, c in [
        ("input-batch", (T, bad, I), good_h, good_c),
        ("hidden-batch", good_x, (L, bad, P), (L, bad, H)),
        ("input-size", (T, B, bad), good_h, good_c),
        ("hidden-size", good_x, (L, B, bad), (L, B, bad)),
        ("hidden-layers", good_x, (bad, B, P), (bad, B, H)),
        ("h-of-hidden-size", good_x, (L, B, H), good_c),  # h must be proj_size wide, not hidden_size
        ("h-size", good_x, (L, B, bad), good_c),
        ("c-layers", good_x, good_h, (bad, B, H)),
    ]:
        cases.append((f"LSTM-proj-{case}", "LSTM", proj, x, [h, c]))
    # test_cudnn_forward_exception: batch_first, hidden of size 19 for H=20, then input of size 3 for I=10
    for name, kw, n in (("LSTM", {}, 2), ("LSTM", {"proj_size": 10}, 2), ("GRU", {}, 1), ("RNN", {}, 1)):
        tag = f"{name}{'-proj' if kw else ''}-batch-first"
        kw = dict(kw, batch_first=True, _sizes=(10, 20))
        cases.append((f"{tag}-hidden-19", name, kw, (2, 3, 10), [(1, 2, 19)] * n))
        cases.append((f"{tag}-input-3", name, kw, (2, 3, 3), None))
    return cases


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("case,name,kwargs,x_shape,state_shapes", _args_check_cases(),
                         ids=[c[0] for c in _args_check_cases()])
def test_rnn_args_check(case, name, kwargs, x_shape, state_shapes, device, backend):
    """test_rnn_args_check, test_projections_lstm_args_check, test_cudnn_forward_exception: every wrong
    shape of input or state raises torch.nn's exception with torch.nn's message."""
    kwargs = dict(kwargs)
    I, H = kwargs.pop("_sizes", (3, 5))
    theirs, ours = twins(name, I, H, backend=backend, device=device, num_layers=1 if "batch-first" in case else 2,
                         **kwargs)
    x = torch.randn(*x_shape, dtype=torch.float64)
    states = None if state_shapes is None else [torch.randn(*s, dtype=torch.float64) for s in state_shapes]

    def call(module, dev):
        st = None if states is None else [s.to(dev) for s in states]
        hx = None if st is None else (tuple(st) if len(st) == 2 else st[0])
        return lambda: module(x.to(dev), hx)

    assert_raises_like_torch(case, call(theirs, "cpu"), call(ours, device))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("name", ["GRU", "LSTM"])
def test_state_of_another_dtype_is_a_clear_error(name, device, backend):
    """torch.nn on the CPU fails deep inside (RuntimeError 'mat1 and mat2 must have the same dtype'); we
    raise the same type, naming the state and both dtypes."""
    theirs, ours = twins(name, 3, 4, backend=backend, device=device)
    x = torch.randn(2, 3, 3, dtype=torch.float64)
    h = torch.randn(1, 3, 4)  # fp32 state for an fp64 input and module
    hx = (h, h) if name == "LSTM" else h
    hx_there = tuple(s.to(device) for s in hx) if name == "LSTM" else hx.to(device)
    assert_raises_like_torch("fp32 hx for fp64 input", lambda: theirs(x, hx), lambda: ours(x.to(device), hx_there),
                             own_message=r"hx must have the input's dtype.*float64.*float32")


# ----- initial state: test_rnn_initial_hidden_state, test_projections_lstm_initial_hidden_state -----


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize(
    "layer,name,kwargs", LAYERS + [("lstm_proj_bidir", "LSTM", dict(proj_size=3, bidirectional=True))],
    ids=[c[0] for c in LAYERS] + ["lstm_proj_bidir"])
def test_rnn_initial_hidden_state(layer, name, kwargs, device, backend):
    """A zero initial state given explicitly gives exactly what no initial state gives, and both equal
    torch.nn's (PyTorch: RNN(30, 20, 2), T=10, B=32)."""
    I, H, T, B = small(device, backend, (30, 20, 10, 32), (6, 8, 4, 3))
    theirs, ours = twins(name, I, H, 2, backend=backend, device=device, **kwargs)
    D = 2 if kwargs.get("bidirectional") else 1
    x = torch.randn(T, B, I, dtype=torch.float64)
    h = torch.zeros(2 * D, B, kwargs.get("proj_size") or H, dtype=torch.float64)
    hx = (h, torch.zeros(2 * D, B, H, dtype=torch.float64)) if name == "LSTM" else h

    def outputs(module, dev, state):
        if state is not None:
            state = tuple(s.to(dev) for s in state) if isinstance(state, tuple) else state.to(dev)
        y, hidden = module(x.to(dev), state)
        hidden = list(hidden) if isinstance(hidden, tuple) else [hidden]
        return {n: t.detach().cpu() for n, t in zip(["y", "h_n", "c_n"], [y] + hidden)}

    given, default = outputs(ours, device, hx), outputs(ours, device, None)
    for what in given:
        assert_equal(f"{what} (zero hx vs none)", given[what], default[what])
    assert_results_close(outputs(theirs, "cpu", None), default, FP64_TOL)  # fp64 on both sides


# ----- numbers against torch.nn: test_RNN_cpu_vs_cudnn_no_dropout/_with_dropout, test_rnn_fused -----

# (id, flags): PyTorch crosses bias x bidirectional x batch_first x contiguous x variable length x lengths
# as a tensor (64 combinations, x 2 dropouts) for each cell; these rows cover every pair of those factors.
CUDNN_FORMS = [
    ("bias-bidir-bf-contig-packed-list",
     dict(bias=True, bidirectional=True, batch_first=True, contig=True, lengths="list")),
    ("nobias-bidir-noncontig-packed-tensor",
     dict(bias=False, bidirectional=True, batch_first=False, contig=False, lengths="tensor")),
    ("bias-bf-noncontig-padded",
     dict(bias=True, bidirectional=False, batch_first=True, contig=False, lengths=None)),
    ("nobias-bf-contig-packed-tensor",
     dict(bias=False, bidirectional=False, batch_first=True, contig=True, lengths="tensor")),
    ("bias-bidir-noncontig-padded",
     dict(bias=True, bidirectional=True, batch_first=False, contig=False, lengths=None)),
    ("nobias-contig-packed-list",
     dict(bias=False, bidirectional=False, batch_first=False, contig=True, lengths="list")),
    ("bias-bidir-dropout1-packed",
     dict(bias=True, bidirectional=True, batch_first=False, contig=True, lengths="tensor", dropout=1.0)),
]
# Under the interpreter (~2.5 s a case), forms that together still cover bias, bidirectional, batch_first,
# contiguity, packing (list and tensor lengths) and dropout, spread over the cells.
INTERPRETER_CUDNN = {"rnn_tanh-bias-bidir-bf-contig-packed-list", "rnn_relu-nobias-bidir-noncontig-packed-tensor",
                     "gru-bias-bidir-dropout1-packed", "gru-nobias-bidir-noncontig-packed-tensor",
                     "lstm-bias-bidir-bf-contig-packed-list", "lstm_proj-bias-bidir-dropout1-packed"}


def _cudnn_params():
    return per_backend([(f"{layer}-{form}", name, kwargs, flags) for layer, name, kwargs in LAYERS
                        for form, flags in CUDNN_FORMS], INTERPRETER_CUDNN)


@pytest.mark.parametrize("name,kwargs,flags,device,backend", _cudnn_params())
def test_matches_torch_like_cpu_vs_cudnn(name, kwargs, flags, device, backend):
    """_test_RNN_cpu_vs_cudnn: 2 layers, I=10, H=6 (proj 3), T=7, B=6, lengths 7,5,5,2,1,1; h0 given and
    c0 = h0 + 1; every output and every gradient (input, h0, c0, all weights) equal torch.nn's in fp64.
    dropout=1 in training is deterministic (the second layer sees zeros), so it is compared too."""
    T, lengths = small(device, backend, (7, [7, 5, 5, 2, 1, 1]), (5, [5, 4, 4, 2, 1, 1]))
    I, H, L, B = 10, 6, 2, 6
    flags = dict(flags)
    contig, kind, dropout = flags.pop("contig"), flags.pop("lengths"), flags.pop("dropout", 0.0)
    theirs, ours = twins(name, I, H, L, backend=backend, device=device, dropout=dropout, **kwargs, **flags)
    D = 2 if flags["bidirectional"] else 1
    Hout = kwargs.get("proj_size") or H
    x = torch.randn(B, T, I, dtype=torch.float64) if flags["batch_first"] else torch.randn(T, B, I, dtype=torch.float64)
    leaves = {"x": x, "h0": torch.randn(L * D, B, Hout, dtype=torch.float64)}
    if name == "LSTM":
        leaves["c0"] = torch.randn(L * D, B, H, dtype=torch.float64)

    def build(made):
        view = (lambda t: t) if contig else noncontiguous
        inp = view(made["x"])
        if kind is not None:
            lens = torch.tensor(lengths) if kind == "tensor" else lengths
            inp = rnn_utils.pack_padded_sequence(inp, lens, batch_first=flags["batch_first"])
        h0 = view(made["h0"])
        return inp, ((h0, view(made["c0"]) + 1) if name == "LSTM" else h0)

    ref = forward_backward(theirs, leaves, build)
    assert_results_close(ref, forward_backward(ours, leaves, build, device), FP64_TOL)  # fp64 on both sides


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("name", ["GRU", "LSTM"])
def test_rnn_fused(name, bias, device, backend):
    """test_rnn_fused (PyTorch's fused CUDA kernels against its CPU path, float and double): GRU and LSTM,
    2 layers, I=10, H=6, T=7, B=6, h0 given and c0 = h0 + 1, in fp32 against torch.nn in fp64 (fp64 is
    test_matches_torch_like_cpu_vs_cudnn's)."""
    T = small(device, backend, 7, 5)
    theirs, ours = twins(name, 10, 6, 2, backend=backend, device=device, dtype=torch.float32, bias=bias)
    leaves = {"x": torch.randn(T, 6, 10, dtype=torch.float64), "h0": torch.randn(2, 6, 6, dtype=torch.float64)}

    def build(made):
        return made["x"], ((made["h0"], made["h0"] + 1) if name == "LSTM" else made["h0"])

    ref = forward_backward(theirs, leaves, build)
    assert_results_close(ref, forward_backward(ours, leaves, build, device, torch.float32), FP32_TOL)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("layer,name,kwargs", LAYERS, ids=[c[0] for c in LAYERS])
def test_no_batch_dim_matches_torch(layer, name, kwargs, device, backend):
    """common_modules' module_inputs_torch_nn_RNN_GRU / LSTM: 2-D input (no batch dim), 2 layers,
    bidirectional, batch_first (which then changes nothing), with and without hx; H=5 (PyTorch: 2 and 3,
    here 5 so that the LSTM's proj_size 3 fits)."""
    theirs, ours = twins(name, 2, 5, 2, backend=backend, device=device, bidirectional=True, batch_first=True, **kwargs)
    Hout = kwargs.get("proj_size") or 5
    for hx in (False, True):
        leaves = {"x": torch.randn(3, 2, dtype=torch.float64)}
        if hx:
            leaves["h0"] = torch.randn(4, Hout, dtype=torch.float64)
            if name == "LSTM":
                leaves["c0"] = torch.randn(4, 5, dtype=torch.float64)

        def build(made):
            if "c0" in made:
                return made["x"], (made["h0"], made["c0"])
            return made["x"], made.get("h0")

        ref = forward_backward(theirs, leaves, build)
        assert_results_close(ref, forward_backward(ours, leaves, build, device), FP64_TOL,  # fp64 on both sides
                             "hx: " if hx else "no hx: ")


# ----- dropout: test_RNN_dropout, test_RNN_dropout_state, test_RNN_change_dropout -----


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("p", [0, 0.276, 0.731, 1])
def test_RNN_dropout(p, train, device, backend):
    """test_RNN_dropout: RNN(10, H, 2, relu, no bias), all weights 1, input ones, T=1, B=1, h0 = 0. Layer 0
    gives 10 in every unit; the second layer sees dropout(10), so its output is 10 * H * (kept fraction) /
    (1 - p): 10H for p = 0 and in eval, 0 for p = 1, and otherwise a multiple of 10 / (1 - p), the same in
    every unit (PyTorch's H = 1000 also bounds it: 8000..12000)."""
    H = small(device, backend, 1000, 8)
    rnn = fastrnn.RNN(10, H, 2, bias=False, dropout=p, nonlinearity="relu", backend=backend).to(device, torch.float64)
    rnn.train(train)
    with torch.no_grad():
        for w in rnn.parameters():
            w.fill_(1)
    output, hy = rnn(torch.ones(1, 1, 10, dtype=torch.float64, device=device),
                     torch.zeros(2, 1, H, dtype=torch.float64, device=device))
    output, hy = output.cpu(), hy.cpu()
    assert output.min() == output.max(), f"output differs between units: {output.min()} .. {output.max()}"
    value = float(output[0, 0, 0])
    if p == 0 or not train:
        assert value == 10 * H, f"output {value}, expected {10 * H}"
    elif p == 1:
        assert value == 0, f"output {value}, expected 0"
    else:
        kept = value * (1 - p) / 10  # how many of the H inputs of the second layer dropout kept
        assert abs(kept - round(kept)) < 1e-6 and 0 <= round(kept) <= H, f"output {value}: {kept} units kept"
        if H == 1000:
            assert 8000 < value < 12000, f"output {value} far from 10000"
    assert hy[0].min() == hy[0].max() == 10, f"h_n of layer 0: {hy[0].min()} .. {hy[0].max()}, expected 10"
    assert hy[1].min() == hy[1].max() == value, f"h_n of layer 1: {hy[1].min()} .. {hy[1].max()}, expected {value}"


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("p", [0, 0.1234])
def test_RNN_dropout_state(p, train, device, backend):
    """test_RNN_dropout_state: two calls and a torch.save/torch.load copy agree with p = 0 or in eval and
    differ with dropout in training; the copy is still a fastrnn module with the same backend."""
    # The interpreter's H=8 gets a batch of 8, so that two dropout masks (64 elements, p = 0.1234) are
    # equal with probability ~1e-7 (PyTorch: H=100, B=1, 100 elements).
    H, B = small(device, backend, (100, 1), (8, 8))
    rnn = fastrnn.RNN(H, H, 2, bias=False, dropout=p, nonlinearity="relu", backend=backend).to(device)
    rnn.train(train)
    x, hx = torch.rand(1, B, H, device=device), torch.rand(2, B, H, device=device)
    output1, hy1 = rnn(x, hx)
    output2, hy2 = rnn(x, hx)
    buf = io.BytesIO()
    torch.save(rnn, buf)
    buf.seek(0)
    rnn2 = torch.load(buf, weights_only=False)
    assert type(rnn2) is fastrnn.RNN and rnn2.backend == backend
    rnn2.flatten_parameters()
    output3, hy3 = rnn2(x, hx)
    pairs = {"output 1 vs 2": (output1, output2), "output 1 vs loaded": (output1, output3),
             "h_n 1 vs 2": (hy1, hy2), "h_n 1 vs loaded": (hy1, hy3)}
    for what, (a, b) in pairs.items():
        if p == 0 or not train:
            assert torch.equal(a, b), f"{what}: differ without dropout"
        else:
            assert not torch.equal(a, b), f"{what}: equal although dropout is on in training"


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_RNN_change_dropout(train, device, backend):
    """test_RNN_change_dropout: `rnn.dropout = p` between calls takes effect at once."""
    H = small(device, backend, 100, 8)
    rnn = fastrnn.RNN(H, H, 2, dropout=0, nonlinearity="relu", backend=backend).to(device, torch.float64)
    rnn.train(train)
    x = torch.rand(3, 2, H, dtype=torch.float64, device=device)
    prev = None
    for p in (0, 0.5, 0, 0.7, 0.2, 1, 0.2, 0):
        rnn.dropout = p
        output1, hy1 = rnn(x)
        output2, hy2 = rnn(x)
        if p == 0 or p == 1 or not train:
            assert torch.equal(output1, output2) and torch.equal(hy1, hy2), f"p={p}: two calls differ"
        else:
            assert not torch.equal(output1, output2) and not torch.equal(hy1, hy2), f"p={p}: two calls equal"
        if prev is not None:
            if not train:
                assert torch.equal(output1, prev) and torch.equal(output2, prev), f"p={p}: eval output changed"
            else:
                assert not torch.equal(output1, prev) and not torch.equal(output2, prev), (
                    f"p={p}: training output equals the previous p's")
        prev = output1


# ----- empty inputs: test_RNN_input_size_zero, test_error_RNN_seq_len_zero -----


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("layer,name,kwargs", LAYERS, ids=[c[0] for c in LAYERS])
def test_RNN_input_size_zero(layer, name, kwargs, device, backend):
    """test_RNN_input_size_zero: a batch of 0 ([5, 0, 3]) gives a [5, 0, Hout] output and a backward that
    does not fail; here also h_n, c_n and every gradient (zeros) as torch.nn gives them."""
    theirs, ours = twins(name, 3, 4, backend=backend, device=device, **kwargs)

    def run(module, dev):
        x = torch.zeros(5, 0, 3, dtype=torch.float64, device=dev, requires_grad=True)
        y, hidden = module(x)
        hidden = list(hidden) if isinstance(hidden, tuple) else [hidden]
        params = dict(module.named_parameters())
        grads = torch.autograd.grad(y.sum() + sum(h.sum() for h in hidden), [x] + list(params.values()),
                                    allow_unused=True, materialize_grads=True)
        names = ["y", "h_n", "c_n"][: 1 + len(hidden)] + ["dx"] + [f"d{n}" for n in params]
        return {n: t.detach().cpu() for n, t in zip(names, [y] + hidden + list(grads))}

    ref = run(theirs, "cpu")
    assert ref["y"].shape == (5, 0, kwargs.get("proj_size") or 4)
    assert_results_close(ref, run(ours, device), FP64_TOL)  # fp64 on both sides


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("form", ["batched", "batch_first", "unbatched", "batch0"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["unidir", "bidir"])
@pytest.mark.parametrize("name", ["RNN", "LSTM", "GRU"])
def test_error_RNN_seq_len_zero(name, bidirectional, form, device, backend):
    """test_error_RNN_seq_len_zero: T = 0 raises RuntimeError('Expected sequence length to be larger than
    0 in RNN') in every input form (PyTorch checks [0, 10, 5] on the CPU and cuDNN)."""
    theirs, ours = twins(name, 5, 6, backend=backend, device=device, bidirectional=bidirectional,
                         batch_first=form == "batch_first")
    shape = {"batched": (0, 10, 5), "batch_first": (10, 0, 5), "unbatched": (0, 5), "batch0": (0, 0, 5)}[form]
    x = torch.ones(*shape, dtype=torch.float64)
    assert_raises_like_torch(f"T=0 {form}", lambda: theirs(x), lambda: ours(x.to(device)))


# ----- weights: test_rnn_weight_norm, test_RNN_cudnn_weight_norm, test_partial_flat_weights,
# test_cudnn_weight_format, test_cudnn_weight_tying, test_module_apply_inplace_op -----


def _sequence_results(module, x, dev):
    """y and every parameter's gradient of the sum of y (named as the module names them)."""
    y, _ = module(x.to(dev))
    params = dict(module.named_parameters())
    grads = torch.autograd.grad(y.sum(), list(params.values()))
    return {"y": y.detach().cpu(), **{f"d{n}": g.cpu() for n, g in zip(params, grads)}}


# Under the interpreter (~3 s a case): the recurrent weights (weight_ih_l0 only feeds the input GEMM).
@pytest.mark.parametrize("proj,weight,device,backend", per_backend(
    [("weight_ih_l0", 0, "weight_ih_l0"), ("weight_hh_l0", 0, "weight_hh_l0"),
     ("proj-weight_hr_l0", 3, "weight_hr_l0")],
    {"weight_hh_l0", "proj-weight_hr_l0"}))
def test_rnn_weight_norm(proj, weight, device, backend):
    """test_rnn_weight_norm + test_RNN_cudnn_weight_norm: torch.nn.utils.weight_norm makes one weight a
    computed tensor (one Parameter fewer in _flat_weights, as in torch.nn); the output and the gradients
    of weight_g / weight_v equal torch.nn's under the same weight norm; remove_weight_norm restores the
    Parameter and the output. PyTorch: LSTM(10, 6, 2), T=7, B=6."""
    H, T = small(device, backend, (6, 7), (6, 4))
    theirs, ours = twins("LSTM", 10, H, 2, backend=backend, device=device, proj_size=proj)
    n_params = len(ours._flat_weights)
    x = torch.randn(T, 6, 10, dtype=torch.float64)
    plain = _sequence_results(theirs, x, "cpu")["y"]
    theirs = torch.nn.utils.weight_norm(theirs, name=weight)
    ours = torch.nn.utils.weight_norm(ours, name=weight)
    count = sum(isinstance(p, nn.Parameter) for p in ours._flat_weights)
    assert count == n_params - 1, f"{count} Parameters in _flat_weights under weight norm, torch.nn has {n_params - 1}"
    assert_close("y (weight norm vs plain)", plain, _sequence_results(theirs, x, "cpu")["y"], **FP64_TOL)
    # The oracle runs on `device`: weight norm is torch's own arithmetic, and on CUDA its fp64 result is not
    # the CPU's (H200, torch 2.11: torch._weight_norm 6-8e-8 relative apart, norm_except_dim 2e-16; every
    # backend, the reference included, then missed FP64_TOL against a CPU oracle).
    ref = _sequence_results(theirs.to(device), x, device)
    assert_results_close(ref, _sequence_results(ours, x, device), FP64_TOL)  # fp64 on both sides
    ours = torch.nn.utils.remove_weight_norm(ours, name=weight)
    assert sum(isinstance(p, nn.Parameter) for p in ours._flat_weights) == n_params
    assert weight in dict(ours.named_parameters()) and weight + "_v" not in dict(ours.named_parameters())
    assert_close("y after remove_weight_norm", plain, _sequence_results(ours, x, device)["y"], **FP64_TOL)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("layer,name,kwargs", LAYERS, ids=[c[0] for c in LAYERS])
def test_rnn_parametrized_weight_norm(layer, name, kwargs, device, backend):
    """torch.nn.utils.parametrizations.weight_norm (the parametrize-based successor) on weight_hh_l0: the
    output and the gradients of original0 / original1 equal torch.nn's."""
    T = small(device, backend, 7, 4)
    theirs, ours = twins(name, 4, 6, 2, backend=backend, device=device, **kwargs)
    x = torch.randn(T, 3, 4, dtype=torch.float64)
    # The oracle on `device`, as in test_rnn_weight_norm (torch's fp64 weight norm on CUDA is not the CPU's).
    ref = _sequence_results(torch.nn.utils.parametrizations.weight_norm(theirs.to(device), "weight_hh_l0"), x, device)
    out = _sequence_results(torch.nn.utils.parametrizations.weight_norm(ours, "weight_hh_l0"), x, device)
    assert_results_close(ref, out, FP64_TOL)  # fp64 on both sides


# The weights are read in modules.py, the same for every backend; under the interpreter (~5 s a case) the
# GRU (b_hh kept apart) and the projected LSTM (the most weights).
@pytest.mark.parametrize("name,kwargs,device,backend", per_backend(LAYERS, {"gru", "lstm_proj"}))
def test_weights_replaced_deleted_and_tied(name, kwargs, device, backend):
    """test_partial_flat_weights (a weight deleted, then set again), test_cudnn_weight_format (weights moved
    out of one storage with set_) and test_cudnn_weight_tying (bias_ih_l0_reverse = bias_ih_l0, then an SGD
    step): each time the outputs and gradients equal torch.nn's under the same change."""
    T = small(device, backend, 5, 2)
    theirs, ours = twins(name, 4, 6, 2, backend=backend, device=device, bidirectional=True, **kwargs)
    x = torch.randn(T, 3, 4, dtype=torch.float64)

    def both(what):
        assert_results_close(_sequence_results(theirs, x, "cpu"), _sequence_results(ours, x, device), FP64_TOL,
                             what)  # fp64 on both sides

    for m in (theirs, ours):
        w = m.weight_hh_l0
        del m.weight_hh_l0
        assert not hasattr(m, "weight_hh_l0")
        m.weight_hh_l0 = w
    both("after del/reassign: ")
    for m in (theirs, ours):
        with torch.no_grad():
            m.weight_ih_l1.set_(m.weight_ih_l1.clone())
    both("after set_: ")
    for m in (theirs, ours):
        m.bias_ih_l0_reverse = m.bias_ih_l0
    both("tied: ")
    for m in (theirs, ours):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        m(x.to(next(m.parameters()).device))[0].sum().backward()
        opt.step()
    assert torch.equal(ours.bias_ih_l0_reverse, ours.bias_ih_l0)
    both("tied, after a step: ")


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("layer,name,kwargs", LAYERS, ids=[c[0] for c in LAYERS])
def test_module_apply_inplace_op(layer, name, kwargs, device, backend):
    """test_module_apply_inplace_op: after module._apply(t.add_(1)) the parameters' version counters have
    moved, and a backward through a graph built before must fail as in torch.nn ('modified by an inplace
    operation'), not silently use the new weights. (torch.nn's *Cell modules do not detect it on the CPU,
    so there is nothing to compare them with.)"""
    theirs, ours = twins(name, 4, 5, backend=backend, device=device, **kwargs)
    x = torch.randn(3, 3, 4, dtype=torch.float64)

    def stale_backward(module, dev):
        y, _ = module(x.to(dev))
        version = module.weight_hh_l0._version
        module._apply(lambda t: t.add_(1.0))
        now = module.weight_hh_l0._version
        assert now > version, "_apply(add_) did not bump the version counter"
        return lambda: y.sum().backward()

    assert_raises_like_torch("backward after _apply(add_)", stale_backward(theirs, "cpu"),
                             stale_backward(ours, device), own_message="modified by an inplace operation")


# ----- gradients: test_LSTM_grad_and_gradgrad, test_GRU_grad_and_gradgrad, test_rnn_retain_variables,
# test_LSTM_differentiable_backward_using_oneDNN -----

GRADGRAD_FORMS = [
    ("L1", dict(), None),
    ("L2-bidir", dict(num_layers=2, bidirectional=True), None),
    ("packed-unsorted", dict(), [1, 3, 2]),
]


# Under the interpreter (~2 s a case): every cell at L1 with bias, layers and packing on one cell each.
INTERPRETER_GRADGRAD = {f"{c}-bias-L1" for c, _, _ in LAYERS} | {"lstm_proj-bias-L2-bidir", "gru-bias-packed-unsorted"}


def _gradgrad_params():
    rows = []
    for (layer, name, kwargs), bias, (form, form_kwargs, lengths) in itertools.product(
            LAYERS, [True, False], GRADGRAD_FORMS):
        if form == "L1" or bias:  # the forms vary layers and packing; bias is crossed with the plain one
            rows.append((f"{layer}-{'bias' if bias else 'nobias'}-{form}", name,
                         dict(kwargs, **form_kwargs, bias=bias), lengths))
    return per_backend(rows, INTERPRETER_GRADGRAD)


def _second_order(fn, inputs, names):
    """The derivatives of <d(loss)/d(inputs), v> for a fixed loss = sum of fn's outputs weighted by w and a
    fixed random v (a Hessian-vector product, what a gradient penalty differentiates), with respect to the
    inputs and to the weighting w (the backward's derivative in its incoming gradient, which
    gradgradcheck checks too)."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*inputs)
    ws = [w.to(o.device).requires_grad_() for o, w in zip(outs, _output_weights(outs))]
    loss = sum((o * w).sum() for o, w in zip(outs, ws))
    grads = torch.autograd.grad(loss, inputs, create_graph=True)
    g = torch.Generator().manual_seed(11)
    penalty = sum((d * torch.randn(d.shape, generator=g, dtype=d.dtype).to(d.device)).sum() for d in grads)
    second = torch.autograd.grad(penalty, inputs + ws, allow_unused=True, materialize_grads=True)
    names = names + [f"w_{n}" for n in ["y", "h_n", "c_n"][: len(ws)]]
    return {f"d2/d{n}": t.detach().cpu() for n, t in zip(names, second)}


@pytest.mark.parametrize("name,kwargs,lengths,device,backend", _gradgrad_params())
def test_grad_and_gradgrad(name, kwargs, lengths, device, backend):
    """test_LSTM_grad_and_gradgrad / test_GRU_grad_and_gradgrad (PyTorch: hsize 4, input [1, 3, 4], bias
    and not): gradcheck and gradgradcheck in fp64 of every output, and before gradgradcheck the second
    derivatives themselves against torch.nn's (a failing gradgradcheck recomputes everything in its slow
    mode, minutes under the interpreter; the comparison fails in a second and names the tensor).
    PyTorch differentiates with respect to the input only; here also h0, c0 and every weight (through
    torch.func.functional_call), except under the interpreter, where each numerical derivative costs a
    forward of ~0.2 s: it gets the input and the states, as in PyTorch."""
    H = 4
    theirs, module = twins(name, H, H, backend=backend, device=device, **kwargs)
    D = 2 if kwargs.get("bidirectional") else 1
    L = kwargs.get("num_layers", 1)
    Hout = kwargs.get("proj_size") or H
    x = torch.rand(3 if lengths else 1, 3, H, dtype=torch.float64, device=device, requires_grad=True)
    states = [torch.randn(L * D, 3, Hout, dtype=torch.float64, device=device, requires_grad=True)]
    if name == "LSTM":
        states.append(torch.randn(L * D, 3, H, dtype=torch.float64, device=device, requires_grad=True))
    names = [] if interpreted(device, backend) else [n for n, _ in module.named_parameters()]
    weights = [p.detach().clone().requires_grad_() for n, p in module.named_parameters() if n in names]

    def outputs_of(m):
        def outputs(x, *rest):
            st, ws = rest[: len(states)], rest[len(states):]
            inp = x if lengths is None else rnn_utils.pack_padded_sequence(x, lengths, enforce_sorted=False)
            hx = tuple(st) if name == "LSTM" else st[0]
            y, hidden = torch.func.functional_call(m, dict(zip(names, ws)), (inp, hx))
            y = y.data if lengths is not None else y
            return (y, *hidden) if isinstance(hidden, tuple) else (y, hidden)
        return outputs

    inputs = (x, *states, *weights)
    # fast_mode (PyTorch's OpInfo default in CI): the numerical derivative along one random direction per
    # input tensor instead of one per element; the full mode needs ~1500 forwards for the 2-layer
    # bidirectional LSTM's 768 weight elements (~15 s on the reference backend), and gradgradcheck more.
    assert torch.autograd.gradcheck(outputs_of(module), inputs, check_batched_grad=False, fast_mode=True)
    leaf_names = ["x", "h0", "c0"][: 1 + len(states)] + names
    ref = _second_order(outputs_of(theirs), [t.cpu() for t in inputs], leaf_names)
    assert_results_close(ref, _second_order(outputs_of(module), inputs, leaf_names), FP64_TOL)  # fp64 both sides
    assert torch.autograd.gradgradcheck(outputs_of(module), inputs, check_batched_grad=False, fast_mode=True)


# Under the interpreter (~2.5 s a case): each cell in one of the two dtypes.
@pytest.mark.parametrize("name,dtype,device,backend", per_backend(
    [(f"{n}-{t}", n, d) for n in ("LSTM", "GRU", "RNN") for t, d in (("fp32", torch.float32), ("fp64", torch.float64))],
    {"LSTM-fp32", "GRU-fp64", "RNN-fp32"}))
def test_rnn_retain_variables(name, dtype, device, backend):
    """test_rnn_retain_variables: backward(retain_graph=True) five times over one graph gives the same
    gradients each time (the saved activations are not consumed or overwritten). PyTorch: (10, 20, 2
    layers), input [5, 6, 10]."""
    H, T = small(device, backend, (20, 5), (8, 3))
    rnn = FASTRNN_CLASSES[name](10, H, num_layers=2, backend=backend).to(device, dtype)
    x = torch.randn(T, 6, 10, device=device, dtype=dtype, requires_grad=True)
    output = rnn(x)
    output[0].sum().backward(retain_graph=True)
    grads = [x.grad.clone()] + [p.grad.clone() for p in rnn.parameters()]
    for k in range(4):
        rnn.zero_grad()
        x.grad.zero_()
        output[0].sum().backward(retain_graph=True)
        again = [x.grad] + [p.grad for p in rnn.parameters()]
        for n, a, b in zip(["dx"] + [f"d{n}" for n, _ in rnn.named_parameters()], grads, again):
            assert torch.equal(a, b), f"{n} differs in backward #{k + 2} over the same graph"


# test_variable_sequence: (enforce_sorted, lengths); the interpreter's lengths are capped at T = 5.
VARIABLE_SEQUENCES = [
    ("sorted-one", True, [5], [5]),
    ("sorted", True, [10, 10, 6, 2, 2, 1, 1], [5, 5, 4, 2, 2, 1, 1]),
    ("unsorted", False, [2, 1, 3, 2, 10, 5, 3], [2, 1, 3, 2, 5, 4, 3]),
]


# Under the interpreter (each case runs B + 1 networks, ~8 s): two cases, between them both orders, both
# kinds of initial state, projection and the GRU.
INTERPRETER_VARIABLE_SEQUENCES = {"lstm_proj2-sorted-default-hx", "gru-unsorted-given-hx"}


def _variable_sequence_params():
    rows = []
    for (case, enforce_sorted, full, short), (layer, kwargs), default_hidden in itertools.product(
            VARIABLE_SEQUENCES, [("lstm", {}), ("lstm_proj2", {"proj_size": 2}), ("gru", {})], [True, False]):
        rows.append((f"{layer}-{case}-{'default' if default_hidden else 'given'}-hx",
                     "GRU" if layer == "gru" else "LSTM", kwargs, enforce_sorted, (full, short), default_hidden))
    return per_backend(rows, INTERPRETER_VARIABLE_SEQUENCES)


@pytest.mark.parametrize("name,kwargs,enforce_sorted,lengths,default_hidden,device,backend",
                         _variable_sequence_params())
def test_variable_sequence(name, kwargs, enforce_sorted, lengths, default_hidden, device, backend):
    """test_variable_sequence: a packed batch gives what running each sequence alone gives (outputs padded
    with zeros, h_n, c_n), forward and backward (input and weight gradients); 2 layers, bidirectional,
    I=3, H=4. PyTorch runs the LSTM only; the GRU is here too. The packed result also equals torch.nn's."""
    lengths = lengths[1] if interpreted(device, backend) else lengths[0]
    ours = FASTRNN_CLASSES[name](3, 4, num_layers=2, bidirectional=True, backend=backend, **kwargs)
    ours = ours.to(device, torch.float64)
    separate = copy.deepcopy(ours)
    T, B = max(lengths), len(lengths)
    x_leaf = torch.randn(T, B, 3, dtype=torch.float64, device=device, requires_grad=True)
    hidden0 = None
    if not default_hidden:
        h = torch.randn(4, B, kwargs.get("proj_size") or 4, dtype=torch.float64, device=device)
        hidden0 = (h, torch.randn(4, B, 4, dtype=torch.float64, device=device)) if name == "LSTM" else h

    def column(state, i):
        if state is None:
            return None
        return tuple(s.narrow(1, i, 1) for s in state) if isinstance(state, tuple) else state.narrow(1, i, 1)

    outs, hiddens = [], []
    for i, n in enumerate(lengths):
        out, hid = separate(x_leaf[:n, i : i + 1], column(hidden0, i))
        outs.append(torch.cat([out, out.new_zeros(T - n, 1, out.shape[2])]))
        hiddens.append(hid if isinstance(hid, tuple) else (hid,))
    seq_out = torch.cat(outs, 1)
    seq_hidden = [torch.cat(h, 1) for h in zip(*hiddens)]

    packed = rnn_utils.pack_padded_sequence(x_leaf, lengths, enforce_sorted=enforce_sorted)
    packed_out, packed_hidden = ours(packed, hidden0)
    unpacked, unpacked_len = rnn_utils.pad_packed_sequence(packed_out)
    packed_hidden = packed_hidden if isinstance(packed_hidden, tuple) else (packed_hidden,)
    for what, a, b in zip(["h_n", "c_n"], seq_hidden, packed_hidden):
        assert_close(what, a.detach().cpu(), b.detach().cpu(), **FP64_TOL)  # fp64 on both sides
    assert_close("output", seq_out.detach().cpu(), unpacked.detach().cpu(), **FP64_TOL)
    assert unpacked_len.tolist() == list(lengths)

    seq_out.sum().backward()
    grad_x = x_leaf.grad.clone()
    x_leaf.grad.zero_()
    unpacked.sum().backward()
    assert_close("dx", grad_x.cpu(), x_leaf.grad.cpu(), **FP64_TOL)
    for (n, p1), p2 in zip(ours.named_parameters(), separate.parameters()):
        assert_close(f"d{n}", p2.grad.cpu(), p1.grad.cpu(), **FP64_TOL)

    theirs = TORCH_CLASSES[name](3, 4, num_layers=2, bidirectional=True, **kwargs).double()
    theirs.load_state_dict(ours.state_dict())
    ref_out, ref_hidden = theirs(rnn_utils.pack_padded_sequence(x_leaf.detach().cpu(), lengths,
                                                                enforce_sorted=enforce_sorted),
                                 None if hidden0 is None else (tuple(s.cpu() for s in hidden0) if name == "LSTM"
                                                               else hidden0.cpu()))
    assert_close("output vs torch.nn", rnn_utils.pad_packed_sequence(ref_out)[0].detach(), unpacked.detach().cpu(),
                 **FP64_TOL)
    ref_hidden = ref_hidden if isinstance(ref_hidden, tuple) else (ref_hidden,)
    for what, a, b in zip(["h_n vs torch.nn", "c_n vs torch.nn"], ref_hidden, packed_hidden):
        assert_close(what, a.detach(), b.detach().cpu(), **FP64_TOL)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_LSTM_differentiable_backward(device, backend):
    """test_LSTM_differentiable_backward_using_oneDNN: LSTM(3, 3, 20 layers, batch_first), batch 10, T=12:
    the input gradient taken with create_graph=True is itself differentiated (loss = its sum, backward),
    and both it and the second-order gradients of the input and every weight equal torch.nn's."""
    L, T, B = small(device, backend, (20, 12, 10), (3, 4, 3))
    theirs, ours = twins("LSTM", 3, 3, L, backend=backend, device=device, batch_first=True)
    x = torch.rand(B, T, 3, dtype=torch.float64)

    def run(module, dev):
        x1 = x.clone().to(dev).requires_grad_()
        out, _ = module(x1)
        der, = torch.autograd.grad(out, x1, grad_outputs=torch.ones_like(out), retain_graph=True, create_graph=True)
        der.sum().backward(retain_graph=True)
        result = {"dout/dx": der.detach().cpu(), "d2/dx": None if x1.grad is None else x1.grad.cpu()}
        for n, p in module.named_parameters():
            result[f"d2/d{n}"] = None if p.grad is None else p.grad.cpu()
        return result

    assert_results_close(run(theirs, "cpu"), run(ours, device), FP64_TOL)  # fp64 on both sides


# ----- packed sequences: test/nn/test_packed_sequence.py's utilities around a recurrent layer -----

# test_pack_padded_sequence's lengths (sorted, sorted, shuffled); the interpreter's are capped at T = 5.
# batch_first only changes pad_packed_sequence's layout, so it alternates over the rows.
PACKED_LENGTHS = [
    ("sorted", [10, 8, 4, 2, 2, 2, 1], [5, 4, 4, 2, 2, 2, 1], False, False),
    ("sorted-2-batch_first", [11, 10, 8, 6, 4, 3, 1], [5, 5, 4, 3, 3, 2, 1], False, True),
    ("shuffled-batch_first", [11, 10, 8, 6, 4, 3, 1], [5, 5, 4, 3, 3, 2, 1], True, True),
]


# Under the interpreter (~1.2 s a case): each cell with one of the rows, every row used.
@pytest.mark.parametrize("name,kwargs,full,short,shuffle,batch_first,device,backend", per_backend(
    [(f"{layer}-{row[0]}", name, kwargs, *row[1:]) for layer, name, kwargs in LAYERS for row in PACKED_LENGTHS],
    {"rnn_tanh-sorted", "rnn_relu-sorted-2-batch_first", "gru-shuffled-batch_first", "lstm-shuffled-batch_first",
     "lstm_proj-sorted"}))
def test_pack_sequence_through_rnn(name, kwargs, full, short, shuffle, batch_first, device, backend):
    """pack_sequence (sorted, or shuffled with enforce_sorted=False) -> the layer -> pad_packed_sequence
    with total_length = longest + 2 (test_pack_sequence, test_pack_padded_sequence, test_total_length):
    the output keeps the input's sorted/unsorted indices and batch sizes, its padding is zero, and the
    values and gradients equal torch.nn's."""
    lengths = list(short if interpreted(device, backend) else full)
    if shuffle:
        lengths = [lengths[i] for i in torch.randperm(len(lengths)).tolist()]
    theirs, ours = twins(name, 5, 6, backend=backend, device=device, bidirectional=True, **kwargs)
    leaves = {f"seq{i}": torch.randn(n, 5, dtype=torch.float64) for i, n in enumerate(lengths)}
    total = max(lengths) + 2
    results = []
    for module, dev in ((theirs, "cpu"), (ours, device)):
        seqs = [t.clone().to(dev).requires_grad_() for t in leaves.values()]
        packed = rnn_utils.pack_sequence(seqs, enforce_sorted=not shuffle)
        out, hidden = module(packed)
        assert torch.equal(out.batch_sizes, packed.batch_sizes)
        for what in ("sorted_indices", "unsorted_indices"):
            a, b = getattr(out, what), getattr(packed, what)
            assert (a is None and b is None) or torch.equal(a, b), f"output {what} {a}, input's {b}"
        padded, out_lengths = rnn_utils.pad_packed_sequence(out, batch_first=batch_first, total_length=total)
        assert out_lengths.tolist() == lengths
        assert padded.shape[1 if batch_first else 0] == total
        hidden = list(hidden) if isinstance(hidden, tuple) else [hidden]
        outs = [padded] + hidden
        loss = sum((o * w.to(dev)).sum() for o, w in zip(outs, _output_weights(outs)))
        grads = torch.autograd.grad(loss, seqs)
        results.append({"padded y": padded.detach().cpu(), "h_n": hidden[0].detach().cpu(),
                        **({"c_n": hidden[1].detach().cpu()} if len(hidden) == 2 else {}),
                        **{f"d{n}": g.cpu() for n, g in zip(leaves, grads)}})
    assert_results_close(*results, FP64_TOL)  # fp64 on both sides
    y = results[1]["padded y"] if batch_first else results[1]["padded y"].transpose(0, 1)
    for b, n in enumerate(lengths):
        assert not y[b, n:].any(), f"padding of sequence {b} (length {n}) is not zero"


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
def test_packed_sequence_type_casts(enforce_sorted, device, backend):
    """test_type_casts: a PackedSequence cast with .float() / .double() runs through a module of that
    dtype, and the fp32 result is within the fp32 tolerance of the fp64 one (torch.nn's in fp64)."""
    lengths = [4, 3, 3, 1] if enforce_sorted else [3, 4, 1, 3]
    theirs, ours = twins("LSTM", 3, 5, backend=backend, device=device)
    padded = torch.randn(4, 4, 3, dtype=torch.float64)
    packed = rnn_utils.pack_padded_sequence(padded, lengths, enforce_sorted=enforce_sorted)
    ref = rnn_utils.pad_packed_sequence(theirs(packed)[0])[0].detach()
    for cast, tol in (("double", FP64_TOL), ("float", FP32_TOL)):
        module = copy.deepcopy(ours).to(getattr(torch, cast))
        out = module(getattr(packed, cast)().to(device))[0]
        assert out.data.dtype == getattr(torch, cast)
        assert_close(f"y ({cast})", ref, rnn_utils.pad_packed_sequence(out)[0].detach().double().cpu(), **tol)


# ----- autocast: test/test_autocast.py's test_autocast_rnn (CPU, bf16) and test/test_cuda.py's -----


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_autocast_rnn(device, backend):
    """test_autocast_rnn (CPU): a bf16 LSTM(1, 1, 2) given fp32 input raises torch.nn's ValueError outside
    autocast and runs inside it, giving bf16 outputs as torch.nn's LSTM does."""
    x, hx, cx = torch.randn(1, 2, 1), torch.randn(2, 2, 1), torch.randn(2, 2, 1)
    theirs = nn.LSTM(1, 1, 2).to(torch.bfloat16)
    ours = fastrnn.LSTM(1, 1, 2, backend=backend).to(device, torch.bfloat16)
    ours.load_state_dict(theirs.state_dict())
    args = (x.to(device), (hx.to(device), cx.to(device)))
    assert_raises_like_torch("fp32 input, bf16 weights", lambda: theirs(x, (hx, cx)), lambda: ours(*args))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):  # the CPU's default autocast dtype
        ref_out, (ref_h, ref_c) = theirs(x, (hx, cx))
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        out, (h, c) = ours(*args)
    assert (out.dtype, h.dtype, c.dtype) == (ref_out.dtype, ref_h.dtype, ref_c.dtype)


# (class, layers, bias, layout, bidirectional, input/hidden/weight dtypes): test_cuda's test_autocast_rnn
# crosses all of these (576 cases); these rows cover every pair of them, in bf16 on the CPU.
F32, BF16 = torch.float32, torch.bfloat16
AUTOCAST_FORMS = [
    ("RNN", 1, True, "seq_first", False, (F32, F32, F32)),
    ("GRU", 2, False, "batch_first", True, (BF16, F32, F32)),
    ("LSTM", 2, True, "packed", True, (F32, BF16, F32)),
    ("RNN", 2, False, "packed", False, (BF16, BF16, BF16)),
    ("GRU", 1, True, "seq_first", True, (F32, BF16, BF16)),
    ("LSTM", 1, False, "batch_first", False, (BF16, F32, BF16)),
    ("LSTM", 2, True, "seq_first", True, (BF16, BF16, F32)),
]


def _autocast_params():
    rows = []
    for cls, layers, bias, layout, bidir, dtypes in AUTOCAST_FORMS:
        tag = "-".join({F32: "fp32", BF16: "bf16"}[d] for d in dtypes)
        rows.append((f"{cls}-L{layers}-{'bias' if bias else 'nobias'}-{layout}-{'bidir' if bidir else 'unidir'}-{tag}",
                     cls, layers, bias, layout, bidir, dtypes))
    return per_backend(rows)


@pytest.mark.parametrize("cls,layers,bias,layout,bidirectional,dtypes,device,backend", _autocast_params())
def test_autocast_equals_lower_precision_control(cls, layers, bias, layout, bidirectional, dtypes, device, backend):
    """test_cuda's test_autocast_rnn, in bf16 on the CPU: under autocast the output and states are bf16 and
    equal, bit for bit, the module cast to bf16 run on bf16 input and state ("barring nondeterminism,
    autocast and control results should be bitwise identical"), and so do the weight gradients (cast to
    bf16). T=3, B=4, F=5, H=6, lengths 3, 2, 1, 3 for packed input."""
    input_dtype, hidden_dtype, weight_dtype = dtypes
    T, B, F, H = 3, 4, 5, 6
    rnn = FASTRNN_CLASSES[cls](F, H, num_layers=layers, bidirectional=bidirectional, bias=bias,
                               batch_first=layout == "batch_first", backend=backend).to(device, weight_dtype)
    x = torch.randn((B, T, F) if layout == "batch_first" else (T, B, F), device=device, dtype=input_dtype)
    h = torch.randn(layers * (2 if bidirectional else 1), B, H, device=device, dtype=hidden_dtype)
    hx = (h, torch.randn_like(h)) if cls == "LSTM" else h

    def run(module, x, hx):
        inp = rnn_utils.pack_padded_sequence(x, (3, 2, 1, 3), enforce_sorted=False) if layout == "packed" else x
        out, h_out = module(inp, hx)
        out = out.data if layout == "packed" else out
        out.float().sum().backward()
        return out, (h_out if isinstance(h_out, tuple) else (h_out,))

    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        out, h_out = run(rnn, x, hx)
    grads = [p.grad.clone() for p in rnn.parameters()]
    rnn.zero_grad()
    control = rnn.to(torch.bfloat16)
    c_out, c_h_out = run(control, x.bfloat16(), tuple(s.bfloat16() for s in hx) if cls == "LSTM" else hx.bfloat16())
    # The same ops on the same bf16 values: bit for bit.
    assert_equal("y", c_out.detach().cpu(), out.detach().cpu())
    for what, a, b in zip(["h_n", "c_n"], c_h_out, h_out):
        assert_equal(what, a.detach().cpu(), b.detach().cpu())
    for (n, p), g in zip(control.named_parameters(), grads):
        assert_equal(f"d{n}", p.grad.cpu(), g.to(torch.bfloat16).cpu())


CELL_AUTOCAST_DTYPES = [("fp32-fp32-fp32", (F32, F32, F32)), ("bf16-fp32-fp32", (BF16, F32, F32)),
                        ("fp32-bf16-bf16", (F32, BF16, BF16))]


@pytest.mark.parametrize("name,kwargs,dtypes,device,backend", per_backend(
    [(f"{cell}-{tag}", name, kwargs, dtypes) for cell, name, kwargs in CELLS for tag, dtypes in CELL_AUTOCAST_DTYPES]))
def test_cell_autocast_equals_lower_precision_control(name, kwargs, dtypes, device, backend):
    """The layers' autocast test above for the *Cell modules (fastrnn runs them in the autocast dtype too,
    docs/design.md): input, state and weights in any mix of fp32 and bf16 give, under autocast, what the
    cell cast to bf16 gives on bf16 input and state, bit for bit, weight gradients included."""
    input_dtype, hidden_dtype, weight_dtype = dtypes
    cell = FASTRNN_CLASSES[name](5, 6, backend=backend, **kwargs).to(device, weight_dtype)
    x = torch.randn(4, 5, device=device, dtype=input_dtype)
    states = [torch.randn(4, 6, device=device, dtype=hidden_dtype) for _ in range(2 if name == "LSTMCell" else 1)]

    def run(module, x, states):
        out = module(x, tuple(states) if len(states) == 2 else states[0])
        outs = list(out) if isinstance(out, tuple) else [out]
        sum(o.float().sum() for o in outs).backward()
        return outs

    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        outs = run(cell, x, states)
    grads = [p.grad.clone() for p in cell.parameters()]
    cell.zero_grad()
    control = cell.to(torch.bfloat16)
    c_outs = run(control, x.bfloat16(), [s.bfloat16() for s in states])
    for what, a, b in zip(["h", "c"], c_outs, outs):
        assert_equal(what, a.detach().cpu(), b.detach().cpu())  # the same ops on the same bf16 values
    for (n, p), g in zip(control.named_parameters(), grads):
        assert_equal(f"d{n}", p.grad.cpu(), g.to(torch.bfloat16).cpu())
