"""Parity against torch.nn: the oracle is torch.nn in fp64 on the CPU with the same state_dict.

`run_case` builds a torch.nn module and its fastrnn twin from one spec, feeds both the same input (dense,
packed sorted/unsorted, batch_first, unbatched, hx or not), backpropagates the same random weighting of
every output (y, h_n, c_n), and compares outputs and the gradients of the input, h0, c0 and every
parameter. A failure names the tensor, the worst index and the error ratio.
"""

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastrnn

# Tolerances against the fp64 oracle, for every backend and test that compares with torch.nn.
# fp64: differences come only from summation order (~1e-15 relative per step).
FP64_TOL = dict(atol=1e-9, rtol=1e-7)
# fp32: the reference backend's worst error against the fp64 oracle on these cases is ~3e-7 (T=63);
# "about 1e-5 relative" is the contract, with inputs and weights of order 1.
FP32_TOL = dict(atol=1e-5, rtol=1e-5)

TORCH_CLASSES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn_tanh": nn.RNN, "rnn_relu": nn.RNN}
FASTRNN_CLASSES = {"lstm": fastrnn.LSTM, "gru": fastrnn.GRU, "rnn_tanh": fastrnn.RNN, "rnn_relu": fastrnn.RNN}


@dataclass
class Case:
    cell: str
    T: int = 5
    B: int = 3
    I: int = 4
    H: int = 6
    layers: int = 1
    bidirectional: bool = False
    batch_first: bool = False
    bias: bool = True
    proj: int = 0
    packed: str = ""  # "", "sorted" or "unsorted"
    unbatched: bool = False
    hx: bool = True
    training: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def id(self):
        parts = [self.cell, f"T{self.T}", f"B{self.B}", f"I{self.I}", f"H{self.H}", f"L{self.layers}"]
        flags = [
            ("bidir", self.bidirectional), ("bf", self.batch_first), ("nobias", not self.bias),
            (f"proj{self.proj}", self.proj), (f"packed-{self.packed}", self.packed),
            ("unbatched", self.unbatched), ("nohx", not self.hx), ("eval", not self.training),
        ]
        return "-".join(parts + [name for name, on in flags if on])

    def module_kwargs(self):
        kw = dict(num_layers=self.layers, bidirectional=self.bidirectional, batch_first=self.batch_first,
                  bias=self.bias)
        if self.proj:
            kw["proj_size"] = self.proj
        if self.cell.startswith("rnn"):
            kw["nonlinearity"] = self.cell[4:]
        kw.update(self.extra)
        return kw


def make_pair(case, backend, dtype, device):
    """The fp64 CPU torch.nn oracle and the fastrnn module (in `dtype` on `device`) with the same weights."""
    oracle = TORCH_CLASSES[case.cell](case.I, case.H, **case.module_kwargs()).double()
    model = FASTRNN_CLASSES[case.cell](case.I, case.H, backend=backend, **case.module_kwargs())
    model.load_state_dict(oracle.state_dict())
    oracle.train(case.training)
    model.train(case.training)
    return oracle, model.to(device=device, dtype=dtype)


def make_lengths(case):
    """Lengths from 1 to T (both ends present when B allows), in a shuffled order for unsorted packing."""
    if case.B == 0:
        return torch.zeros(0, dtype=torch.int64)
    lengths = torch.linspace(case.T, 1, case.B).round().long().clamp(1, case.T)
    lengths[0] = case.T
    return lengths if case.packed == "sorted" else lengths[torch.randperm(case.B)]


def make_inputs(case):
    """fp64 CPU inputs: x as the module takes it (before packing), the initial state (or None), lengths."""
    D = 2 if case.bidirectional else 1
    Hout = case.proj or case.H
    x = torch.randn(case.T, case.B, case.I, dtype=torch.float64)
    if case.batch_first:
        x = x.transpose(0, 1).contiguous()
    h0 = torch.randn(case.layers * D, case.B, Hout, dtype=torch.float64)
    c0 = torch.randn(case.layers * D, case.B, case.H, dtype=torch.float64)
    if case.unbatched:
        x, h0, c0 = x.select(0 if case.batch_first else 1, 0), h0[:, 0], c0[:, 0]
    state = ((h0, c0) if case.cell == "lstm" else h0) if case.hx else None
    lengths = make_lengths(case) if case.packed else None
    return x, state, lengths


def output_shapes(case, x, lengths):
    """Shapes of (y or packed y.data, h_n[, c_n]) as torch.nn returns them."""
    D = 2 if case.bidirectional else 1
    Hout = case.proj or case.H
    y = (int(lengths.sum()), D * Hout) if case.packed else (*x.shape[:-1], D * Hout)
    batch = () if case.unbatched else (case.B,)
    states = [(case.layers * D, *batch, Hout)] + ([(case.layers * D, *batch, case.H)] if case.cell == "lstm" else [])
    return [y, *states]


