"""The recurrence ops alone (docs/contract.md), without the input GEMM and weight-gradient GEMMs around
them: what a kernel change moves. Forward with save=True (what training runs) and backward, per backend."""

import pytest
import torch

from fastrnn.backends import ops

from .conftest import DEVICE, ROUNDS, synchronized


def _op_inputs(case):
    """The forward op's arguments for a one-layer, one-direction case, seeded (contract shapes)."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator)).to(DEVICE, case.torch_dtype)

    T, B, H, G = case.T, case.B, case.H, case.gates
    gx, w_hh, h0 = randn(T, B, G * H), randn(G * H, H, scale=H**-0.5), randn(B, H)
    if case.cell == "lstm":
        return (gx, w_hh, h0, randn(B, H), None, None, None, False, True)
    if case.cell == "gru":
        return (gx, w_hh, randn(G * H), h0, None, None, False, True)
    return (gx, w_hh, h0, None, None, False, False)


def _backward_call(case, table, args):
    """A closure running the backward op on the outputs of one forward call."""
    outputs = table[f"{case.cell}_fwd"](*args)
    y, h_n = outputs[0], outputs[1]
    dy, dh_n = torch.randn_like(y), torch.randn_like(h_n)
    bwd = table[f"{case.cell}_bwd"]
    if case.cell == "lstm":
        _, w_hh, _, c0 = args[:4]
        c_n, gates, cs = outputs[2:5]
        dc_n = torch.randn_like(c_n)
        return lambda: bwd(dy, dh_n, dc_n, w_hh, c0, None, gates, cs, None, None, False)
    if case.cell == "gru":
        w_hh, h0, saved = args[1], args[3], outputs[2]
        return lambda: bwd(dy, dh_n, w_hh, y, h0, saved, None, None, False)
    return lambda: bwd(dy, dh_n, args[1], y, None, None, False, False)


@pytest.mark.one_layer
@pytest.mark.op_tables
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_recurrence_op(benchmark, case, backend, direction):
    table = ops(backend)
    args = _op_inputs(case)
    call = (lambda: table[f"{case.cell}_fwd"](*args)) if direction == "fwd" else _backward_call(case, table, args)
    benchmark.group = f"op {case.cell}_{direction} T{case.T}-B{case.B}-H{case.H}"
    benchmark.pedantic(synchronized(call), rounds=ROUNDS, warmup_rounds=1)
