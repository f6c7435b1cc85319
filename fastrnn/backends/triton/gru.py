"""GRU Triton kernels and their launchers: the ops gru_fwd and gru_bwd of docs/contract.md.

Legend
  T: time steps   B: batch   H: hidden units   gates r, z, n (PyTorch's order)
  s: processing index of a step   t: its time index   BB, BN, BK: batch / unit / reduction block sizes
  KP, SP: padded reduction lengths   HP: H padded to a power of two (persistent kernels)

b_hh enters the kernels (not folded into gx) because b_hn sits inside r * (h W_hn^T + b_hn).
"""

import triton
import triton.language as tl

from . import recurrence as rec
from .recurrence import sigmoid, tanh

# ----------------------------------------------------------------------------------------------------
# The cell (the only GRU math; ACC = fp32, fp64 for fp64)


@triton.jit
def gru_cell_fwd(a_r, a_z, x_n, gh_n, h_prev):
    """a_r, a_z: gx_t + b_hh + h_{t-1} W_hh^T of r and z; x_n: gx_t of n; gh_n: h_{t-1} W_hn^T + b_hn
    -> (r, z, n, h_t)."""
    r = sigmoid(a_r)
    z = sigmoid(a_z)
    n = tanh(x_n + r * gh_n)
    return r, z, n, (1.0 - z) * n + z * h_prev


@triton.jit
def gru_cell_bwd(dh, r, z, n, ghn, h_prev):
    """-> (da_r, da_z, da_n, dh_t z): the gate gradients (dgh_n = da_n r) and the direct part of dh_{t-1}."""
    dan = dh * (1.0 - z) * (1.0 - n * n)
    dar = dan * ghn * r * (1.0 - r)
    daz = dh * (h_prev - n) * z * (1.0 - z)
    return dar, daz, dan, dh * z


# ----------------------------------------------------------------------------------------------------
# Epilogues: the cell on a [BB, N] tile with its loads and stores, shared by step and persistent kernels


