"""LSTM Triton kernels and their launchers: the ops lstm_fwd and lstm_bwd of docs/contract.md.

Legend
  T: time steps   B: batch   H: hidden units   Hout: proj_size or H   gates i, f, g, o (PyTorch's order)
  s: processing index of a step   t: its time index   BB, BN, BK: batch / unit / reduction block sizes
  KP, SP: padded reduction lengths   HP, OP: H and Hout padded to a power of two (persistent kernels)

Forward: a step kernel per step (tile = BB rows x BN units, all four gates of those units) or one
persistent launch (a program owns BB rows and all units, W_hh held on chip). With proj_size the
step path needs a second kernel per step, h_t = m_t W_hr^T, because every unit of h_t needs every unit
of m_t; the persistent kernel does both. Backward mirrors it (docs/triton.md).
"""

import triton
import triton.language as tl

from . import recurrence as rec
from .recurrence import sigmoid, tanh

# ----------------------------------------------------------------------------------------------------
# The cell (the only LSTM math; ACC = fp32, fp64 for fp64)


@triton.jit
def lstm_cell_fwd(a_i, a_f, a_g, a_o, c_prev):
    i = sigmoid(a_i)
    f = sigmoid(a_f)
    g = tanh(a_g)
    o = sigmoid(a_o)
    c = f * c_prev + i * g
    return i, f, g, o, c, o * tanh(c)


@triton.jit
def lstm_cell_bwd(dm, dc, i, f, g, o, c, c_prev):
    """-> (da_i, da_f, da_g, da_o, dc_{t-1}, m_t) from dm = dL/dm_t and dc = dL/dc_t from step t+1."""
    tc = tanh(c)
    dc = dc + dm * o * (1.0 - tc * tc)
    da_i = dc * g * i * (1.0 - i)
    da_f = dc * c_prev * f * (1.0 - f)
    da_g = dc * i * (1.0 - g * g)
    da_o = dm * tc * o * (1.0 - o)
    return da_i, da_f, da_g, da_o, dc * f, o * tc


@triton.jit
def lstm_gx(gx_ptr, rows, offs_n, H, act2, ACC: tl.constexpr):
    """gx_t's four gates for the tile (0 outside act2): the initial accumulators of h_{t-1} W_hh^T, and
    what a row that resets at t gets as its pre-activations (rec.restart_rows)."""
    return (rec.load_gate(gx_ptr, rows, offs_n, 4 * H, 0, H, act2, ACC),
            rec.load_gate(gx_ptr, rows, offs_n, 4 * H, 1, H, act2, ACC),
            rec.load_gate(gx_ptr, rows, offs_n, 4 * H, 2, H, act2, ACC),
            rec.load_gate(gx_ptr, rows, offs_n, 4 * H, 3, H, act2, ACC))


@triton.jit
def lstm_restart(a_i, a_f, a_g, a_o, x_i, x_f, x_g, x_o, cut):
    """The pre-activations a_* = gx_t + h_{t-1} W_hh^T with the rows of `cut` ([BB] bool, the rows that
    reset at t) set to gx_t (x_*): those rows start from h_{t-1} = 0. The GEMM's result is selected, not
    its operand (rec.reset_rows says why)."""
    return (rec.restart_rows(a_i, x_i, cut), rec.restart_rows(a_f, x_f, cut), rec.restart_rows(a_g, x_g, cut),
            rec.restart_rows(a_o, x_o, cut))


# ----------------------------------------------------------------------------------------------------
# Epilogues: the cell on a [BB, N] tile with its loads and stores, shared by step and persistent kernels


@triton.jit
def lstm_fwd_epilogue(a_i, a_f, a_g, a_o, c_prev, gates_ptr, cs_ptr, rows, offs_n, H, inb, act2, SAVE: tl.constexpr):
    """a_* = gx_t + h_{t-1} W_hh^T for the tile (gx_t is the GEMM's accumulator init, rec.restart_rows
    says why): runs the cell, saves gates and c_t. Returns (c_t where active else c_{t-1}, m_t)."""
    i, f, g, o, c, m = lstm_cell_fwd(a_i, a_f, a_g, a_o, c_prev)
    c = tl.where(act2, c, c_prev)
    if SAVE:
        ty = gates_ptr.dtype.element_ty
        sv = gates_ptr + rows[:, None] * (4 * H) + offs_n[None, :]
        tl.store(sv, tl.where(act2, i, 0.0).to(ty), mask=inb)
        tl.store(sv + H, tl.where(act2, f, 0.0).to(ty), mask=inb)
        tl.store(sv + 2 * H, tl.where(act2, g, 0.0).to(ty), mask=inb)
        tl.store(sv + 3 * H, tl.where(act2, o, 0.0).to(ty), mask=inb)
        tl.store(cs_ptr + rows[:, None] * H + offs_n[None, :], c.to(ty), mask=inb)
    return c, m


