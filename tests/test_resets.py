"""Episode resets (`resets=`, issue 15) on every backend, against oracles built from torch.nn alone.

The oracles never see fastrnn's mask:
- one direction: the per-step loop recurrent RL code writes today (CleanRL's ppo_atari_lstm,
  sb3-contrib's RecurrentPPO): one torch.nn call per step, the state multiplied by (1 - done) first;
- bidirectional: the sequence cut at its resets into episodes, each episode one torch.nn call from a zero
  state (the first episode's forward direction and the last one's reverse direction from hx). A stack of
  layers decomposes the same way, since every layer resets at the same steps.
Values and gradients (x, h0, c0, every parameter) in fp64 with the parity suite's tolerances.
"""

import pytest
import torch
from torch import nn

import fastrnn
from conftest import backend_params, case_params
from parity import (
    FP32_TOL, FP64_TOL, Case, CountOps, assert_all_close, make_inputs, make_pair, output_shapes, reset_mask,
)

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")

# Where episodes start (parity.reset_mask): step 0 only, the last step only, every step, none (all false), random.
PATTERNS = ("first", "last", "all", "none", "random")


def as_given(resets, case):
    """The time-major mask in the layout the module takes: [B, T] with batch_first, [T] unbatched."""
    if case.unbatched:
        return resets[:, 0]
    return resets.t().contiguous() if case.batch_first else resets


def _states(state, cell):
    if state is None:
        return None
    return state if cell == "lstm" else (state,)


def _pack(states, cell):
    return tuple(states) if cell == "lstm" else states[0]


def per_step_loop(oracle, case, x, state, resets):
    """One direction: torch.nn one step at a time, the state zeroed where an episode starts. x, state in
    the module's own layout (batch_first, unbatched); resets time-major [T, B]."""
    state = _states(state, case.cell)
    if case.unbatched:
        x = x.unsqueeze(0 if case.batch_first else 1)
        state = tuple(s.unsqueeze(1) for s in state) if state is not None else None
    time_dim = 1 if case.batch_first else 0
    T, B = x.shape[time_dim], x.shape[1 - time_dim]
    if state is None:
        Hs = [case.proj or case.H] + ([case.H] if case.cell == "lstm" else [])
        state = tuple(x.new_zeros(case.layers, B, h) for h in Hs)
    ys = []
    for t in range(T):
        keep = (~resets[t]).to(x.dtype).view(1, B, 1)
        state = tuple(s * keep for s in state)
        y, hidden = oracle(x.narrow(time_dim, t, 1), _pack(state, case.cell))
        state = hidden if case.cell == "lstm" else (hidden,)
        ys.append(y)
    y = torch.cat(ys, time_dim)
    if case.unbatched:
        y = y.squeeze(0 if case.batch_first else 1)
        state = tuple(s.squeeze(1) for s in state)
    return [y, *state]


def by_episodes(oracle, case, x, state, resets):
    """Any direction(s): each sequence cut at its resets, each episode one torch.nn call; batched input only."""
    assert not case.unbatched
    xt = x.transpose(0, 1) if case.batch_first else x  # [T, B, I]
    T, B = xt.shape[:2]
    D = 2 if case.bidirectional else 1
    Hs = [case.proj or case.H] + ([case.H] if case.cell == "lstm" else [])
    hx = _states(state, case.cell) or tuple(xt.new_zeros(case.layers * D, B, h) for h in Hs)
    forward_rows = torch.arange(case.layers * D) % D == 0
    ys, finals = [], []
    for b in range(B):
        starts = [0] + [t for t in range(1, T) if resets[t, b]] + [T]
        y_b, first, last = [], None, None
        for s, e in zip(starts[:-1], starts[1:]):
            # The forward direction enters s from hx only at s = 0, the reverse one enters e-1 from hx only at e = T.
            from_hx = torch.where(forward_rows, torch.tensor(s == 0 and not resets[0, b]), torch.tensor(e == T))
            h = tuple(torch.where(from_hx.view(-1, 1), s_[:, b], 0.0).unsqueeze(1) for s_ in hx)
            segment = xt[s:e, b : b + 1]
            y, hidden = oracle(segment.transpose(0, 1) if case.batch_first else segment, _pack(h, case.cell))
            y = y.transpose(0, 1) if case.batch_first else y
            hidden = hidden if case.cell == "lstm" else (hidden,)
            y_b.append(y)
            first = first if first is not None else hidden
            last = hidden
        ys.append(torch.cat(y_b))
        # h_n: the forward directions end in the last episode, the reverse directions in the first one.
        finals.append(tuple(torch.where(forward_rows.view(-1, 1, 1), l_, f_) for l_, f_ in zip(last, first)))
    y = torch.cat(ys, 1)
    y = y.transpose(0, 1) if case.batch_first else y
    return [y, *(torch.cat(parts, 1) for parts in zip(*finals))]


