"""fastrnn under PyTorch's program transforms (docs/transforms.md): double backward, torch.func (grad, vjp,
jacrev, jvp, jacfwd, hessian, vmap), torch.compile from a cold start, torch.export and AOTInductor.

Every result is compared with torch.nn (fp64, same state_dict) running the same transform, or, where
torch.nn cannot (it has no batching rule for vmap), with a loop of torch.nn calls.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, stack_module_state, vjp, vmap

from conftest import backend_params, case_params, interpreted
from parity import FASTRNN_CLASSES, FP64_TOL, TORCH_CLASSES, Case, CountOps, assert_close, make_inputs, make_pair
from torch.nn.utils.rnn import pack_padded_sequence

ROOT = str(Path(__file__).resolve().parents[1])

# ----- double backward -----

SECOND_ORDER_CASES = [
    Case("lstm", T=4, B=3, I=3, H=4, layers=2, bidirectional=True),
    Case("lstm", T=4, B=3, I=3, H=4, proj=2, packed="unsorted", batch_first=True),
    Case("gru", T=4, B=3, I=3, H=4, layers=2, bidirectional=True, packed="unsorted"),
    Case("gru", T=3, B=2, I=3, H=4, bias=False, hx=False),
    Case("rnn_tanh", T=4, B=3, I=3, H=4, layers=2, bidirectional=True, batch_first=True),
    Case("rnn_relu", T=4, B=3, I=3, H=4, packed="sorted", unbatched=False),
    Case("lstm", T=3, B=1, I=3, H=4, unbatched=True),
]


def _outputs(module, case, x, state, lengths):
    if case.packed:
        out, hidden = module(pack_padded_sequence(x, lengths, batch_first=case.batch_first,
                                                  enforce_sorted=case.packed == "sorted"), state)
        y = out.data
    else:
        y, hidden = module(x, state)
    return [y, *(hidden if isinstance(hidden, tuple) else (hidden,))]


def _gradient_penalty_step(module, case, x, state, lengths):
    """A WGAN-GP-style step: the gradient of the outputs w.r.t. the input and the initial state, taken with
    create_graph, enters the loss; returns the loss and the gradients of every leaf and parameter."""
    leaves = [x] + (list(state) if isinstance(state, tuple) else [state] if state is not None else [])
    outs = _outputs(module, case, x, state, lengths)
    first = sum((o * o).sum() + o.sum() for o in outs)
    penalties = torch.autograd.grad(first, leaves, create_graph=True)
    loss = first + sum((g * g).sum() for g in penalties)
    params = [p for _, p in module.named_parameters()]
    names = ["dx", "dh0", "dc0"][: len(leaves)] + [f"d{n}" for n, _ in module.named_parameters()]
    return dict(zip(["loss"] + names, [loss] + list(torch.autograd.grad(loss, leaves + params))))


def _leaves_like(x, state, device, dtype):
    move = lambda t: t.detach().to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    state = None if state is None else tuple(map(move, state)) if isinstance(state, tuple) else move(state)
    return move(x), state


@pytest.mark.parametrize("case,device,backend", case_params(SECOND_ORDER_CASES))
def test_gradient_penalty_step_matches_torch_nn(case, device, backend):
    """Double backward: the whole second-order step equals torch.nn's (fp64), for the input, the states and
    every parameter. Before fastrnn had a differentiable backward, every penalty term was silently dropped."""
    x, state, lengths = make_inputs(case)
    oracle, model = make_pair(case, backend, torch.float64, device)
    expected = _gradient_penalty_step(oracle, case, *_leaves_like(x, state, "cpu", torch.float64), lengths)
    got = _gradient_penalty_step(model, case, *_leaves_like(x, state, device, torch.float64), lengths)
    for name in expected:
        assert_close(name, expected[name].detach(), got[name].detach().cpu(), **FP64_TOL)


# gradgradcheck runs hundreds of first-order backwards: not under the Triton interpreter, where the oracle
# test above covers the same path (the create_graph backward is the same torch code for every backend).
@pytest.mark.parametrize("device,backend", [p for p in backend_params() if not interpreted(*p.values)])
@pytest.mark.parametrize("cell", ["lstm", "lstm-proj", "gru", "rnn_tanh", "rnn_relu"])
def test_gradgradcheck(cell, device, backend):
    """torch.autograd.gradgradcheck in fp64 through the module: input, initial state, every parameter."""
    kw = dict(num_layers=2, bidirectional=True)
    kw.update({"proj_size": 1} if cell == "lstm-proj" else {"nonlinearity": cell[4:]} if cell.startswith("rnn") else {})
    cell = cell.split("-")[0]
    proj = kw.get("proj_size", 0)
    # Small on purpose: gradgradcheck differentiates numerically w.r.t. every element of every input.
    model = FASTRNN_CLASSES[cell](2, 2, backend=backend, **kw).to(device=device, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    x = torch.randn(3, 2, 2, dtype=torch.float64, device=device, requires_grad=True)
    h0 = torch.randn(4, 2, proj or 2, dtype=torch.float64, device=device, requires_grad=True)

    def f(x, h0, *params):
        hx = (h0, torch.zeros(4, 2, 2, dtype=h0.dtype, device=device)) if cell == "lstm" else h0
        y, hidden = functional_call(model, dict(zip(names, params)), (x, hx))
        return y, (hidden[0] if cell == "lstm" else hidden)

    assert torch.autograd.gradgradcheck(f, (x, h0, *model.parameters()), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("device,backend", backend_params())
def test_first_order_backward_does_not_build_a_graph(device, backend):
    """The ordinary backward stays the backend's backward op: its gradients carry no graph."""
    model = FASTRNN_CLASSES["lstm"](3, 4, backend=backend).to(device)
    x = torch.randn(3, 2, 3, device=device, requires_grad=True)
    (gx,) = torch.autograd.grad(model(x)[0].sum(), x)
    assert gx.grad_fn is None and not gx.requires_grad