@triton.jit
def lstm_bwd_epilogue(dm, dc_in, gates_ptr, cs_ptr, c0_ptr, dgx_ptr, ms_ptr, t, T, B, H, b64, offs_n, inb_t, act2,
                      prev2, REVERSE: tl.constexpr, PROJ: tl.constexpr):
    """The cell backward at step t on a [BB, N] tile: writes dgx_t (0 where inactive) and, with a
    projection, m_t for dW_hr. prev2: where c_{t-1} is read, act2 less the rows that reset at t (which
    started from c_{t-1} = 0). Returns (da_i, da_f, da_g, da_o) (0 where inactive) and dc_{t-1} (the
    caller zeroes it where the step reset)."""
    ACC = dm.dtype
    rows = rec.rows_at(t, b64, B)
    sv = gates_ptr + rows[:, None] * (4 * H) + offs_n[None, :]
    i = tl.load(sv, mask=act2, other=0.0).to(ACC)
    f = tl.load(sv + H, mask=act2, other=0.0).to(ACC)
    g = tl.load(sv + 2 * H, mask=act2, other=0.0).to(ACC)
    o = tl.load(sv + 3 * H, mask=act2, other=0.0).to(ACC)
    c = tl.load(cs_ptr + rows[:, None] * H + offs_n[None, :], mask=act2, other=0.0).to(ACC)
    # c_{t-1}: cs of the step before in forward order (cs carries c through inactive steps), or c0.
    t_before = t + 1 if REVERSE else t - 1
    before = rec.in_time(t_before, T, b64)[:, None]
    rows_before = rec.rows_at(t_before, b64, B)
    c_prev = tl.load(cs_ptr + rows_before[:, None] * H + offs_n[None, :], mask=prev2 & before, other=0.0).to(ACC)
    c_prev += tl.load(c0_ptr + b64[:, None] * H + offs_n[None, :], mask=prev2 & (before == 0), other=0.0).to(ACC)
    da_i, da_f, da_g, da_o, dc, m = lstm_cell_bwd(dm, dc_in, i, f, g, o, c, c_prev)
    da_i = tl.where(act2, da_i, 0.0)
    da_f = tl.where(act2, da_f, 0.0)
    da_g = tl.where(act2, da_g, 0.0)
    da_o = tl.where(act2, da_o, 0.0)
    ty = dgx_ptr.dtype.element_ty
    d = dgx_ptr + rows[:, None] * (4 * H) + offs_n[None, :]
    tl.store(d, da_i.to(ty), mask=inb_t)
    tl.store(d + H, da_f.to(ty), mask=inb_t)
    tl.store(d + 2 * H, da_g.to(ty), mask=inb_t)
    tl.store(d + 3 * H, da_o.to(ty), mask=inb_t)
    if PROJ:
        tl.store(ms_ptr + rows[:, None] * H + offs_n[None, :], tl.where(act2, m, 0.0).to(ty), mask=inb_t)
    return da_i, da_f, da_g, da_o, tl.where(act2, dc, dc_in)


# ----------------------------------------------------------------------------------------------------
# Step kernels: grid (cdiv(B, BB), cdiv(N, BN)), one launch per step


