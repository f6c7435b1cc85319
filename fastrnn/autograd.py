"""One autograd.Function per cell, for one layer and one direction (docs/contract.md).

The input projection Gx = x W_ih^T + b is a plain F.linear outside these Functions, so autograd does the
big dx / dW_ih GEMMs over all T*B rows. Inside, only the recurrence runs through the backend's ops; the
hidden-weight gradient dW_hh = sum_t dGh_t^T h_{t-1} is then one GEMM over all T*B rows too.

T: time steps  B: batch  H: hidden size  Hout: output size (proj_size or H)  G: gates per cell
"""

import torch
from torch.autograd.function import once_differentiable

from .backends import ops


def previous_hidden(y, h0, lengths, reverse):
    """[T, B, Hout]: the state h_{t-1} each step t started from, rebuilt from the outputs.

    Forward, an active step t >= 1 follows an active step, so h_{t-1} = y[t-1]. Reverse, step t+1 may be
    padding (t+1 >= lengths[b]), and then the sequence starts at t from h0. Inactive steps have zero
    gradient, so what stands there does not matter (it is finite: y is 0 there).
    """
    if reverse:
        prev = torch.cat([y[1:], h0.unsqueeze(0)])
        if lengths is not None:
            T = y.shape[0]
            starts_here = torch.arange(1, T + 1, device=y.device).unsqueeze(1) >= lengths.unsqueeze(0)
            prev = torch.where(starts_here.unsqueeze(2), h0.unsqueeze(0), prev)
        return prev
    return torch.cat([h0.unsqueeze(0), y[:-1]])


def hidden_weight_grad(dgh, y, h0, lengths, reverse):
    """dW_hh [G*H, Hout] = sum over t and b of dGh_t^T h_{t-1}: one GEMM over T*B rows."""
    prev = previous_hidden(y, h0, lengths, reverse)
    return dgh.flatten(0, 1).t() @ prev.flatten(0, 1).to(dgh.dtype)


def needs_saving(*tensors):
    """Whether a forward will be differentiated: only then do the ops write what backward needs."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# The recurrence of one layer and one direction. A forward that will not be differentiated calls the op
# straight (inference: nothing saved); only one that will goes through the autograd.Function, whose
# apply() alone costs 6-17 us a call, a visible share of a whole B=1, H=128 layer.


def lstm(gx, w_hh, h0, c0, w_hr, lengths, reverse, backend):
    """y, h_n, c_n."""
    if needs_saving(gx, w_hh, h0, c0, w_hr):
        return LSTMFunction.apply(gx, w_hh, h0, c0, w_hr, lengths, reverse, backend)
    y, h_n, c_n, _, _ = ops(backend)["lstm_fwd"](gx, w_hh, h0, c0, w_hr, lengths, reverse, False)
    return y, h_n, c_n


def gru(gx, w_hh, b_hh, h0, lengths, reverse, backend):
    """y, h_n."""
    if needs_saving(gx, w_hh, b_hh, h0):
        return GRUFunction.apply(gx, w_hh, b_hh, h0, lengths, reverse, backend)
    y, h_n, _ = ops(backend)["gru_fwd"](gx, w_hh, b_hh, h0, lengths, reverse, False)
    return y, h_n


def rnn(gx, w_hh, h0, lengths, reverse, relu, backend):
    """y, h_n (the op saves nothing beyond y)."""
    if needs_saving(gx, w_hh, h0):
        return RNNFunction.apply(gx, w_hh, h0, lengths, reverse, relu, backend)
    return ops(backend)["rnn_fwd"](gx, w_hh, h0, lengths, reverse, relu)


class LSTMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gx, w_hh, h0, c0, w_hr, lengths, reverse, backend):
        y, h_n, c_n, gates, cs = ops(backend)["lstm_fwd"](gx, w_hh, h0, c0, w_hr, lengths, reverse, True)
        ctx.save_for_backward(w_hh, h0, c0, w_hr, lengths, y, gates, cs)
        ctx.reverse, ctx.backend = reverse, backend
        return y, h_n, c_n

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n, dc_n):
        w_hh, h0, c0, w_hr, lengths, y, gates, cs = ctx.saved_tensors
        dgx, dh0, dc0, dw_hr = ops(ctx.backend)["lstm_bwd"](
            dy.contiguous(), dh_n.contiguous(), dc_n.contiguous(), w_hh, c0, w_hr, gates, cs, lengths, ctx.reverse
        )
        dw_hh = hidden_weight_grad(dgx, y, h0, lengths, ctx.reverse) if ctx.needs_input_grad[1] else None
        return dgx, dw_hh, dh0, dc0, (dw_hr if w_hr is not None else None), None, None, None


class GRUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gx, w_hh, b_hh, h0, lengths, reverse, backend):
        y, h_n, saved = ops(backend)["gru_fwd"](gx, w_hh, b_hh, h0, lengths, reverse, True)
        ctx.save_for_backward(w_hh, h0, lengths, y, saved)
        ctx.reverse, ctx.backend, ctx.has_bias = reverse, backend, b_hh is not None
        return y, h_n

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n):
        w_hh, h0, lengths, y, saved = ctx.saved_tensors
        dgx, dgh, dh0 = ops(ctx.backend)["gru_bwd"](
            dy.contiguous(), dh_n.contiguous(), w_hh, y, h0, saved, lengths, ctx.reverse
        )
        dw_hh = hidden_weight_grad(dgh, y, h0, lengths, ctx.reverse) if ctx.needs_input_grad[1] else None
        db_hh = dgh.sum((0, 1)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dgx, dw_hh, db_hh, dh0, None, None, None


class RNNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gx, w_hh, h0, lengths, reverse, relu, backend):
        y, h_n = ops(backend)["rnn_fwd"](gx, w_hh, h0, lengths, reverse, relu)
        ctx.save_for_backward(w_hh, h0, lengths, y)
        ctx.reverse, ctx.relu, ctx.backend = reverse, relu, backend
        return y, h_n

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n):
        w_hh, h0, lengths, y = ctx.saved_tensors
        dgx, dh0 = ops(ctx.backend)["rnn_bwd"](
            dy.contiguous(), dh_n.contiguous(), w_hh, y, lengths, ctx.reverse, ctx.relu
        )
        dw_hh = hidden_weight_grad(dgx, y, h0, lengths, ctx.reverse) if ctx.needs_input_grad[1] else None
        return dgx, dw_hh, dh0, None, None, None, None