# ----- torch.func -----

FUNC_CELLS = [("lstm", {}), ("lstm", {"proj_size": 2}), ("gru", {}), ("rnn_tanh", {"nonlinearity": "tanh"}),
              ("rnn_relu", {"nonlinearity": "relu"})]


def _func_pair(cell, kw, backend, device, layers=2):
    cls = FASTRNN_CLASSES[cell]
    model = cls(3, 4, num_layers=layers, bidirectional=True, backend=backend, **kw).to(device, torch.float64)
    oracle = TORCH_CLASSES[cell](3, 4, num_layers=layers, bidirectional=True, **kw).double()
    oracle.load_state_dict(model.state_dict())
    return model, oracle


def _func_params():
    return [pytest.param(c, k, d, b, id=f"{c}{'-proj' if k.get('proj_size') else ''}-{b}-{d}")
            for c, k in FUNC_CELLS for d, b in [p.values for p in backend_params()]]


def _close(name, ref, out):
    ref, out = torch.utils._pytree.tree_leaves(ref), torch.utils._pytree.tree_leaves(out)
    assert len(ref) == len(out), name
    for k, (r, o) in enumerate(zip(ref, out)):
        assert_close(f"{name}[{k}]", r.detach().cpu(), o.detach().cpu(), **FP64_TOL)


@pytest.mark.parametrize("cell,kw,device,backend", _func_params())
def test_torch_func_reverse_and_forward_mode(cell, kw, device, backend):
    """grad, vjp, jacrev, jvp, jacfwd and hessian of fastrnn equal those of torch.nn."""
    model, oracle = _func_pair(cell, kw, backend, device)
    params = {n: p.detach() for n, p in model.named_parameters()}
    x = torch.randn(3, 2, 3, dtype=torch.float64)

    def out(mod, dev):
        return lambda p, x: functional_call(mod, {n: t.to(dev) for n, t in p.items()}, (x.to(dev),))[0]

    def loss(mod, dev):
        return lambda p, x: out(mod, dev)(p, x).pow(2).sum()

    def forward_ad(f):
        with torch.autograd.forward_ad.dual_level():
            dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
            return torch.autograd.forward_ad.unpack_dual(f(out)(params, dual)).tangent

    # The parameters require no grad here: a tangent on the input alone must still reach the jvp rule.
    for name, transform in [
        ("grad", lambda f: grad(f(loss), argnums=(0, 1))(params, x)),
        ("forward_ad", forward_ad),
        ("vjp", lambda f: (lambda y, pullback: pullback(torch.ones_like(y)))(*vjp(lambda x: f(out)(params, x), x))),
        ("jacrev", lambda f: jacrev(lambda x: f(out)(params, x))(x)),
        ("jvp", lambda f: jvp(lambda x: f(out)(params, x), (x,), (torch.ones_like(x),))),
        ("jacfwd", lambda f: jacfwd(lambda x: f(out)(params, x))(x)),
        ("hessian", lambda f: hessian(lambda w: f(loss)({**params, "weight_hh_l0": w}, x))(params["weight_hh_l0"])),
    ]:
        expected = transform(lambda make: make(oracle, "cpu"))
        got = transform(lambda make: make(model, device))
        _close(name, expected, got)