@triton.jit
def gru_inits(gx_ptr, b_ptr, rows, offs_n, H, act2, ACC: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The initial accumulators of the tile's h_{t-1} W_hh^T, and gx_t of n: (gx_r + b_hr, gx_z + b_hz,
    b_hn, gx_n) (gx 0 outside act2; no bias: 0). The addends are the GEMM's accumulator init, and a row
    that resets at t gets them as its GEMM result (rec.restart_rows says why). n's gx stays outside:
    it is added to r * (h W_hn^T + b_hn)."""
    x_r = rec.load_gate(gx_ptr, rows, offs_n, 3 * H, 0, H, act2, ACC)
    x_z = rec.load_gate(gx_ptr, rows, offs_n, 3 * H, 1, H, act2, ACC)
    x_n = rec.load_gate(gx_ptr, rows, offs_n, 3 * H, 2, H, act2, ACC)
    b_n = tl.zeros_like(x_n)
    if HAS_BIAS:
        mask_n = offs_n < H
        x_r += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]
        x_z += tl.load(b_ptr + H + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]
        b_n += tl.load(b_ptr + 2 * H + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]
    return x_r, x_z, b_n, x_n


@triton.jit
def gru_fwd_epilogue(a_r, a_z, gh_n, x_n, h_prev, saved_ptr, rows, offs_n, H, inb, act2, SAVE: tl.constexpr):
    """a_r, a_z: gx_t + b_hh + h_{t-1} W_hh^T; gh_n = h_{t-1} W_hn^T + b_hn; x_n = gx_t of n (gru_inits):
    runs the cell, saves (r, z, n, ghn). Returns h_t (meaningful where active)."""
    r, z, n, h = gru_cell_fwd(a_r, a_z, x_n, gh_n, h_prev)
    if SAVE:
        ty = saved_ptr.dtype.element_ty
        sv = saved_ptr + rows[:, None] * (4 * H) + offs_n[None, :]
        tl.store(sv, tl.where(act2, r, 0.0).to(ty), mask=inb)
        tl.store(sv + H, tl.where(act2, z, 0.0).to(ty), mask=inb)
        tl.store(sv + 2 * H, tl.where(act2, n, 0.0).to(ty), mask=inb)
        tl.store(sv + 3 * H, tl.where(act2, gh_n, 0.0).to(ty), mask=inb)
    return h


@triton.jit
def gru_bwd_epilogue(dh, saved_ptr, y_ptr, h0_ptr, len_ptr, dgx_ptr, dgh_ptr, t, T, B, H, offs_b, mask_b, b64, offs_n,
                     inb_t, act2, prev2, REVERSE: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """The cell backward at step t on a [BB, N] tile (dh = total gradient into h_t): writes dgx_t and
    dgh_t (0 where inactive). prev2: where h_{t-1} is read, act2 less the rows that reset at t (which
    started from h_{t-1} = 0). Returns (da_r, da_z, da_n r) (0 where inactive) and dh_t z."""
    ACC = dh.dtype
    rows = rec.rows_at(t, b64, B)
    sv = saved_ptr + rows[:, None] * (4 * H) + offs_n[None, :]
    r = tl.load(sv, mask=act2, other=0.0).to(ACC)
    z = tl.load(sv + H, mask=act2, other=0.0).to(ACC)
    n = tl.load(sv + 2 * H, mask=act2, other=0.0).to(ACC)
    ghn = tl.load(sv + 3 * H, mask=act2, other=0.0).to(ACC)
    # h_{t-1}: y of the step before in forward order where that step was active, else h0 (contract).
    t_before = t + 1 if REVERSE else t - 1
    before = rec.active_rows(len_ptr, offs_b, mask_b, t_before, T, HAS_LENGTHS)[:, None]
    rows_before = rec.rows_at(t_before, b64, B)
    h_prev = tl.load(y_ptr + rows_before[:, None] * H + offs_n[None, :], mask=prev2 & before, other=0.0).to(ACC)
    h_prev += tl.load(h0_ptr + b64[:, None] * H + offs_n[None, :], mask=prev2 & (before == 0), other=0.0).to(ACC)
    dar, daz, dan, direct = gru_cell_bwd(dh, r, z, n, ghn, h_prev)
    dar = tl.where(act2, dar, 0.0)
    daz = tl.where(act2, daz, 0.0)
    dan = tl.where(act2, dan, 0.0)
    ty = dgx_ptr.dtype.element_ty
    off = rows[:, None] * (3 * H) + offs_n[None, :]
    tl.store(dgx_ptr + off, dar.to(ty), mask=inb_t)
    tl.store(dgx_ptr + off + H, daz.to(ty), mask=inb_t)
    tl.store(dgx_ptr + off + 2 * H, dan.to(ty), mask=inb_t)
    tl.store(dgh_ptr + off, dar.to(ty), mask=inb_t)
    tl.store(dgh_ptr + off + H, daz.to(ty), mask=inb_t)
    tl.store(dgh_ptr + off + 2 * H, (dan * r).to(ty), mask=inb_t)
    return dar, daz, dan * r, direct


# ----------------------------------------------------------------------------------------------------
# Step kernels: grid (cdiv(B, BB), cdiv(H, BN)), one launch per step


@triton.jit(do_not_specialize=["s"])
def gru_fwd_step_kernel(gx_ptr, w_ptr, b_ptr, len_ptr, rst_ptr, h_ptr, y_ptr, saved_ptr, T, B, H, s,
                        REVERSE: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr,
                        HAS_BIAS: tl.constexpr, SAVE: tl.constexpr, KP: tl.constexpr, BB: tl.constexpr,
                        BN: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Step s for BB rows x BN units: the three gates' h_{t-1} W_hh^T tiles (plus gru_inits), then the cell.
    h: [2, B, H] ping-pong (rec.ping_pong). A row that resets at t (active) takes h_{t-1} = 0 in the GEMM
    and the cell."""
    offs_b, mask_b, b64 = rec.batch_block(B, BB)
    offs_n, mask_n = rec.unit_block(H, BN)
    t = rec.step_time(s, T, REVERSE)
    act = rec.active_rows(len_ptr, offs_b, mask_b, t, T, HAS_LENGTHS)
    inb = mask_b[:, None] & mask_n[None, :]
    act2 = act[:, None] & inb
    h_src, h_dst = rec.ping_pong(h_ptr, s, B, H)
    w_tile = w_ptr + tl.program_id(1).to(tl.int64) * (KP * 3 * BN)
    rows = rec.rows_at(t, b64, B)
    i_r, i_z, i_n, x_n = gru_inits(gx_ptr, b_ptr, rows, offs_n, H, act2, ACC, HAS_BIAS)
    a_r, a_z, gh_n, _ = rec.gemm_gates_out(h_src, b64 * H, mask_b, H, w_tile, i_r, i_z, i_n, i_n, 3, KP, BN, BK, PREC)
    state = b64[:, None] * H + offs_n[None, :]
    h_prev = tl.load(h_src + state, mask=inb, other=0.0).to(ACC)
    if HAS_RESETS:  # cut rows are active, so the carry of inactive rows below keeps the stored h
        cut = rec.reset_rows(rst_ptr, rows, act)
        a_r, a_z = rec.restart_rows(a_r, i_r, cut), rec.restart_rows(a_z, i_z, cut)
        gh_n = rec.restart_rows(gh_n, i_n, cut)
        h_prev = rec.zero_rows(h_prev, cut)
    h = gru_fwd_epilogue(a_r, a_z, gh_n, x_n, h_prev, saved_ptr, rows, offs_n, H, inb, act2, SAVE)
    rec.carry_store(h, h_prev, act2, inb, h_dst, state, y_ptr, rows[:, None] * H + offs_n[None, :])


