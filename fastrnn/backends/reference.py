"""The reference backend: the six recurrence ops of docs/contract.md in plain torch, one step at a time.

It is the fallback on any device and the readable statement of the math that every kernel must match.
Backward is an explicit reverse-time recurrence (not autograd through the loop), so it is an op too and
torch.compile sees one opaque node whatever T is.

T: time steps  B: batch  H: hidden size  Hout: output size (proj_size or H)
fp16/bf16 storage is computed in fp32 (the state is carried in fp32 and rounded once per output).
"""

import torch

from .schemas import define_ops


def _compute_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _steps(T, reverse):
    return range(T - 1, -1, -1) if reverse else range(T)


def _active(lengths, t, B, device):
    """[B, 1] bool: which sequences are active at step t (all of them without lengths)."""
    if lengths is None:
        return torch.ones(B, 1, dtype=torch.bool, device=device)
    return (lengths > t).unsqueeze(1)


def _cut_at_resets(resets, t, *state):
    """The state (or the carried gradient) with the rows of the sequences that reset at step t zeroed:
    step t starts from a zero state there, and no gradient flows back across the reset."""
    if resets is None:
        return state if len(state) > 1 else state[0]
    cut = tuple(torch.where(resets[t].unsqueeze(1), 0.0, s) for s in state)
    return cut if len(cut) > 1 else cut[0]


def _previous_output(y, h0, lengths, resets, t, reverse):
    """h_{t-1} of step t rebuilt from the outputs (contract: GRU backward)."""
    T = y.shape[0]
    tp = t + 1 if reverse else t - 1
    if tp < 0 or tp >= T:
        prev = h0
    elif reverse and lengths is not None:
        prev = torch.where((lengths > tp).unsqueeze(1), y[tp], h0)
    else:
        prev = y[tp]
    return _cut_at_resets(resets, t, prev)


def _fresh(state, dtype):
    """A fresh copy of the initial state in the compute dtype. h0 is often a view into [L*D, B, H] at an
    offset, and MKL's sgemm rounds differently at a different alignment (1 ulp, measured): from a fresh,
    allocator-aligned tensor every step's product sees the same alignment whether or not the state went
    through a reset mask, so resets all false gives the bits of resets=None."""
    return state.to(dtype, copy=True)


def _empty(like):
    return like.new_empty(0)