@pytest.mark.parametrize("cell,kw,device,backend", _func_params())
def test_vmap_over_inputs_is_one_batched_call(cell, kw, device, backend):
    """vmap over the input folds the vmapped dimension into the batch: one op call per layer and
    direction for the whole vmapped batch (torch.nn has no batching rule at all), values and input
    gradients equal to a loop of torch.nn calls."""
    model, oracle = _func_pair(cell, kw, backend, device, layers=1)
    params = {n: p.detach() for n, p in model.named_parameters()}
    xs = torch.randn(4, 3, 2, 3, dtype=torch.float64)
    hx = torch.randn(4, 2, 2, kw.get("proj_size") or 4, dtype=torch.float64)

    def run(x, h):
        state = (h, torch.zeros(2, 2, 4, dtype=h.dtype, device=h.device)) if cell == "lstm" else h
        return functional_call(model, params, (x, state))[0]

    with CountOps() as counter, torch.no_grad():
        got = vmap(run)(xs.to(device), hx.to(device))
    namespace = "fastrnn" if backend in ("cpu", "cuda") else f"fastrnn_{backend}"
    assert counter.calls == [f"{namespace}.{cell.split('_')[0]}_fwd.default"] * 2, counter.calls
    state = lambda h: (h, torch.zeros(2, 2, 4, dtype=h.dtype)) if cell == "lstm" else h  # noqa: E731
    expected = torch.stack([oracle(xs[k], state(hx[k]))[0] for k in range(4)])
    _close("vmap y", expected, got)
    got_grads = vmap(grad(lambda x, h: run(x, h).pow(2).sum(), argnums=(0, 1)))(xs.to(device), hx.to(device))
    xr, hr = xs.clone().requires_grad_(), hx.clone().requires_grad_()
    ref_loss = sum(oracle(xr[k], state(hr[k]))[0].pow(2).sum() for k in range(4))
    expected_grads = torch.autograd.grad(ref_loss, (xr, hr))
    _close("vmap grad", expected_grads, got_grads)


@pytest.mark.parametrize("cell,kw,device,backend", _func_params())
def test_vmap_over_an_ensemble_of_parameters(cell, kw, device, backend):
    """The torch.func ensembling recipe (stack_module_state + functional_call + vmap) over fastrnn modules:
    outputs and parameter gradients equal each torch.nn member's."""
    members = [_func_pair(cell, kw, backend, device, layers=1) for _ in range(3)]
    stacked, _ = stack_module_state([m for m, _ in members])
    stacked = {n: p.detach() for n, p in stacked.items()}
    base = members[0][0]
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    run = lambda p, x: functional_call(base, p, (x,))[0]  # noqa: E731
    got = vmap(run, in_dims=(0, None))(stacked, x.to(device))
    _close("ensemble y", torch.stack([o(x)[0] for _, o in members]), got)
    got_grads = vmap(grad(lambda p, x: run(p, x).pow(2).sum()), in_dims=(0, None))(stacked, x.to(device))
    for n in stacked:
        expected = torch.stack([torch.autograd.grad(o(x)[0].pow(2).sum(), dict(o.named_parameters())[n])[0]
                                for _, o in members])
        _close(f"ensemble d{n}", expected, got_grads[n])


# ----- torch.compile from a cold start -----

COLD_COMPILE = textwrap.dedent(
    """
    import sys
    import torch
    import fastrnn  # nothing else runs first: the first call of the model is the compiled one

    backend, compiler, mode = sys.argv[1], sys.argv[2], sys.argv[3] or None
    torch.manual_seed(0)
    torch._dynamo.config.allow_rnn = True  # Dynamo refuses nn.LSTM/GRU/RNN instances without it
    failures = []
    for cell, cls, ref_cls in [("lstm", fastrnn.LSTM, torch.nn.LSTM), ("gru", fastrnn.GRU, torch.nn.GRU),
                               ("rnn", fastrnn.RNN, torch.nn.RNN)]:
        model = cls(4, 6, num_layers=2, bidirectional=True, batch_first=True, backend=backend)
        oracle = ref_cls(4, 6, num_layers=2, bidirectional=True, batch_first=True)
        oracle.load_state_dict(model.state_dict())
        frames = []
        inner = torch._dynamo.lookup_backend(compiler)

        def counting(gm, example_inputs, **kw):
            frames.append(gm)
            return inner(gm, example_inputs, **kw)

        compiled = torch.compile(model, backend=counting if mode is None else compiler, fullgraph=True,
                                 mode=mode)
        for T in (3, 5, 8, 13):
            x = torch.randn(2, T, 4, requires_grad=True)
            y, h = compiled(x)
            (y.pow(2).sum() + (h[0] if cell == "lstm" else h).sum()).backward()
            xr = x.detach().requires_grad_()
            yr, hr = oracle(xr)
            (yr.pow(2).sum() + (hr[0] if cell == "lstm" else hr).sum()).backward()
            for name, a, b in [("y", y, yr), ("dx", x.grad, xr.grad)] + [
                    ("d" + n, p.grad, q.grad) for (n, p), q in zip(model.named_parameters(), oracle.parameters())]:
                if not torch.allclose(a, b, atol=1e-5, rtol=1e-5):
                    failures.append(f"{cell} T={T} {name}: max err {(a - b).abs().max().item():.3g}")
            model.zero_grad()
            oracle.zero_grad()
        # automatic dynamic shapes: the first length compiles static, the second recompiles with T dynamic,
        # and no later length compiles again.
        if mode is None and len(frames) > 2:
            failures.append(f"{cell}: {len(frames)} graphs for 4 sequence lengths")
    print("FAILURES:" if failures else "COLD COMPILE OK", *failures, sep="\\n")
    """
)