@triton.jit(do_not_specialize=["s"])
def gru_bwd_step_kernel(dy_ptr, dgx_ptr, dgh_ptr, w_ptr, len_ptr, rst_ptr, y_ptr, h0_ptr, saved_ptr, dh_ptr, T, B, H,
                        s, REVERSE: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr,
                        SP: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr,
                        PREC: tl.constexpr):
    """Backward step s (t descending in forward order) for BB rows x BN units: dh_t = dy_t + dh_buf +
    dgh_{t+1} W_hh (rec.grad_state_in); launched T+1 times, the last one only finishing dh_0.
    dh: [B, H] in ACC, holding dh_t z between launches (or the carried gradient where inactive).
    No gradient crosses a reset: rows that reset at t+1 get no dgh_{t+1} W_hh, and rows that
    reset at t store dh_buf = 0 (and read h_{t-1} = 0)."""
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
    prev2 = act2
    if HAS_RESETS:
        cut = rec.reset_rows(rst_ptr, rows, act)
        prev2 = act2 & ~cut[:, None]
    w_tile = w_ptr + tl.program_id(1).to(tl.int64) * (3 * SP * BN)
    rows_done = rec.rows_at(t_done, b64, B)
    dh_in, dh = rec.grad_state_in(dgh_ptr, rows_done * (3 * H), done, H, 3, SP, w_tile, dh_ptr, state, inb, dy_ptr,
                                  rows[:, None] * H + offs_n[None, :], act2, rst_ptr, rows_done, BN, BK, ACC, PREC,
                                  HAS_RESETS)
    _, _, _, direct = gru_bwd_epilogue(dh, saved_ptr, y_ptr, h0_ptr, len_ptr, dgx_ptr, dgh_ptr, t, T, B, H, offs_b,
                                       mask_b, b64, offs_n, inb_t, act2, prev2, REVERSE, HAS_LENGTHS)
    dh_buf = tl.where(act2, direct, dh_in)
    if HAS_RESETS:
        dh_buf = rec.zero_rows(dh_buf, cut)
    tl.store(dh_ptr + state, dh_buf, mask=inb)


# ----------------------------------------------------------------------------------------------------
# Persistent kernels: grid (cdiv(B, BB),), one launch for all T steps, weights on chip, state in registers


@triton.jit
def gru_fwd_persistent_kernel(gx_ptr, w_ptr, b_ptr, len_ptr, rst_ptr, h0_ptr, y_ptr, hn_ptr, saved_ptr, T, B, H,
                              REVERSE: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr,
                              HAS_BIAS: tl.constexpr, SAVE: tl.constexpr, HP: tl.constexpr, BB: tl.constexpr,
                              ACC: tl.constexpr, PREC: tl.constexpr):
    """All T steps for BB rows and every unit. w: packed W_hh [HP, 3, HP]."""
    offs_b, mask_b, b64 = rec.batch_block(B, BB)
    offs_n = tl.arange(0, HP)
    inb = mask_b[:, None] & (offs_n < H)[None, :]
    w_r = rec.load_resident(w_ptr, 0, 3, HP, HP)
    w_z = rec.load_resident(w_ptr, 1, 3, HP, HP)
    w_n = rec.load_resident(w_ptr, 2, 3, HP, HP)
    state = b64[:, None] * H + offs_n[None, :]
    h = tl.load(h0_ptr + state, mask=inb, other=0.0)  # [BB, HP], storage dtype
    if HAS_RESETS:  # step 0's mask; each step loads the next one's (rec.resets_of_step)
        rst_next = rec.resets_of_step(rst_ptr, 0, T, offs_b, b64, B, mask_b, REVERSE)
    for s in range(0, T):
        t = rec.step_time(s, T, REVERSE)
        act = rec.active_rows(len_ptr, offs_b, mask_b, t, T, HAS_LENGTHS)
        act2 = act[:, None] & inb
        rows = rec.rows_at(t, b64, B)
        i_r, i_z, i_n, x_n = gru_inits(gx_ptr, b_ptr, rows, offs_n, H, act2, ACC, HAS_BIAS)
        a_r, a_z, gh_n = rec.mma(h, w_r, i_r, PREC), rec.mma(h, w_z, i_z, PREC), rec.mma(h, w_n, i_n, PREC)
        h_prev = h.to(ACC)
        if HAS_RESETS:  # rows that reset at t start from h_{t-1} = 0 (active rows: h_t replaces h below)
            cut, rst_next = act & rst_next, rec.resets_of_step(rst_ptr, s + 1, T, offs_b, b64, B, mask_b, REVERSE)
            a_r, a_z = rec.restart_rows(a_r, i_r, cut), rec.restart_rows(a_z, i_z, cut)
            gh_n = rec.restart_rows(gh_n, i_n, cut)
            h_prev = rec.zero_rows(h_prev, cut)
        h_t = gru_fwd_epilogue(a_r, a_z, gh_n, x_n, h_prev, saved_ptr, rows, offs_n, H, inb, act2, SAVE)
        tl.store(y_ptr + rows[:, None] * H + offs_n[None, :], tl.where(act2, h_t, 0.0).to(h.dtype), mask=inb)
        h = tl.where(act2, h_t.to(h.dtype), h)
    tl.store(hn_ptr + state, h, mask=inb)