def oracle_outputs(oracle, case, x, state, resets):
    if case.bidirectional:
        return by_episodes(oracle, case, x, state, resets)
    return per_step_loop(oracle, case, x, state, resets)


def run_with_resets(module, case, x, state, resets, weights, device, dtype, oracle=False):
    """Forward (fastrnn with resets=, or the torch.nn oracle) and backward of every output weighted by
    `weights`; {name: fp64 CPU tensor} of outputs and the gradients of x, h0, c0 and every parameter."""
    x = x.to(device=device, dtype=dtype).requires_grad_()
    leaves = [x]
    if state is not None:
        state = tuple(s.to(device=device, dtype=dtype).requires_grad_() for s in _states(state, case.cell))
        leaves += list(state)
        state = _pack(state, case.cell)
    if oracle:
        outs = oracle_outputs(module, case, x, state, resets)
    else:
        y, hidden = module(x, state, resets=as_given(resets, case).to(device))
        outs = [y, *(hidden if isinstance(hidden, tuple) else (hidden,))]
    loss = sum((o.double() * w.to(o.device)).sum() for o, w in zip(outs, weights))
    params = list(module.named_parameters())
    grads = torch.autograd.grad(loss, leaves + [p for _, p in params])
    names = ["y", "h_n", "c_n"][: len(outs)] + ["dx", "dh0", "dc0"][: len(leaves)] + [f"d{n}" for n, _ in params]
    return {n: t.detach().double().cpu() for n, t in zip(names, outs + list(grads))}


def compare(case, pattern, device, backend, dtype=torch.float64, tol=FP64_TOL):
    x, state, _ = make_inputs(case)
    T, B = case.T, (1 if case.unbatched else case.B)
    resets = reset_mask(pattern, T, B, seed=T * 100 + B)
    oracle, model = make_pair(case, backend, dtype, device)
    weights = [torch.randn(s, dtype=torch.float64) for s in output_shapes(case, x, None)]
    ref = run_with_resets(oracle, case, x, state, resets, weights, "cpu", torch.float64, oracle=True)
    out = run_with_resets(model, case, x, state, resets, weights, device, dtype)
    assert_all_close(ref, out, **tol)


FORMS = [
    dict(),
    dict(layers=2, batch_first=True),
    dict(layers=2, bidirectional=True),
    dict(bidirectional=True, batch_first=True, bias=False, hx=False),
    dict(unbatched=True, layers=2),
    dict(unbatched=True, batch_first=True, hx=False),
]
CASES = [Case(cell, T=6, B=3, I=4, H=5, **form) for cell in CELLS for form in FORMS] + [
    Case("lstm", T=6, B=3, I=4, H=5, proj=3, layers=2),
    Case("lstm", T=6, B=3, I=4, H=5, proj=2, bidirectional=True),
]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("case,device,backend", case_params(CASES))
def test_resets_match_the_torch_nn_oracle(case, device, backend, pattern):
    compare(case, pattern, device, backend)


# Longer and wider, where the kernels tile (every backend but the interpreted one, which gets the small cases).
BIG = [Case(cell, T=40, B=9, I=7, H=37, layers=2, bidirectional=cell == "gru") for cell in CELLS] + [
    Case("lstm", T=40, B=9, I=7, H=37, proj=5, bidirectional=True)
]


@pytest.mark.parametrize("case,device,backend", case_params(BIG, interpreter_cases=[]))
def test_resets_at_tiled_sizes(case, device, backend):
    compare(case, "random", device, backend)


@pytest.mark.parametrize("case,device,backend", case_params(
    [Case(c, T=20, B=5, I=6, H=24, layers=2, bidirectional=True) for c in ("lstm", "gru")],
    [Case(c, T=5, B=3, I=4, H=8, bidirectional=True) for c in ("lstm", "gru")]))
def test_resets_in_fp32(case, device, backend):
    compare(case, "random", device, backend, torch.float32, FP32_TOL)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("device,backend", backend_params())