def _fresh_python(code, *args, timeout=900):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


COMPILERS = [("inductor", ""), ("aot_eager", "")]


@pytest.mark.slow
@pytest.mark.parametrize("compiler,mode", COMPILERS + [("inductor", "max-autotune-no-cudagraphs")],
                         ids=["inductor", "aot_eager", "inductor-max-autotune"])
@pytest.mark.parametrize("device,backend", [p for p in backend_params() if p.values[0] == "cpu"])
def test_compile_from_a_cold_start(device, backend, compiler, mode):
    """In a fresh process the first call of the model is the compiled one (fullgraph, forward and
    backward, LSTM/GRU/RNN), with inductor and aot_eager; results equal torch.nn's over four lengths."""
    if mode and backend != "cpu":
        pytest.skip("max-autotune is exercised once, on the cpu backend: it compiles the same graph slower")
    run = _fresh_python(COLD_COMPILE, backend, compiler, mode)
    assert run.returncode == 0 and "COLD COMPILE OK" in run.stdout, run.stdout[-3000:] + run.stderr[-6000:]


# ----- torch.export and AOTInductor -----

EXPORT = textwrap.dedent(
    """
    import sys
    import torch
    import fastrnn

    backend, path, aoti = sys.argv[1], sys.argv[2], sys.argv[3] == "aoti"
    torch.manual_seed(0)
    model = fastrnn.LSTM(4, 6, num_layers=2, bidirectional=True, batch_first=True, backend=backend).eval()
    torch.save(model.state_dict(), path + ".weights")
    T = torch.export.Dim("T", min=1, max=4096)
    with torch._dynamo.config.patch(allow_rnn=True), torch.no_grad():
        program = torch.export.export(model, (torch.randn(2, 5, 4),), dynamic_shapes=({1: T},))
    if aoti:
        torch._inductor.aoti_compile_and_package(program, package_path=path)
    else:
        torch.export.save(program, path)
    print("EXPORTED")
    """
)

LOAD = textwrap.dedent(
    """
    import sys
    import torch
    import fastrnn

    backend, path, aoti = sys.argv[1], sys.argv[2], sys.argv[3] == "aoti"
    fastrnn.available_backends()  # loads every backend's ops, which the saved program calls by name
    loaded = torch._inductor.aoti_load_package(path) if aoti else torch.export.load(path).module()
    oracle = torch.nn.LSTM(4, 6, num_layers=2, bidirectional=True, batch_first=True)
    oracle.load_state_dict(torch.load(path + ".weights"))
    for T in (1, 3, 17):
        x = torch.randn(2, T, 4)
        y, (h, c) = loaded(x)
        yr, (hr, cr) = oracle(x)
        for name, a, b in [("y", y, yr), ("h", h, hr), ("c", c, cr)]:
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-5), (T, name)
    print("LOADED OK")
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["export", "aoti"])
def test_export_with_dynamic_length_save_load_run(tmp_path, kind):
    """torch.export with a dynamic sequence length (torch.nn specialises T), saved, loaded in a fresh
    process and run at other lengths; and the same program through AOTInductor (compiled .so package)."""
    path = str(tmp_path / f"lstm-{kind}.pt2")
    made = _fresh_python(EXPORT, "cpu", path, kind)
    assert made.returncode == 0 and "EXPORTED" in made.stdout, made.stdout[-3000:] + made.stderr[-6000:]
    run = _fresh_python(LOAD, "cpu", path, kind)
    assert run.returncode == 0 and "LOADED OK" in run.stdout, run.stdout[-3000:] + run.stderr[-6000:]