@triton.jit
def gru_bwd_persistent_kernel(dy_ptr, dhn_ptr, w_ptr, len_ptr, rst_ptr, y_ptr, h0_ptr, saved_ptr, dgx_ptr, dgh_ptr,
                              dh0_ptr, T, B, H, REVERSE: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                              HAS_RESETS: tl.constexpr, HP: tl.constexpr, BB: tl.constexpr, ACC: tl.constexpr,
                              PREC: tl.constexpr):
    """All T steps of backward for BB rows and every unit. w: packed W_hh [3*HP, HP]."""
    offs_b, mask_b, b64 = rec.batch_block(B, BB)
    offs_n = tl.arange(0, HP)
    inb = mask_b[:, None] & (offs_n < H)[None, :]
    w_r = rec.load_resident_in(w_ptr, 0, HP, HP)
    w_z = rec.load_resident_in(w_ptr, 1, HP, HP)
    w_n = rec.load_resident_in(w_ptr, 2, HP, HP)
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
        prev2 = act2
        if HAS_RESETS:
            cut, rst_next = act & rst_next, rec.resets_of_step(rst_ptr, s + 1, T, offs_b, b64, B, mask_b, not REVERSE)
            prev2 = act2 & ~cut[:, None]
        dh_t = dh + tl.load(dy_ptr + rows[:, None] * H + offs_n[None, :], mask=act2, other=0.0).to(ACC)
        dar, daz, danr, direct = gru_bwd_epilogue(dh_t, saved_ptr, y_ptr, h0_ptr, len_ptr, dgx_ptr, dgh_ptr, t, T, B, H,
                                                  offs_b, mask_b, b64, offs_n, inb, act2, prev2, REVERSE, HAS_LENGTHS)
        # The recurrent GEMM takes dgh_t rounded to the storage dtype, as the step kernels read it back.
        d = rec.mma(dar.to(ty), w_r, direct, PREC)
        d = rec.mma(daz.to(ty), w_z, d, PREC)
        d = rec.mma(danr.to(ty), w_n, d, PREC)
        dh = tl.where(act2, d, dh)
        if HAS_RESETS:  # no gradient crosses back over a reset at t
            dh = rec.zero_rows(dh, cut)
    tl.store(dh0_ptr + state, dh.to(ty), mask=inb)


# ----------------------------------------------------------------------------------------------------
# Launchers (the ops)


