"""Elman RNN (tanh or relu) Triton kernels and their launchers: the ops rnn_fwd and rnn_bwd of
docs/contract.md.

Legend
  T: time steps   B: batch   H: hidden units   one gate (G = 1)
  s: processing index of a step   t: its time index   BB, BN, BK: batch / unit / reduction block sizes
  KP, SP: padded reduction lengths   HP: H padded to a power of two (persistent kernels)
"""

import triton
import triton.language as tl

from . import recurrence as rec
from .recurrence import tanh

# ----------------------------------------------------------------------------------------------------
# The cell (the only RNN math; ACC = fp32, fp64 for fp64)


@triton.jit
def rnn_cell_fwd(a, RELU: tl.constexpr):
    if RELU:
        return tl.maximum(a, 0.0)
    return tanh(a)


@triton.jit
def rnn_cell_bwd(dh, h, RELU: tl.constexpr):
    """dL/da from dL/dh_t and h_t = act(a)."""
    if RELU:
        return tl.where(h > 0.0, dh, 0.0)
    return dh * (1.0 - h * h)


# ----------------------------------------------------------------------------------------------------
# Epilogues, shared by step and persistent kernels


@triton.jit
def rnn_bwd_epilogue(dh, y_ptr, dgx_ptr, rows, offs_n, H, inb_t, act2, RELU: tl.constexpr):
    """Writes dgx_t (0 where inactive) and returns it; h_t is y_t at an active step."""
    off = rows[:, None] * H + offs_n[None, :]
    h = tl.load(y_ptr + off, mask=act2, other=0.0).to(dh.dtype)
    da = tl.where(act2, rnn_cell_bwd(dh, h, RELU), 0.0)
    tl.store(dgx_ptr + off, da.to(dgx_ptr.dtype.element_ty), mask=inb_t)
    return da


# ----------------------------------------------------------------------------------------------------
# Step kernels: grid (cdiv(B, BB), cdiv(H, BN)), one launch per step


@triton.jit(do_not_specialize=["s"])
def rnn_fwd_step_kernel(gx_ptr, w_ptr, len_ptr, rst_ptr, h_ptr, y_ptr, T, B, H, s, REVERSE: tl.constexpr,
                        HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr, RELU: tl.constexpr, KP: tl.constexpr,
                        BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr,
                        PREC: tl.constexpr):
    """Step s for BB rows x BN units. h: [2, B, H] ping-pong (rec.ping_pong). A row that resets at t
    reads no h_{t-1} (its GEMM row is gx_t alone); the carry at inactive rows keeps the stored h."""
    offs_b, mask_b, b64 = rec.batch_block(B, BB)
    offs_n, mask_n = rec.unit_block(H, BN)
    t = rec.step_time(s, T, REVERSE)
    act = rec.active_rows(len_ptr, offs_b, mask_b, t, T, HAS_LENGTHS)
    inb = mask_b[:, None] & mask_n[None, :]
    act2 = act[:, None] & inb
    h_src, h_dst = rec.ping_pong(h_ptr, s, B, H)
    w_tile = w_ptr + tl.program_id(1).to(tl.int64) * (KP * BN)
    rows = rec.rows_at(t, b64, B)
    # gx_t is the GEMM's accumulator init, and a reset row's result (rec.restart_rows says why)
    x = rec.load_gate(gx_ptr, rows, offs_n, H, 0, H, act2, ACC)
    a, _, _, _ = rec.gemm_gates_out(h_src, b64 * H, mask_b, H, w_tile, x, x, x, x, 1, KP, BN, BK, PREC)
    if HAS_RESETS:
        a = rec.restart_rows(a, x, rec.reset_rows(rst_ptr, rows, act))
    state = b64[:, None] * H + offs_n[None, :]
    h = rnn_cell_fwd(a, RELU)
    h_prev = tl.load(h_src + state, mask=inb, other=0.0)
    rec.carry_store(h, h_prev, act2, inb, h_dst, state, y_ptr, rows[:, None] * H + offs_n[None, :])