def _gates(t, G):
    """The G gate blocks of [B, G*H] (unlike chunk, G of them even when H = 0, as torch.nn's cells allow)."""
    return t.unflatten(1, (G, t.shape[1] // G)).unbind(1)


def _gx_at(gx, b_gx, t, ct):
    """gx_t in the compute dtype with the op's optional b_gx [G*H] added (contract: added to gx at every step,
    before the hidden product's sum)."""
    gx_t = gx[t].to(ct)
    return gx_t if b_gx is None else gx_t + b_gx.to(ct)


def _stack_steps(per_step, reverse, dtype):
    """[T, ...] in time order from the per-step results in processing order. The forwards collect steps in
    lists instead of writing into a preallocated y (y[t] = ...): the same numbers, and the function stays
    differentiable and vmappable as it is, which the double-backward path (autograd.py) relies on."""
    if reverse:
        per_step = per_step[::-1]
    return torch.stack(per_step).to(dtype)


# ----- LSTM -----


def lstm_cell(a, c_prev):
    """a [B, 4H] pre-activations -> (gates [B, 4H] = i,f,g,o after activation, c_t, m_t)."""
    i, f, g, o = _gates(a, 4)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c = f * c_prev + i * g
    return torch.cat([i, f, g, o], dim=1), c, o * torch.tanh(c)


def lstm_fwd(gx, w_hh, h0, c0, w_hr, lengths, resets, reverse, save, b_gx=None):
    T, B, _ = gx.shape
    ct = _compute_dtype(gx)
    w_hh_c = w_hh.to(ct)
    w_hr_c = w_hr.to(ct) if w_hr is not None else None
    h, c = _fresh(h0, ct), _fresh(c0, ct)
    ys, gates_all, cs = [], [], []
    for t in _steps(T, reverse):
        h_in, c_in = _cut_at_resets(resets, t, h, c)
        gates, c_new, m = lstm_cell(_gx_at(gx, b_gx, t, ct) + h_in @ w_hh_c.t(), c_in)
        h_new = m @ w_hr_c.t() if w_hr_c is not None else m
        act = _active(lengths, t, B, gx.device)
        h, c = torch.where(act, h_new, h), torch.where(act, c_new, c)
        ys.append(torch.where(act, h_new, 0.0))
        if save:
            gates_all.append(torch.where(act, gates, 0.0))
            cs.append(c)
    y, h_n, c_n = _stack_steps(ys, reverse, gx.dtype), h.to(h0.dtype), c.to(c0.dtype)
    if not save:
        return y, h_n, c_n, _empty(gx), _empty(gx)
    return y, h_n, c_n, _stack_steps(gates_all, reverse, gx.dtype), _stack_steps(cs, reverse, gx.dtype)


def lstm_bwd(dy, dh_n, dc_n, w_hh, c0, w_hr, gates, cs, lengths, resets, reverse):
    T, B, _ = gates.shape
    ct = _compute_dtype(gates)
    w_hh_c = w_hh.to(ct)
    w_hr_c = w_hr.to(ct) if w_hr is not None else None
    dh, dc = dh_n.to(ct), dc_n.to(ct)
    dgx = gates.new_zeros(gates.shape)
    dw_hr = torch.zeros_like(w_hr_c) if w_hr_c is not None else None
    for t in _steps(T, not reverse):
        tp = t + 1 if reverse else t - 1
        c_prev = _cut_at_resets(resets, t, cs[tp].to(ct) if 0 <= tp < T else c0.to(ct))
        i, f, g, o = _gates(gates[t].to(ct), 4)
        tc = torch.tanh(cs[t].to(ct))
        dh_t = dh + dy[t].to(ct)
        if w_hr_c is not None:
            dm = dh_t @ w_hr_c
            dw_hr += dh_t.t() @ (o * tc)
        else:
            dm = dh_t
        dct = dc + dm * o * (1 - tc * tc)
        da = torch.cat([dct * g * i * (1 - i), dct * c_prev * f * (1 - f), dct * i * (1 - g * g), dm * tc * o * (1 - o)], 1)
        act = _active(lengths, t, B, gates.device)
        da = torch.where(act, da, 0.0)
        # dw_hr above took dh_t of inactive rows too; those rows of m are o*tanh(c) = 0 (gates are 0 there).
        dh_prev, dc_prev = _cut_at_resets(resets, t, da @ w_hh_c, dct * f)
        dh, dc = torch.where(act, dh_prev, dh), torch.where(act, dc_prev, dc)
        dgx[t] = da
    dw_hr = dw_hr.to(w_hr.dtype) if dw_hr is not None else _empty(dy)
    return dgx, dh.to(dh_n.dtype), dc.to(dc_n.dtype), dw_hr


# ----- GRU -----


def gru_cell(gx_t, gh, h_prev):
    """gx_t, gh [B, 3H] (gh = h_{t-1} W_hh^T + b_hh) -> (h_t, saved [B, 4H] = r, z, n, ghn)."""
    xr, xz, xn = _gates(gx_t, 3)
    hr, hz, hn = _gates(gh, 3)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h_prev, torch.cat([r, z, n, hn], dim=1)


def gru_fwd(gx, w_hh, b_hh, h0, lengths, resets, reverse, save, b_gx=None):
    T, B, _ = gx.shape
    ct = _compute_dtype(gx)
    w_hh_c = w_hh.to(ct)
    b_hh_c = b_hh.to(ct) if b_hh is not None else None
    h = _fresh(h0, ct)
    ys, saved = [], []
    for t in _steps(T, reverse):
        h_in = _cut_at_resets(resets, t, h)
        gh = h_in @ w_hh_c.t()
        if b_hh_c is not None:
            gh = gh + b_hh_c
        h_new, s = gru_cell(_gx_at(gx, b_gx, t, ct), gh, h_in)
        act = _active(lengths, t, B, gx.device)
        h = torch.where(act, h_new, h)
        ys.append(torch.where(act, h_new, 0.0))
        if save:
            saved.append(torch.where(act, s, 0.0))
    saved = _stack_steps(saved, reverse, gx.dtype) if save else _empty(gx)
    return _stack_steps(ys, reverse, gx.dtype), h.to(h0.dtype), saved


def gru_bwd(dy, dh_n, w_hh, y, h0, saved, lengths, resets, reverse):
    T, B, H = y.shape
    ct = _compute_dtype(saved)
    w_hh_c = w_hh.to(ct)
    dh = dh_n.to(ct)
    dgx = saved.new_zeros(T, B, 3 * H)
    dgh = saved.new_zeros(T, B, 3 * H)
    for t in _steps(T, not reverse):
        r, z, n, ghn = _gates(saved[t].to(ct), 4)
        h_prev = _previous_output(y, h0, lengths, resets, t, reverse).to(ct)
        dh_t = dh + dy[t].to(ct)
        dan = dh_t * (1 - z) * (1 - n * n)
        dar = dan * ghn * r * (1 - r)
        daz = dh_t * (h_prev - n) * z * (1 - z)
        act = _active(lengths, t, B, y.device)
        dx_t = torch.where(act, torch.cat([dar, daz, dan], 1), 0.0)
        dh_gates = torch.where(act, torch.cat([dar, daz, dan * r], 1), 0.0)
        dh = torch.where(act, _cut_at_resets(resets, t, dh_t * z + dh_gates @ w_hh_c), dh)
        dgx[t], dgh[t] = dx_t, dh_gates
    return dgx, dgh, dh.to(dh_n.dtype)


# ----- RNN (tanh / relu) -----


def rnn_fwd(gx, w_hh, h0, lengths, resets, reverse, relu, b_gx=None):
    T, B, _ = gx.shape
    ct = _compute_dtype(gx)
    w_hh_c = w_hh.to(ct)
    h = _fresh(h0, ct)
    ys = []
    act_fn = torch.relu if relu else torch.tanh
    for t in _steps(T, reverse):
        h_new = act_fn(_gx_at(gx, b_gx, t, ct) + _cut_at_resets(resets, t, h) @ w_hh_c.t())
        act = _active(lengths, t, B, gx.device)
        h = torch.where(act, h_new, h)
        ys.append(torch.where(act, h_new, 0.0))
    return _stack_steps(ys, reverse, gx.dtype), h.to(h0.dtype)


def rnn_bwd(dy, dh_n, w_hh, y, lengths, resets, reverse, relu):
    T, B, H = y.shape
    ct = _compute_dtype(y)
    w_hh_c = w_hh.to(ct)
    dh = dh_n.to(ct)
    dgx = y.new_zeros(y.shape)
    for t in _steps(T, not reverse):
        h_t = y[t].to(ct)
        dh_t = dh + dy[t].to(ct)
        da = dh_t * (h_t > 0) if relu else dh_t * (1 - h_t * h_t)
        act = _active(lengths, t, B, y.device)
        da = torch.where(act, da, 0.0)
        dh = torch.where(act, _cut_at_resets(resets, t, da @ w_hh_c), dh)
        dgx[t] = da
    return dgx, dh.to(dh_n.dtype)


OPS = define_ops(
    "fastrnn_reference",
    {
        "lstm_fwd": lstm_fwd,
        "lstm_bwd": lstm_bwd,
        "gru_fwd": gru_fwd,
        "gru_bwd": gru_bwd,
        "rnn_fwd": rnn_fwd,
        "rnn_bwd": rnn_bwd,
    },
)


def devices():
    return ("cpu", "cuda")