def test_all_false_is_the_call_without_resets_bit_for_bit(cell, device, backend):
    """`resets` all false gives exactly what resets=None gives (values and gradients), and resets=None is
    the path that existed before resets (the same ops, the same arguments)."""
    case = Case(cell, T=5, B=3, I=4, H=6, layers=2, bidirectional=True)
    x, state, _ = make_inputs(case)
    _, model = make_pair(case, backend, torch.float32, device)
    results = []
    for resets in (None, torch.zeros(case.T, case.B, dtype=torch.bool, device=device)):
        xs = x.to(device, torch.float32).requires_grad_()
        st = tuple(s.to(device, torch.float32) for s in _states(state, cell))
        y, hidden = model(xs, _pack(st, cell), resets=resets)
        (y.square().sum() + sum(h.sum() for h in (hidden if isinstance(hidden, tuple) else (hidden,)))).backward()
        results.append([y.detach(), xs.grad] + [p.grad.clone() for p in model.parameters()])
        model.zero_grad()
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("device,backend", backend_params())
def test_inference_path(cell, device, backend):
    """Under no_grad (the ops save nothing) the outputs are those of the training path."""
    case = Case(cell, T=6, B=4, I=3, H=5, bidirectional=True)
    x, state, _ = make_inputs(case)
    _, model = make_pair(case, backend, torch.float64, device)
    resets = reset_mask("random", case.T, case.B, seed=1).to(device)
    x, st = x.to(device), _pack(tuple(s.to(device) for s in _states(state, cell)), cell)
    with torch.no_grad():
        y0, h0 = model(x, st, resets=resets)
    y1, h1 = model(x.requires_grad_(), st, resets=resets)
    torch.testing.assert_close(y0, y1.detach(), rtol=0, atol=0)


def test_resets_cut_the_gradient():
    """A reset at step t: nothing before t influences anything from t on (values or gradients)."""
    model = fastrnn.LSTM(3, 4, num_layers=2, backend="reference").double()
    x = torch.randn(8, 2, 3, dtype=torch.float64, requires_grad=True)
    resets = torch.zeros(8, 2, dtype=torch.bool)
    resets[5, 0] = True
    y, _ = model(x, resets=resets)
    (dx,) = torch.autograd.grad(y[5:, 0].sum(), x)
    assert dx[:5, 0].abs().max() == 0
    assert dx[5:, 0].abs().max() > 0


def test_bad_resets_raise_clear_errors():
    model = fastrnn.GRU(3, 4, backend="reference")
    x = torch.randn(5, 2, 3)
    with pytest.raises(TypeError, match=r"resets must be a bool tensor \(e.g. dones.bool\(\)\), got torch.float32"):
        model(x, resets=torch.zeros(5, 2))
    with pytest.raises(TypeError, match="resets must be a bool tensor or None, got list"):
        model(x, resets=[[False, False]] * 5)
    with pytest.raises(ValueError, match=r"resets must have shape \[T, B\] = \[5, 2\], got \[2, 5\]"):
        model(x, resets=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"shape \[B, T\] \(batch_first=True\) = \[5, 2\], got \[2, 5\]"):
        fastrnn.GRU(3, 4, batch_first=True, backend="reference")(x, resets=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"resets must have shape \[T\] = \[5\], got \[5, 1\]"):
        model(x[:, 0], resets=torch.zeros(5, 1, dtype=torch.bool))
    packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 3]))
    with pytest.raises(ValueError, match="resets= takes padded input, not a PackedSequence"):
        model(packed, resets=torch.zeros(5, 2, dtype=torch.bool))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="resets is on cuda"):
            model(x, resets=torch.zeros(5, 2, dtype=torch.bool, device="cuda"))


def test_auto_never_hands_resets_to_torch_nn():
    """backend="auto" runs torch.nn's own forward for some CPU LSTMs (modules._torch_nn_is_faster); torch.nn
    has no resets, so with a mask the call must reach fastrnn's ops."""
    model = fastrnn.LSTM(4, 8, backend="auto")
    x = torch.randn(5, 16, 4)
    resets = torch.zeros(5, 16, dtype=torch.bool)
    resets[2] = True
    with CountOps() as counted:
        model(x, resets=resets)
    assert any("lstm_fwd" in c for c in counted.calls)