@triton.jit(do_not_specialize=["s"])
def rnn_bwd_step_kernel(dy_ptr, dgx_ptr, w_ptr, len_ptr, rst_ptr, y_ptr, dh_ptr, T, B, H, s, REVERSE: tl.constexpr,
                        HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr, RELU: tl.constexpr, SP: tl.constexpr,
                        BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr,
                        PREC: tl.constexpr):
    """Backward step s for BB rows x BN units: dh_t = dy_t + dh_buf + dgx_{t+1} W_hh (rec.grad_state_in);
    launched T+1 times, the last one only finishing dh_0. dh: [B, H] in ACC. Rows that reset at t+1 get no
    dgx_{t+1} W_hh (no gradient crosses a reset; dh_buf is 0 after an active step)."""
    offs_b, mask_b, b64 = rec.batch_block(B, BB)
    offs_n, mask_n = rec.unit_block(H, BN)
    t = rec.step_time(s, T, not REVERSE)
    act = rec.active_rows(len_ptr, offs_b, mask_b, t, T, HAS_LENGTHS)
    inb = mask_b[:, None] & mask_n[None, :]
    inb_t = inb & rec.in_time(t, T, offs_b)[:, None]
    act2 = act[:, None] & inb
    state = b64[:, None] * H + offs_n[None, :]
    rows = rec.rows_at(t, b64, B)
    t_done = t - 1 if REVERSE else t + 1
    done = mask_b & rec.in_time(t_done, T, offs_b)
    w_tile = w_ptr + tl.program_id(1).to(tl.int64) * (SP * BN)
    rows_done = rec.rows_at(t_done, b64, B)
    dh_in, dh = rec.grad_state_in(dgx_ptr, rows_done * H, done, H, 1, SP, w_tile, dh_ptr, state, inb, dy_ptr,
                                  rows[:, None] * H + offs_n[None, :], act2, rst_ptr, rows_done, BN, BK, ACC, PREC,
                                  HAS_RESETS)
    rnn_bwd_epilogue(dh, y_ptr, dgx_ptr, rows, offs_n, H, inb_t, act2, RELU)
    tl.store(dh_ptr + state, tl.where(act2, 0.0, dh_in), mask=inb)


# ----------------------------------------------------------------------------------------------------
# Persistent kernels: grid (cdiv(B, BB),), one launch for all T steps, weights on chip, state in registers