@rec.guarded
def gru_fwd(gx, w_hh, b_hh, h0, lengths, resets, reverse, save, b_gx=None):
    op = "gru_fwd"
    T, B, H = rec.check_sizes(op, "gx", gx, 3)
    specs = {"w_hh": (w_hh, (3 * H, H)), "b_hh": (b_hh, (3 * H,)), "h0": (h0, (B, H)), "b_gx": (b_gx, (3 * H,))}
    rec.check_inputs(op, gx, specs, lengths, resets, T, B)
    gx = rec.with_input_bias(gx, b_gx)
    gx, w_hh, b_hh, h0, lengths = rec.contiguous(gx, w_hh, b_hh, h0, lengths)
    y = gx.new_empty(T, B, H)
    saved = gx.new_empty(T, B, 4 * H) if save else gx.new_empty(0)
    if B == 0 or T == 0 or H == 0:  # nothing to compute: no empty grid is launched
        return y, h0.clone(), saved
    p = rec.plan(B, H, H, 3, False, gx.dtype)
    lens, has_lengths = rec.lengths_arg(lengths, gx)
    rst, has_resets = rec.resets_arg(resets, gx)
    flags = p.meta(REVERSE=reverse, HAS_LENGTHS=has_lengths, HAS_RESETS=has_resets, HAS_BIAS=b_hh is not None,
                   SAVE=save)
    bias = b_hh if b_hh is not None else gx
    saved_arg = saved if save else gx
    if p.persistent:
        w = rec.pack_gates_out(w_hh, 3, H, H, p.HP, p.HP)
        h_n = h0.new_empty(B, H)
        launch = rec.Launch(gru_fwd_persistent_kernel, (triton.cdiv(B, p.BB),),
                            (gx, w, bias, lens, rst, h0, y, h_n, saved_arg, T, B, H), dict(HP=p.HP, **flags))
        if launch.fits(op, gx.device):
            launch()
            return y, h_n, saved
        p = rec.plan(B, H, H, 3, False, gx.dtype, persistent=False)
        flags = p.meta(REVERSE=reverse, HAS_LENGTHS=has_lengths, HAS_RESETS=has_resets, HAS_BIAS=b_hh is not None,
                       SAVE=save)
    KP = rec.round_up(H, p.BK)
    w = rec.pack_gates_out(w_hh, 3, H, H, p.BN, KP)
    h = gx.new_empty(2, B, H)
    h[0] = h0
    rec.run_steps(T, rec.Launch(
        gru_fwd_step_kernel, (triton.cdiv(B, p.BB), triton.cdiv(H, p.BN)),
        (gx, w, bias, lens, rst, h, y, saved_arg, T, B, H), dict(KP=KP, BN=p.BN, BK=p.BK, **flags),
    ))
    return y, h[T % 2].clone(), saved


@rec.guarded
def gru_bwd(dy, dh_n, w_hh, y, h0, saved, lengths, resets, reverse):
    op = "gru_bwd"
    T, B, H = rec.check_sizes(op, "y", y, 1)
    specs = {"dy": (dy, (T, B, H)), "dh_n": (dh_n, (B, H)), "w_hh": (w_hh, (3 * H, H)), "h0": (h0, (B, H)),
             "saved": (saved, (T, B, 4 * H))}
    rec.check_inputs(op, y, specs, lengths, resets, T, B)
    dy, dh_n, w_hh, y, h0, saved, lengths = rec.contiguous(dy, dh_n, w_hh, y, h0, saved, lengths)
    dgx = dy.new_empty(T, B, 3 * H)
    dgh = dy.new_empty(T, B, 3 * H)
    if B == 0 or T == 0 or H == 0:  # nothing to compute: no empty grid is launched
        return dgx, dgh, dh_n.clone()
    p = rec.plan(B, H, H, 3, False, dy.dtype)
    lens, has_lengths = rec.lengths_arg(lengths, dy)
    rst, has_resets = rec.resets_arg(resets, dy)
    flags = p.meta(REVERSE=reverse, HAS_LENGTHS=has_lengths, HAS_RESETS=has_resets)
    if p.persistent:
        w = rec.pack_gates_in(w_hh, 3, H, H, p.HP, p.HP)
        dh0 = dh_n.new_empty(B, H)
        launch = rec.Launch(gru_bwd_persistent_kernel, (triton.cdiv(B, p.BB),),
                            (dy, dh_n, w, lens, rst, y, h0, saved, dgx, dgh, dh0, T, B, H), dict(HP=p.HP, **flags))
        if launch.fits(op, dy.device):
            launch()
            return dgx, dgh, dh0
        p = rec.plan(B, H, H, 3, False, dy.dtype, persistent=False)
        flags = p.meta(REVERSE=reverse, HAS_LENGTHS=has_lengths, HAS_RESETS=has_resets)
    SP = rec.round_up(H, p.BK)
    w = rec.pack_gates_in(w_hh, 3, H, H, SP, p.BN)
    dh = dh_n.to(rec.workspace_dtype(dy.dtype), copy=True)
    rec.run_steps(T + 1, rec.Launch(
        gru_bwd_step_kernel, (triton.cdiv(B, p.BB), triton.cdiv(H, p.BN)),
        (dy, dgx, dgh, w, lens, rst, y, h0, saved, dh, T, B, H), dict(SP=SP, BN=p.BN, BK=p.BK, **flags),
    ))
    return dgx, dgh, dh.to(dh_n.dtype)