@pytest.mark.parametrize("device,backend", backend_params())
def test_compiles_once_for_every_length(device, backend):
    """torch.compile traces resets like lengths: one graph serves every T (automatic dynamic shapes after
    the first length), and the compiled model matches eager."""
    torch._dynamo.reset()
    model = fastrnn.LSTM(3, 5, backend=backend).to(device)
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=count)
    # Dynamo refuses nn.LSTM/GRU/RNN instances, subclasses included, without allow_rnn (docs/design.md).
    with torch._dynamo.config.patch(allow_rnn=True):
        for T in (3, 5, 8):
            x = torch.randn(T, 2, 3, device=device)
            resets = reset_mask("random", T, 2, seed=T).to(device)
            torch.testing.assert_close(compiled(x, resets=resets)[0], model(x, resets=resets)[0])
    assert len(graphs) <= 2, f"{len(graphs)} graphs for 3 lengths"


def _op_args(backend, device):
    """Each recurrence op's arguments with a reset mask, small fp64 (for opcheck)."""
    g = torch.Generator().manual_seed(0)
    T, B, H = 4, 3, 5

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device)

    resets = reset_mask("random", T, B).to(device)
    table = fastrnn.backends.ops(backend)
    lstm = (r(T, B, 4 * H), r(4 * H, H), r(B, H), r(B, H), None, None, resets, False, True)
    _, _, _, gates, cs = table["lstm_fwd"](*lstm)
    gru = (r(T, B, 3 * H), r(3 * H, H), r(3 * H), r(B, H), None, resets, True, True)
    y, _, saved = table["gru_fwd"](*gru)
    rnn = (r(T, B, H), r(H, H), r(B, H), None, resets, False, True)
    y_rnn, _ = table["rnn_fwd"](*rnn)
    return {
        "lstm_fwd": lstm,
        "lstm_bwd": (r(T, B, H), r(B, H), r(B, H), lstm[1], lstm[3], None, gates, cs, None, resets, False),
        "gru_fwd": gru,
        "gru_bwd": (r(T, B, H), r(B, H), gru[1], y, gru[3], saved, None, resets, True),
        "rnn_fwd": rnn,
        "rnn_bwd": (r(T, B, H), r(B, H), rnn[1], y_rnn, None, resets, False, True),
    }


@pytest.mark.parametrize("device,backend", backend_params())
def test_opcheck_with_resets(device, backend):
    """The schema, fake kernel and batching-rule registrations hold with a mask (torch.library.opcheck)."""
    table = fastrnn.backends.ops(backend)
    for name, args in _op_args(backend, device).items():
        torch.library.opcheck(table[name], args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("device,backend", backend_params())
def test_vmap_with_resets(device, backend):
    """torch.vmap over a stack of rollouts, each with its own mask: the batching rule folds the mask with
    the batch (vmap.py's "tb" layout) and each slice equals its own call."""
    model = fastrnn.GRU(3, 4, backend=backend).double().to(device)
    params = dict(model.named_parameters())
    xs = torch.randn(3, 6, 2, 3, dtype=torch.float64, device=device)
    masks = torch.stack([reset_mask(p, 6, 2) for p in ("first", "random", "all")]).to(device)

    def run(x, resets):
        return torch.func.functional_call(model, params, (x,), dict(resets=resets))[0]

    batched = torch.vmap(run)(xs, masks)
    for k in range(3):
        torch.testing.assert_close(batched[k], run(xs[k], masks[k]))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("device,backend", backend_params())
def test_double_backward_with_resets(cell, device, backend):
    """create_graph (gradient penalties) recomputes in torch ops with the same mask: second-order gradients
    equal those of the torch.nn oracle."""
    case = Case(cell, T=5, B=2, I=3, H=4)
    x, state, _ = make_inputs(case)
    resets = reset_mask("random", case.T, case.B, seed=3)
    oracle, model = make_pair(case, backend, torch.float64, device)
    results = []
    for module, dev, is_oracle in ((oracle, "cpu", True), (model, device, False)):
        xs = x.to(dev).requires_grad_()
        st = _pack(tuple(s.to(dev) for s in _states(state, cell)), cell)
        if is_oracle:
            y = per_step_loop(module, case, xs, st, resets)[0]
        else:
            y = module(xs, st, resets=resets.to(dev))[0]
        (dx,) = torch.autograd.grad(y.tanh().sum(), xs, create_graph=True)
        penalty = dx.square().sum()
        results.append([t.cpu() for t in torch.autograd.grad(penalty, list(module.parameters()))])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, **FP64_TOL)