@triton.jit
def rnn_fwd_persistent_kernel(gx_ptr, w_ptr, len_ptr, rst_ptr, h0_ptr, y_ptr, hn_ptr, T, B, H, REVERSE: tl.constexpr,
                              HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr, RELU: tl.constexpr,
                              HP: tl.constexpr, BB: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """All T steps for BB rows and every unit. w: packed W_hh [HP, 1, HP]."""
    offs_b, mask_b, b64 = rec.batch_block(B, BB)
    offs_n = tl.arange(0, HP)
    inb = mask_b[:, None] & (offs_n < H)[None, :]
    w = rec.load_resident(w_ptr, 0, 1, HP, HP)
    state = b64[:, None] * H + offs_n[None, :]
    h = tl.load(h0_ptr + state, mask=inb, other=0.0)  # [BB, HP], storage dtype
    if HAS_RESETS:  # step 0's mask; each step loads the next one's (rec.resets_of_step)
        rst_next = rec.resets_of_step(rst_ptr, 0, T, offs_b, b64, B, mask_b, REVERSE)
    for s in range(0, T):
        t = rec.step_time(s, T, REVERSE)
        act = rec.active_rows(len_ptr, offs_b, mask_b, t, T, HAS_LENGTHS)
        act2 = act[:, None] & inb
        rows = rec.rows_at(t, b64, B)
        x = rec.load_gate(gx_ptr, rows, offs_n, H, 0, H, act2, ACC)  # the init (rec.restart_rows says why)
        a = rec.mma(h, w, x, PREC)
        if HAS_RESETS:  # rows that reset at t start from h_{t-1} = 0 (active rows: h_t replaces it below)
            a = rec.restart_rows(a, x, act & rst_next)
            rst_next = rec.resets_of_step(rst_ptr, s + 1, T, offs_b, b64, B, mask_b, REVERSE)
        h_t = rnn_cell_fwd(a, RELU)
        tl.store(y_ptr + rows[:, None] * H + offs_n[None, :], tl.where(act2, h_t, 0.0).to(h.dtype), mask=inb)
        h = tl.where(act2, h_t.to(h.dtype), h)
    tl.store(hn_ptr + state, h, mask=inb)


@triton.jit
def rnn_bwd_persistent_kernel(dy_ptr, dhn_ptr, w_ptr, len_ptr, rst_ptr, y_ptr, dgx_ptr, dh0_ptr, T, B, H,
                              REVERSE: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr,
                              RELU: tl.constexpr, HP: tl.constexpr, BB: tl.constexpr, ACC: tl.constexpr,
                              PREC: tl.constexpr):
    """All T steps of backward for BB rows and every unit. w: packed W_hh [HP, HP]."""
    offs_b, mask_b, b64 = rec.batch_block(B, BB)
    offs_n = tl.arange(0, HP)
    inb = mask_b[:, None] & (offs_n < H)[None, :]
    w = rec.load_resident_in(w_ptr, 0, HP, HP)
    ty = dgx_ptr.dtype.element_ty
    state = b64[:, None] * H + offs_n[None, :]
    dh = tl.load(dhn_ptr + state, mask=inb, other=0.0).to(ACC)
    if HAS_RESETS:  # step 0's mask; each step loads the next one's (rec.resets_of_step)
        rst_next = rec.resets_of_step(rst_ptr, 0, T, offs_b, b64, B, mask_b, not REVERSE)
    for s in range(0, T):
        t = rec.step_time(s, T, not REVERSE)
        act = rec.active_rows(len_ptr, offs_b, mask_b, t, T, HAS_LENGTHS)
        act2 = act[:, None] & inb
        rows = rec.rows_at(t, b64, B)
        dh_t = dh + tl.load(dy_ptr + rows[:, None] * H + offs_n[None, :], mask=act2, other=0.0).to(ACC)
        da = rnn_bwd_epilogue(dh_t, y_ptr, dgx_ptr, rows, offs_n, H, inb, act2, RELU)
        # The recurrent GEMM takes dgx_t rounded to the storage dtype, as the step kernels read it back.
        dh = tl.where(act2, rec.mma(da.to(ty), w, tl.zeros((BB, HP), dtype=ACC), PREC), dh)
        if HAS_RESETS:  # no gradient crosses back over a reset at t
            dh = rec.zero_rows(dh, act & rst_next)
            rst_next = rec.resets_of_step(rst_ptr, s + 1, T, offs_b, b64, B, mask_b, not REVERSE)
    tl.store(dh0_ptr + state, dh.to(ty), mask=inb)


# ----------------------------------------------------------------------------------------------------
# Launchers (the ops)


@rec.guarded
def rnn_fwd(gx, w_hh, h0, lengths, resets, reverse, relu, b_gx=None):
    op = "rnn_fwd"
    T, B, H = rec.check_sizes(op, "gx", gx, 1)
    rec.check_inputs(op, gx, {"w_hh": (w_hh, (H, H)), "h0": (h0, (B, H)), "b_gx": (b_gx, (H,))}, lengths, resets,
                     T, B)
    gx = rec.with_input_bias(gx, b_gx)
    gx, w_hh, h0, lengths = rec.contiguous(gx, w_hh, h0, lengths)
    y = gx.new_empty(T, B, H)
    if B == 0 or T == 0 or H == 0:  # nothing to compute: no empty grid is launched
        return y, h0.clone()
    p = rec.plan(B, H, H, 1, False, gx.dtype)
    lens, has_lengths = rec.lengths_arg(lengths, gx)
    rst, has_resets = rec.resets_arg(resets, gx)
    flags = p.meta(REVERSE=reverse, HAS_LENGTHS=has_lengths, HAS_RESETS=has_resets, RELU=relu)
    if p.persistent:
        w = rec.pack_gates_out(w_hh, 1, H, H, p.HP, p.HP)
        h_n = h0.new_empty(B, H)
        launch = rec.Launch(rnn_fwd_persistent_kernel, (triton.cdiv(B, p.BB),), (gx, w, lens, rst, h0, y, h_n, T, B, H),
                            dict(HP=p.HP, **flags))
        if launch.fits(op, gx.device):
            launch()
            return y, h_n
        p = rec.plan(B, H, H, 1, False, gx.dtype, persistent=False)
        flags = p.meta(REVERSE=reverse, HAS_LENGTHS=has_lengths, HAS_RESETS=has_resets, RELU=relu)
    KP = rec.round_up(H, p.BK)
    w = rec.pack_gates_out(w_hh, 1, H, H, p.BN, KP)
    h = gx.new_empty(2, B, H)
    h[0] = h0
    rec.run_steps(T, rec.Launch(
        rnn_fwd_step_kernel, (triton.cdiv(B, p.BB), triton.cdiv(H, p.BN)),
        (gx, w, lens, rst, h, y, T, B, H), dict(KP=KP, BN=p.BN, BK=p.BK, **flags),
    ))
    return y, h[T % 2].clone()


@rec.guarded
def rnn_bwd(dy, dh_n, w_hh, y, lengths, resets, reverse, relu):
    op = "rnn_bwd"
    T, B, H = rec.check_sizes(op, "y", y, 1)
    rec.check_inputs(op, y, {"dy": (dy, (T, B, H)), "dh_n": (dh_n, (B, H)), "w_hh": (w_hh, (H, H))}, lengths,
                     resets, T, B)
    dy, dh_n, w_hh, y, lengths = rec.contiguous(dy, dh_n, w_hh, y, lengths)
    dgx = dy.new_empty(T, B, H)
    if B == 0 or T == 0 or H == 0:  # nothing to compute: no empty grid is launched
        return dgx, dh_n.clone()
    p = rec.plan(B, H, H, 1, False, dy.dtype)
    lens, has_lengths = rec.lengths_arg(lengths, dy)
    rst, has_resets = rec.resets_arg(resets, dy)
    flags = p.meta(REVERSE=reverse, HAS_LENGTHS=has_lengths, HAS_RESETS=has_resets, RELU=relu)
    if p.persistent:
        w = rec.pack_gates_in(w_hh, 1, H, H, p.HP, p.HP)
        dh0 = dh_n.new_empty(B, H)
        launch = rec.Launch(rnn_bwd_persistent_kernel, (triton.cdiv(B, p.BB),),
                            (dy, dh_n, w, lens, rst, y, dgx, dh0, T, B, H), dict(HP=p.HP, **flags))
        if launch.fits(op, dy.device):
            launch()
            return dgx, dh0
        p = rec.plan(B, H, H, 1, False, dy.dtype, persistent=False)
        flags = p.meta(REVERSE=reverse, HAS_LENGTHS=has_lengths, HAS_RESETS=has_resets, RELU=relu)
    SP = rec.round_up(H, p.BK)
    w = rec.pack_gates_in(w_hh, 1, H, H, SP, p.BN)
    dh = dh_n.to(rec.workspace_dtype(dy.dtype), copy=True)
    rec.run_steps(T + 1, rec.Launch(
        rnn_bwd_step_kernel, (triton.cdiv(B, p.BB), triton.cdiv(H, p.BN)),
        (dy, dgx, w, lens, rst, y, dh, T, B, H), dict(SP=SP, BN=p.BN, BK=p.BK, **flags),
    ))
    return dgx, dh.to(dh_n.dtype)