def _leaves(x, state, device, dtype):
    x = x.to(device=device, dtype=dtype).requires_grad_()
    if state is None:
        return x, None, [x]
    if isinstance(state, tuple):
        state = tuple(s.to(device=device, dtype=dtype).requires_grad_() for s in state)
        return x, state, [x, *state]
    state = state.to(device=device, dtype=dtype).requires_grad_()
    return x, state, [x, state]


def _forward(module, case, x, state, lengths):
    if case.packed:
        inp = pack_padded_sequence(x, lengths, batch_first=case.batch_first, enforce_sorted=case.packed == "sorted")
        out, hidden = module(inp, state)
        assert isinstance(out, PackedSequence)
        y = out.data
    else:
        y, hidden = module(x, state)
    hidden = list(hidden) if isinstance(hidden, tuple) else [hidden]
    return [y, *hidden]


def run(module, case, x, state, lengths, weights, device, dtype):
    """Forward and backward of one module; returns {name: tensor (fp64, CPU)} for outputs and gradients."""
    x, state, leaves = _leaves(x, state, device, dtype)
    outs = _forward(module, case, x, state, lengths)
    loss = sum((o.double() * w.to(o.device)).sum() for o, w in zip(outs, weights))
    params = list(module.named_parameters())
    grads = torch.autograd.grad(loss, leaves + [p for _, p in params])
    names = ["y", "h_n", "c_n"][: len(outs)] + ["dx", "dh0", "dc0"][: len(leaves)] + [f"d{n}" for n, _ in params]
    return {n: t.detach().double().cpu() for n, t in zip(names, outs + list(grads))}


_oracle_cache = {}


def run_case(case, backend, device="cpu", dtype=torch.float64):
    """Both modules on the same data; returns (oracle results, fastrnn results).

    Data and weights are drawn from the RNG seeded per test, so a case always gets the same ones; the
    oracle's results are cached per case, since torch.nn in fp64 with packed input is the slow part
    (1.5 s for T=63) and every backend and dtype compares against the same numbers.
    """
    x, state, lengths = make_inputs(case)
    oracle, model = make_pair(case, backend, dtype, device)
    weights = [torch.randn(s, dtype=torch.float64) for s in output_shapes(case, x, lengths)]
    key = (case.id, torch.initial_seed())
    if key not in _oracle_cache:
        _oracle_cache[key] = run(oracle, case, x, state, lengths, weights, "cpu", torch.float64)
    out = run(model, case, x, state, lengths, weights, device, dtype)
    return _oracle_cache[key], out


def assert_close(name, ref, out, atol, rtol):
    """torch.testing-style closeness with a report that names the tensor, the worst index and the ratio."""
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != oracle {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    assert not torch.isnan(out).any() or torch.isnan(ref).any(), f"{name}: NaN where the oracle has none"
    err = (out - ref).abs()
    allowed = atol + rtol * ref.abs()
    ratio = err / allowed
    worst = int(ratio.flatten().argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), ref.shape))
    r = float(ratio.flatten()[worst])
    assert r <= 1.0, (
        f"{name}: mismatch at {idx}: got {float(out[idx]):.6g}, oracle {float(ref[idx]):.6g}, "
        f"|err| {float(err[idx]):.3g} is {r:.3g}x the allowed {float(allowed[idx]):.3g}"
    )


def assert_all_close(ref, out, atol, rtol):
    assert ref.keys() == out.keys(), f"compared {sorted(out)} but the oracle has {sorted(ref)}"
    for name in ref:
        assert_close(name, ref[name], out[name], atol, rtol)


def max_errors(ref, out):
    """Per tensor, the largest |out - ref| (for the low-precision rule: compare against torch.nn's own)."""
    return {n: float((out[n] - ref[n]).abs().max()) if ref[n].numel() else 0.0 for n in ref}


class CountOps(TorchDispatchMode):
    """Records the fastrnn ops (recurrence and GEMM) that reach a kernel while it is active."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "fastrnn" in str(func):
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


def reset_mask(kind, T, B, seed=0):
    """An episode-reset mask of a named kind (docs/contract.md), the same for every backend's tests: None for
    None, else bool [T, B] on the CPU with a reset at step 0 of every sequence ("first"), at the last step
    ("last"), at every step ("all"), nowhere ("none": all false, which must give the bits of resets=None), or
    at about a third of the steps ("random", seeded: the same mask for the same sizes and seed; with B > 1
    sequence 0 never resets, so one runs through, and the last one resets at step min(2, T - 1), so at least
    one reset falls inside the sequence)."""
    if kind is None:
        return None
    mask = torch.zeros(T, B, dtype=torch.bool)
    if kind == "first":
        mask[0] = True
    elif kind == "last":
        mask[-1] = True
    elif kind == "all":
        mask[:] = True
    elif kind == "random":
        mask = torch.rand(T, B, generator=torch.Generator().manual_seed(seed + 1)) < 0.35
        if B > 1:
            mask[:, 0] = False
        if B and T:
            mask[min(2, T - 1), B - 1] = True
    else:
        assert kind == "none", kind
    return mask