@triton.jit(do_not_specialize=["s"])
def lstm_fwd_step_kernel(gx_ptr, w_ptr, len_ptr, rst_ptr, h_ptr, c_ptr, m_ptr, y_ptr, gates_ptr, cs_ptr, T, B, H,
                         HOUT, s, REVERSE: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr,
                         SAVE: tl.constexpr, PROJ: tl.constexpr, KP: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr,
                         BK: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Step s for BB rows x BN units: the four gates' gx_t + h_{t-1} W_hh^T tiles, then the cell.
    h: [2, B, Hout] ping-pong (rec.ping_pong); c: [B, H] in ACC, updated in place (each element is
    read and written by one program); m: [B, H], the input of lstm_proj_step_kernel (proj only).
    A row that resets at t (active) takes h_{t-1} = 0 (the projected h with proj_size) and c_{t-1} = 0;
    the projection kernel needs no mask (it reads only m_t, and carries h at inactive rows)."""
    offs_b, mask_b, b64 = rec.batch_block(B, BB)
    offs_n, mask_n = rec.unit_block(H, BN)
    t = rec.step_time(s, T, REVERSE)
    act = rec.active_rows(len_ptr, offs_b, mask_b, t, T, HAS_LENGTHS)
    inb = mask_b[:, None] & mask_n[None, :]
    act2 = act[:, None] & inb
    h_src, h_dst = rec.ping_pong(h_ptr, s, B, HOUT)
    w_tile = w_ptr + tl.program_id(1).to(tl.int64) * (KP * 4 * BN)
    state = b64[:, None] * H + offs_n[None, :]
    rows = rec.rows_at(t, b64, B)
    x_i, x_f, x_g, x_o = lstm_gx(gx_ptr, rows, offs_n, H, act2, ACC)
    a_i, a_f, a_g, a_o = rec.gemm_gates_out(h_src, b64 * HOUT, mask_b, HOUT, w_tile, x_i, x_f, x_g, x_o, 4, KP, BN,
                                            BK, PREC)
    c_prev = tl.load(c_ptr + state, mask=inb, other=0.0)
    if HAS_RESETS:  # cut rows are active: the epilogue's carry of inactive rows keeps the stored c
        cut = rec.reset_rows(rst_ptr, rows, act)
        a_i, a_f, a_g, a_o = lstm_restart(a_i, a_f, a_g, a_o, x_i, x_f, x_g, x_o, cut)
        c_prev = rec.zero_rows(c_prev, cut)
    c, m = lstm_fwd_epilogue(a_i, a_f, a_g, a_o, c_prev, gates_ptr, cs_ptr, rows, offs_n, H, inb, act2, SAVE)
    tl.store(c_ptr + state, c, mask=inb)
    if PROJ:
        tl.store(m_ptr + state, m.to(m_ptr.dtype.element_ty), mask=inb)
    else:
        h_prev = tl.load(h_src + state, mask=inb, other=0.0)
        rec.carry_store(m, h_prev, act2, inb, h_dst, state, y_ptr, rows[:, None] * H + offs_n[None, :])


@triton.jit(do_not_specialize=["s"])
def lstm_proj_step_kernel(m_ptr, w_ptr, len_ptr, h_ptr, y_ptr, T, B, H, HOUT, s, REVERSE: tl.constexpr,
                          HAS_LENGTHS: tl.constexpr, KP: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr,
                          BK: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Step s of the projection for BB rows x BN of the Hout units: h_t = m_t W_hr^T."""
    offs_b, mask_b, b64 = rec.batch_block(B, BB)
    offs_n, mask_n = rec.unit_block(HOUT, BN)
    t = rec.step_time(s, T, REVERSE)
    act = rec.active_rows(len_ptr, offs_b, mask_b, t, T, HAS_LENGTHS)
    inb = mask_b[:, None] & mask_n[None, :]
    act2 = act[:, None] & inb
    h_src, h_dst = rec.ping_pong(h_ptr, s, B, HOUT)
    w_tile = w_ptr + tl.program_id(1).to(tl.int64) * (KP * BN)
    zero = tl.zeros((BB, BN), dtype=ACC)
    h, _, _, _ = rec.gemm_gates_out(m_ptr, b64 * H, act, H, w_tile, zero, zero, zero, zero, 1, KP, BN, BK, PREC)
    state = b64[:, None] * HOUT + offs_n[None, :]
    h_prev = tl.load(h_src + state, mask=inb, other=0.0)
    rows = rec.rows_at(t, b64, B)
    rec.carry_store(h, h_prev, act2, inb, h_dst, state, y_ptr, rows[:, None] * HOUT + offs_n[None, :])


@triton.jit(do_not_specialize=["s"])
def lstm_bwd_step_kernel(dy_ptr, dgx_ptr, w_ptr, len_ptr, rst_ptr, c0_ptr, gates_ptr, cs_ptr, dh_ptr, dc_ptr, dhs_ptr,
                         ms_ptr, T, B, H, HOUT, s, REVERSE: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                         HAS_RESETS: tl.constexpr, PROJ: tl.constexpr, SP: tl.constexpr, BB: tl.constexpr,
                         BN: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Backward step s (t descending in forward order) for BB rows x BN units.

    Without projection: dm_t = dy_t + dh_buf + dgx_{t+1} W_hh (rec.grad_state_in, the GEMM of the
    previous step); launched T+1 times, the last one only finishing dh_0. With projection: dm_t =
    dh_t W_hr, dh_t being written by lstm_proj_bwd_step_kernel just before. dh: [B, H], dc: [B, H] in
    ACC, updated in place; dhs [T, B, Hout], ms [T, B, H]: dh_t and m_t for dW_hr (proj only).
    No gradient crosses a reset: rows that reset at t+1 get no dgx_{t+1} W_hh, and rows that
    reset at t read c_{t-1} = 0 and pass dc_{t-1} = 0 on."""
    offs_b, mask_b, b64 = rec.batch_block(B, BB)
    offs_n, mask_n = rec.unit_block(H, BN)
    t = rec.step_time(s, T, not REVERSE)
    act = rec.active_rows(len_ptr, offs_b, mask_b, t, T, HAS_LENGTHS)
    inb = mask_b[:, None] & mask_n[None, :]
    inb_t = inb & rec.in_time(t, T, offs_b)[:, None]
    act2 = act[:, None] & inb
    state = b64[:, None] * H + offs_n[None, :]
    rows = rec.rows_at(t, b64, B)
    prev2 = act2
    if HAS_RESETS:
        cut = rec.reset_rows(rst_ptr, rows, act)
        prev2 = act2 & ~cut[:, None]
    if PROJ:
        w_tile = w_ptr + tl.program_id(1).to(tl.int64) * (SP * BN)
        dm = rec.gemm_gates_in(dhs_ptr, rows * HOUT, act, HOUT, 1, SP, w_tile, tl.zeros((BB, BN), dtype=ACC), BN, BK,
                               PREC)
    else:
        t_done = t - 1 if REVERSE else t + 1
        done = mask_b & rec.in_time(t_done, T, offs_b)
        w_tile = w_ptr + tl.program_id(1).to(tl.int64) * (4 * SP * BN)
        rows_done = rec.rows_at(t_done, b64, B)
        dh_in, dm = rec.grad_state_in(dgx_ptr, rows_done * (4 * H), done, H, 4, SP, w_tile, dh_ptr, state, inb, dy_ptr,
                                      rows[:, None] * H + offs_n[None, :], act2, rst_ptr, rows_done, BN, BK, ACC, PREC,
                                      HAS_RESETS)
        tl.store(dh_ptr + state, tl.where(act2, 0.0, dh_in), mask=inb)
    dc_in = tl.load(dc_ptr + state, mask=inb, other=0.0)
    _, _, _, _, dc = lstm_bwd_epilogue(dm, dc_in, gates_ptr, cs_ptr, c0_ptr, dgx_ptr, ms_ptr, t, T, B, H, b64, offs_n,
                                       inb_t, act2, prev2, REVERSE, PROJ)
    if HAS_RESETS:
        dc = rec.zero_rows(dc, cut)
    tl.store(dc_ptr + state, dc, mask=inb)


@triton.jit(do_not_specialize=["s"])
def lstm_proj_bwd_step_kernel(dy_ptr, dgx_ptr, w_ptr, len_ptr, rst_ptr, dh_ptr, dhs_ptr, T, B, H, HOUT, s,
                              REVERSE: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr,
                              SP: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                              ACC: tl.constexpr, PREC: tl.constexpr):
    """Backward step s with projection, for BB rows x BN of the Hout units: dh_t = dy_t + dh_buf +
    dgx_{t+1} W_hh into dhs[t] (launched T+1 times, the last one only finishing dh_0). Rows that reset
    at t+1 get no dgx_{t+1} W_hh (no gradient crosses a reset)."""
    offs_b, mask_b, b64 = rec.batch_block(B, BB)
    offs_n, mask_n = rec.unit_block(HOUT, BN)
    t = rec.step_time(s, T, not REVERSE)
    act = rec.active_rows(len_ptr, offs_b, mask_b, t, T, HAS_LENGTHS)
    inb = mask_b[:, None] & mask_n[None, :]
    act2 = act[:, None] & inb
    state = b64[:, None] * HOUT + offs_n[None, :]
    rows = rec.rows_at(t, b64, B)
    t_done = t - 1 if REVERSE else t + 1
    done = mask_b & rec.in_time(t_done, T, offs_b)
    w_tile = w_ptr + tl.program_id(1).to(tl.int64) * (4 * SP * BN)
    rows_done = rec.rows_at(t_done, b64, B)
    dh_in, dh = rec.grad_state_in(dgx_ptr, rows_done * (4 * H), done, H, 4, SP, w_tile, dh_ptr, state, inb, dy_ptr,
                                  rows[:, None] * HOUT + offs_n[None, :], act2, rst_ptr, rows_done, BN, BK, ACC, PREC,
                                  HAS_RESETS)
    tl.store(dh_ptr + state, tl.where(act2, 0.0, dh_in), mask=inb)
    inb_t = inb & rec.in_time(t, T, offs_b)[:, None]
    tl.store(dhs_ptr + rows[:, None] * HOUT + offs_n[None, :], tl.where(act2, dh, 0.0).to(dhs_ptr.dtype.element_ty),
             mask=inb_t)


# ----------------------------------------------------------------------------------------------------
# Persistent kernels: grid (cdiv(B, BB),), one launch for all T steps, weights on chip, state in registers


@triton.jit
def lstm_fwd_persistent_kernel(gx_ptr, w_ptr, wr_ptr, len_ptr, rst_ptr, h0_ptr, c0_ptr, y_ptr, hn_ptr, cn_ptr,
                               gates_ptr, cs_ptr, T, B, H, HOUT, REVERSE: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                               HAS_RESETS: tl.constexpr, SAVE: tl.constexpr, PROJ: tl.constexpr, HP: tl.constexpr,
                               OP: tl.constexpr, BB: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """All T steps for BB rows and every unit. w: packed W_hh [OP, 4, HP]; wr: packed W_hr [HP, 1, OP]."""
    offs_b, mask_b, b64 = rec.batch_block(B, BB)
    offs_n = tl.arange(0, HP)
    offs_o = tl.arange(0, OP)
    inb = mask_b[:, None] & (offs_n < H)[None, :]
    inb_o = mask_b[:, None] & (offs_o < HOUT)[None, :]
    w_i = rec.load_resident(w_ptr, 0, 4, OP, HP)
    w_f = rec.load_resident(w_ptr, 1, 4, OP, HP)
    w_g = rec.load_resident(w_ptr, 2, 4, OP, HP)
    w_o = rec.load_resident(w_ptr, 3, 4, OP, HP)
    if PROJ:
        w_r = rec.load_resident(wr_ptr, 0, 1, HP, OP)
    h = tl.load(h0_ptr + b64[:, None] * HOUT + offs_o[None, :], mask=inb_o, other=0.0)  # [BB, OP], storage dtype
    c = tl.load(c0_ptr + b64[:, None] * H + offs_n[None, :], mask=inb, other=0.0).to(ACC)  # [BB, HP]
    if HAS_RESETS:  # step 0's mask; each step loads the next one's (rec.resets_of_step)
        rst_next = rec.resets_of_step(rst_ptr, 0, T, offs_b, b64, B, mask_b, REVERSE)
    for s in range(0, T):
        t = rec.step_time(s, T, REVERSE)
        act = rec.active_rows(len_ptr, offs_b, mask_b, t, T, HAS_LENGTHS)
        act2 = act[:, None] & inb
        rows = rec.rows_at(t, b64, B)
        x_i, x_f, x_g, x_o = lstm_gx(gx_ptr, rows, offs_n, H, act2, ACC)
        a_i, a_f = rec.mma(h, w_i, x_i, PREC), rec.mma(h, w_f, x_f, PREC)
        a_g, a_o = rec.mma(h, w_g, x_g, PREC), rec.mma(h, w_o, x_o, PREC)
        if HAS_RESETS:
            # Rows that reset at t start from h = c = 0. They are active, so c_t replaces c below and the
            # carry of inactive rows is untouched: c can be zeroed in place.
            cut, rst_next = act & rst_next, rec.resets_of_step(rst_ptr, s + 1, T, offs_b, b64, B, mask_b, REVERSE)
            a_i, a_f, a_g, a_o = lstm_restart(a_i, a_f, a_g, a_o, x_i, x_f, x_g, x_o, cut)
            c = rec.zero_rows(c, cut)
        c, m = lstm_fwd_epilogue(a_i, a_f, a_g, a_o, c, gates_ptr, cs_ptr, rows, offs_n, H, inb, act2, SAVE)
        if PROJ:
            h_t = rec.mma(m.to(h.dtype), w_r, tl.zeros((BB, OP), dtype=ACC), PREC)
        else:
            h_t = m
        act_o = act[:, None] & inb_o
        tl.store(y_ptr + rows[:, None] * HOUT + offs_o[None, :], tl.where(act_o, h_t, 0.0).to(h.dtype), mask=inb_o)
        h = tl.where(act_o, h_t.to(h.dtype), h)
    tl.store(hn_ptr + b64[:, None] * HOUT + offs_o[None, :], h, mask=inb_o)
    tl.store(cn_ptr + b64[:, None] * H + offs_n[None, :], c.to(cn_ptr.dtype.element_ty), mask=inb)


@triton.jit
def lstm_bwd_persistent_kernel(dy_ptr, dhn_ptr, dcn_ptr, w_ptr, wr_ptr, len_ptr, rst_ptr, c0_ptr, gates_ptr, cs_ptr,
                               dgx_ptr, dh0_ptr, dc0_ptr, dhs_ptr, ms_ptr, T, B, H, HOUT, REVERSE: tl.constexpr,
                               HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr, PROJ: tl.constexpr,
                               HP: tl.constexpr, OP: tl.constexpr, BB: tl.constexpr, ACC: tl.constexpr,
                               PREC: tl.constexpr):
    """All T steps of backward for BB rows and every unit. w: packed W_hh [4*HP, OP]; wr: W_hr [OP, HP]."""
    offs_b, mask_b, b64 = rec.batch_block(B, BB)
    offs_n = tl.arange(0, HP)
    offs_o = tl.arange(0, OP)
    inb = mask_b[:, None] & (offs_n < H)[None, :]
    inb_o = mask_b[:, None] & (offs_o < HOUT)[None, :]
    w_i = rec.load_resident_in(w_ptr, 0, HP, OP)
    w_f = rec.load_resident_in(w_ptr, 1, HP, OP)
    w_g = rec.load_resident_in(w_ptr, 2, HP, OP)
    w_o = rec.load_resident_in(w_ptr, 3, HP, OP)
    if PROJ:
        w_r = rec.load_resident_in(wr_ptr, 0, OP, HP)
    ty = dgx_ptr.dtype.element_ty
    dh = tl.load(dhn_ptr + b64[:, None] * HOUT + offs_o[None, :], mask=inb_o, other=0.0).to(ACC)  # [BB, OP]
    dc = tl.load(dcn_ptr + b64[:, None] * H + offs_n[None, :], mask=inb, other=0.0).to(ACC)  # [BB, HP]
    if HAS_RESETS:  # step 0's mask; each step loads the next one's (rec.resets_of_step)
        rst_next = rec.resets_of_step(rst_ptr, 0, T, offs_b, b64, B, mask_b, not REVERSE)
    for s in range(0, T):
        t = rec.step_time(s, T, not REVERSE)
        act = rec.active_rows(len_ptr, offs_b, mask_b, t, T, HAS_LENGTHS)
        act2 = act[:, None] & inb
        act_o = act[:, None] & inb_o
        rows = rec.rows_at(t, b64, B)
        prev2 = act2
        if HAS_RESETS:
            cut, rst_next = act & rst_next, rec.resets_of_step(rst_ptr, s + 1, T, offs_b, b64, B, mask_b, not REVERSE)
            prev2 = act2 & ~cut[:, None]
        dh_t = dh + tl.load(dy_ptr + rows[:, None] * HOUT + offs_o[None, :], mask=act_o, other=0.0).to(ACC)
        if PROJ:
            tl.store(dhs_ptr + rows[:, None] * HOUT + offs_o[None, :], tl.where(act_o, dh_t, 0.0).to(ty), mask=inb_o)
            dm = rec.mma(dh_t.to(ty), w_r, tl.zeros((BB, HP), dtype=ACC), PREC)
        else:
            dm = dh_t
        da_i, da_f, da_g, da_o, dc = lstm_bwd_epilogue(dm, dc, gates_ptr, cs_ptr, c0_ptr, dgx_ptr, ms_ptr, t, T, B, H,
                                                       b64, offs_n, inb, act2, prev2, REVERSE, PROJ)
        # The recurrent GEMM takes dgx_t rounded to the storage dtype, as the step kernels read it back.
        d = rec.mma(da_i.to(ty), w_i, tl.zeros((BB, OP), dtype=ACC), PREC)
        d = rec.mma(da_f.to(ty), w_f, d, PREC)
        d = rec.mma(da_g.to(ty), w_g, d, PREC)
        d = rec.mma(da_o.to(ty), w_o, d, PREC)
        if HAS_RESETS:
            # No gradient crosses back over a reset at t. dh as one chain of selects: where(act, d, dh)
            # followed by zero_rows(dh, cut) next to zero_rows(dc, cut) crashed LLVM's SLP vectorizer
            # (an assertion in scheduleBlock) in the fp32 kernel on sm_90 under triton 3.9 (compile_check).
            dh = tl.where(act_o & ~cut[:, None], d, tl.where(act_o, 0.0, dh))
            dc = rec.zero_rows(dc, cut)
        else:
            dh = tl.where(act_o, d, dh)
    tl.store(dh0_ptr + b64[:, None] * HOUT + offs_o[None, :], dh.to(ty), mask=inb_o)
    tl.store(dc0_ptr + b64[:, None] * H + offs_n[None, :], dc.to(ty), mask=inb)


# ----------------------------------------------------------------------------------------------------
# Launchers (the ops)


def _hout(op, name, t, H, w_hr):
    """Hout, read from a [B, Hout] state; without w_hr it must equal H."""
    if t.dim() != 2:
        raise ValueError(f"fastrnn_triton::{op}: {name} must be [B, Hout], got shape {tuple(t.shape)}")
    if w_hr is None and t.shape[1] != H:
        raise ValueError(f"fastrnn_triton::{op}: without w_hr, {name} must have H={H} columns, got {t.shape[1]}")
    return t.shape[1]


@rec.guarded
def lstm_fwd(gx, w_hh, h0, c0, w_hr, lengths, resets, reverse, save, b_gx=None):
    op = "lstm_fwd"
    T, B, H = rec.check_sizes(op, "gx", gx, 4)
    Hout = _hout(op, "h0", h0, H, w_hr)
    specs = {"w_hh": (w_hh, (4 * H, Hout)), "h0": (h0, (B, Hout)), "c0": (c0, (B, H)), "w_hr": (w_hr, (Hout, H)),
             "b_gx": (b_gx, (4 * H,))}
    rec.check_inputs(op, gx, specs, lengths, resets, T, B)
    gx = rec.with_input_bias(gx, b_gx)
    gx, w_hh, h0, c0, w_hr, lengths = rec.contiguous(gx, w_hh, h0, c0, w_hr, lengths)
    proj = w_hr is not None
    y = gx.new_empty(T, B, Hout)
    gates = gx.new_empty(T, B, 4 * H) if save else gx.new_empty(0)
    cs = gx.new_empty(T, B, H) if save else gx.new_empty(0)
    if B == 0 or T == 0 or H == 0:  # nothing to compute: no empty grid is launched
        return y, h0.clone(), c0.clone(), gates, cs
    p = rec.plan(B, H, Hout, 4, proj, gx.dtype)
    lens, has_lengths = rec.lengths_arg(lengths, gx)
    rst, has_resets = rec.resets_arg(resets, gx)
    gates_arg, cs_arg = (gates, cs) if save else (gx, gx)
    flags = p.meta(REVERSE=reverse, HAS_LENGTHS=has_lengths, HAS_RESETS=has_resets)
    if p.persistent:
        w = rec.pack_gates_out(w_hh, 4, H, Hout, p.HP, p.OP)
        wr = rec.pack_gates_out(w_hr, 1, Hout, H, p.OP, p.HP) if proj else w
        h_n, c_n = h0.new_empty(B, Hout), c0.new_empty(B, H)
        launch = rec.Launch(lstm_fwd_persistent_kernel, (triton.cdiv(B, p.BB),),
                            (gx, w, wr, lens, rst, h0, c0, y, h_n, c_n, gates_arg, cs_arg, T, B, H, Hout),
                            dict(SAVE=save, PROJ=proj, HP=p.HP, OP=p.OP, **flags))
        if launch.fits(op, gx.device):
            launch()
            return y, h_n, c_n, gates, cs
        p = rec.plan(B, H, Hout, 4, proj, gx.dtype, persistent=False)
        flags = p.meta(REVERSE=reverse, HAS_LENGTHS=has_lengths, HAS_RESETS=has_resets)
    KP = rec.round_up(Hout, p.BK)
    w = rec.pack_gates_out(w_hh, 4, H, Hout, p.BN, KP)
    h = gx.new_empty(2, B, Hout)
    h[0] = h0
    c = c0.to(rec.workspace_dtype(gx.dtype), copy=True)
    m = gx.new_empty(B, H) if proj else gx
    launches = [rec.Launch(
        lstm_fwd_step_kernel, (triton.cdiv(B, p.BB), triton.cdiv(H, p.BN)),
        (gx, w, lens, rst, h, c, m, y, gates_arg, cs_arg, T, B, H, Hout),
        dict(SAVE=save, PROJ=proj, KP=KP, BN=p.BN, BK=p.BK, **flags),
    )]
    if proj:
        KPr = rec.round_up(H, p.BK)
        wr = rec.pack_gates_out(w_hr, 1, Hout, H, p.BN, KPr)
        # h_t = m_t W_hr^T reads no previous state, so the projection takes no reset mask.
        proj_flags = {k: v for k, v in flags.items() if k != "HAS_RESETS"}
        launches.append(rec.Launch(
            lstm_proj_step_kernel, (triton.cdiv(B, p.BB), triton.cdiv(Hout, p.BN)),
            (m, wr, lens, h, y, T, B, H, Hout), dict(KP=KPr, BN=p.BN, BK=p.BK, **proj_flags),
        ))
    rec.run_steps(T, *launches)
    return y, h[T % 2].clone(), c.to(c0.dtype), gates, cs


@rec.guarded
def lstm_bwd(dy, dh_n, dc_n, w_hh, c0, w_hr, gates, cs, lengths, resets, reverse):
    op = "lstm_bwd"
    T, B, H = rec.check_sizes(op, "gates", gates, 4)
    Hout = _hout(op, "dh_n", dh_n, H, w_hr)
    specs = {"dy": (dy, (T, B, Hout)), "dh_n": (dh_n, (B, Hout)), "dc_n": (dc_n, (B, H)),
             "w_hh": (w_hh, (4 * H, Hout)), "c0": (c0, (B, H)), "w_hr": (w_hr, (Hout, H)), "cs": (cs, (T, B, H))}
    rec.check_inputs(op, gates, specs, lengths, resets, T, B)
    dy, dh_n, dc_n, w_hh, c0, w_hr, gates, cs, lengths = rec.contiguous(
        dy, dh_n, dc_n, w_hh, c0, w_hr, gates, cs, lengths)
    proj = w_hr is not None
    dgx = gates.new_empty(T, B, 4 * H)
    if B == 0 or T == 0 or H == 0:  # nothing to compute: no empty grid is launched
        dw_hr = w_hr.new_zeros(w_hr.shape) if proj else gates.new_empty(0)
        return dgx, dh_n.clone(), dc_n.clone(), dw_hr
    p = rec.plan(B, H, Hout, 4, proj, gates.dtype)
    lens, has_lengths = rec.lengths_arg(lengths, gates)
    rst, has_resets = rec.resets_arg(resets, gates)
    dhs = gates.new_empty(T, B, Hout) if proj else gates
    ms = gates.new_empty(T, B, H) if proj else gates
    flags = p.meta(REVERSE=reverse, HAS_LENGTHS=has_lengths, HAS_RESETS=has_resets)
    persistent = None
    if p.persistent:
        w = rec.pack_gates_in(w_hh, 4, H, Hout, p.HP, p.OP)
        wr = rec.pack_gates_in(w_hr, 1, Hout, H, p.OP, p.HP) if proj else w
        dh0, dc0 = dh_n.new_empty(B, Hout), dc_n.new_empty(B, H)
        persistent = rec.Launch(
            lstm_bwd_persistent_kernel, (triton.cdiv(B, p.BB),),
            (dy, dh_n, dc_n, w, wr, lens, rst, c0, gates, cs, dgx, dh0, dc0, dhs, ms, T, B, H, Hout),
            dict(PROJ=proj, HP=p.HP, OP=p.OP, **flags))
        if not persistent.fits(op, dy.device):
            persistent = None
            p = rec.plan(B, H, Hout, 4, proj, gates.dtype, persistent=False)
            flags = p.meta(REVERSE=reverse, HAS_LENGTHS=has_lengths, HAS_RESETS=has_resets)
    if persistent is not None:
        persistent()
    else:
        ws = rec.workspace_dtype(gates.dtype)
        dh, dc = dh_n.to(ws, copy=True), dc_n.to(ws, copy=True)
        grid_h = (triton.cdiv(B, p.BB), triton.cdiv(H, p.BN))
        SP = rec.round_up(H, p.BK)
        w = rec.pack_gates_in(w_hh, 4, H, Hout, SP, p.BN)
        if proj:
            SPr = rec.round_up(Hout, p.BK)
            wr = rec.pack_gates_in(w_hr, 1, Hout, H, SPr, p.BN)
            dh_step = rec.Launch(
                lstm_proj_bwd_step_kernel, (triton.cdiv(B, p.BB), triton.cdiv(Hout, p.BN)),
                (dy, dgx, w, lens, rst, dh, dhs, T, B, H, Hout), dict(SP=SP, BN=p.BN, BK=p.BK, **flags),
            )
            cell_step = rec.Launch(
                lstm_bwd_step_kernel, grid_h, (dy, dgx, wr, lens, rst, c0, gates, cs, dh, dc, dhs, ms, T, B, H, Hout),
                dict(PROJ=True, SP=SPr, BN=p.BN, BK=p.BK, **flags),
            )
            rec.run_steps(T, dh_step, cell_step)
            dh_step(T)
        else:
            cell_step = rec.Launch(
                lstm_bwd_step_kernel, grid_h, (dy, dgx, w, lens, rst, c0, gates, cs, dh, dc, dhs, ms, T, B, H, Hout),
                dict(PROJ=False, SP=SP, BN=p.BN, BK=p.BK, **flags),
            )
            rec.run_steps(T + 1, cell_step)
        dh0, dc0 = dh.to(dh_n.dtype), dc.to(dc_n.dtype)
    # dW_hr = sum_t dh_t^T m_t: one GEMM over all T*B rows (rows of inactive steps are 0 in both).
    dw_hr = dhs.flatten(0, 1).t() @ ms.flatten(0, 1) if proj else gates.new_empty(0)
    return dgx, dh0, dc0, dw_hr
