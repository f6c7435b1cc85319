"""The recurrence skeleton shared by the LSTM, GRU and RNN Triton kernels (docs/triton.md).

Legend
  T: time steps   B: batch   H: hidden units   Hout: proj_size or H   G: gates (LSTM 4, GRU 3, RNN 1)
  s: processing index of a step (0..T-1, the order the recurrence walks)   t: its time index
  BB, BN, BK: block sizes over the batch, the output units (N) and the reduction (K) of a GEMM tile
  KP, SP: K and a K segment padded to a multiple of BK (step kernels) or to a power of two (persistent)

Device side: time/activity helpers, the two GEMM shapes of the recurrence (streamed from packed weights
by the step kernels, or on weights held on chip by the persistent kernels), the overflow-free
activations, and the state-carry store. Host side: validation, the plan (step or persistent, block
sizes), weight packing and the loop that launches a step kernel once per step.

Every kernel here is the code a GPU compiles; under triton's interpreter the same source is interpreted.
"""

import contextlib
import functools
import re
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def sigmoid(x):
    # exp(-x) overflows to inf for x < -88 (fp32) and 1/(1+inf) = 0: no NaN, no branch.
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    # 2 sigmoid(2x) - 1: exp(-2x) may overflow to inf (x < -44 in fp32), which gives exactly -1, never
    # inf/inf. The absolute error is about one ulp of 1 near x = 0 (6e-8 in fp32, 1e-16 in fp64).
    # libdevice's tanh has no interpreter implementation, so kernels tested on the CPU cannot use it; the
    # form (1 - e)/(1 + e) with e = exp(-2|x|) crashed LLVM's SLP vectorizer on sm_90 in the fp32 LSTM
    # persistent kernel (triton 3.9, compile_check), this one compiles on sm_80 and sm_90.
    return 2.0 * sigmoid(2.0 * x) - 1.0


@triton.jit
def batch_block(B, BB: tl.constexpr):
    """This program's batch rows (grid axis 0): offsets [BB], in-range mask, int64 offsets."""
    offs_b = tl.program_id(0) * BB + tl.arange(0, BB)
    return offs_b, offs_b < B, offs_b.to(tl.int64)


@triton.jit
def unit_block(N, BN: tl.constexpr):
    """This program's output units (grid axis 1): offsets [BN] and in-range mask."""
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    return offs_n, offs_n < N


@triton.jit
def step_time(s, T, DESCENDING: tl.constexpr):
    """The time index of processing step s: forward walks t = s, a descending walk t = T-1-s."""
    t = s
    if DESCENDING:
        t = T - 1 - s
    return t


@triton.jit
def in_time(t, T, offs_b):
    """[BB] bool: 0 <= t < T, as a vector (triton 3.9's interpreter turns `vector_bool & (scalar >= 0)`
    into int32, which tl.load then rejects as a mask; vector comparisons compile the same on a GPU)."""
    tb = tl.zeros_like(offs_b) + t
    return (tb >= 0) & (tb < T)


@triton.jit
def active_rows(len_ptr, offs_b, mask_b, t, T, HAS_LENGTHS: tl.constexpr):
    """[BB] bool: rows b < B whose sequence is active at time t (0 <= t < T and t < lengths[b]).

    t outside [0, T) (the virtual step after the last one in backward) gives no active row, so every
    load and store masked by the result stays in bounds. Lengths outside [0, T] are never read on the
    host (no synchronisation); they only enter this comparison, so they cannot cause an out-of-bounds
    access (a length > T acts as T, a negative one as 0)."""
    ok = mask_b & in_time(t, T, offs_b)
    if HAS_LENGTHS:
        n = tl.load(len_ptr + offs_b, mask=mask_b, other=0)
        ok = ok & (t < n)
    return ok


@triton.jit
def reset_rows(rst_ptr, rows, ok):
    """[BB] bool: the rows of `ok` whose sequence resets at step t, i.e. enters t from a zero state
    (resets[t, b]; rows = t*B + b, int64, from rows_at). The load is masked by `ok`, so a t outside
    [0, T) reads nothing. Called only under `if HAS_RESETS:`, so that resets=None compiles the kernel
    without the mask (no load, no register).

    The result must not reach an operand of tl.dot (a load mask or a select on it): the kernels zero
    the GEMM's *result* rows instead. With the mask's 8-bit load in an operand's def chain, triton 3.6
    picks an fp64 MMA layout it cannot lower ("Currently fp64 don't support largeK MMA", every fp64
    kernel on sm_90 in compile_check); triton 3.9 compiles both forms."""
    return ok & (tl.load(rst_ptr + rows, mask=ok, other=0) != 0)


@triton.jit
def resets_of_step(rst_ptr, s, T, offs_b, b64, B, mask_b, DESCENDING: tl.constexpr):
    """[BB] bool: resets[t, b] of processing step s (t = step_time(s)), False for t outside [0, T).

    A persistent kernel loads step s+1's mask during step s and carries it into the next iteration (and
    takes `cut = act & mask` there): a loop-carried value is outside the def chain of the step's tl.dot
    operands, which triton 3.6 needs in fp64 (reset_rows says why). Inside the loop the cut reaches the
    operands: LSTM backward's c_{t-1} feeds da_f, the projection's m_t depends on c_{t-1}."""
    t = step_time(s, T, DESCENDING)
    ok = mask_b & in_time(t, T, offs_b)
    return tl.load(rst_ptr + rows_at(t, b64, B), mask=ok, other=0) != 0


@triton.jit
def restart_rows(pre, init, cut):
    """pre = init + h_{t-1} @ W [BB, N] (a GEMM whose accumulator started at init) with the rows in `cut`
    ([BB] bool) set back to init: the value with h_{t-1} = 0 (0 @ W + init). The addend is the GEMM's
    accumulator init, and the reset a select on its result, in both paths: triton's combine pass folds
    add(dot(a, b, 0), d) into dot(a, b, d) (the addend enters the MMA/FMA accumulator, other rounding),
    which a zero_rows between dot and add blocked, so resets=None and an all-false mask rounded
    differently (found on an H200, triton 3.6, 2026-12-04)."""
    return tl.where(cut[:, None], init, pre)


@triton.jit
def load_gate(ptr, rows, offs_n, GH, gate, H, mask, ACC: tl.constexpr):
    """[BB, N] in ACC: gate `gate` of a [T, B, GH] tensor at rows (t*B + b), units offs_n; 0 outside mask."""
    return tl.load(ptr + rows[:, None] * GH + gate * H + offs_n[None, :], mask=mask, other=0.0).to(ACC)


@triton.jit
def zero_rows(x, cut):
    """x [BB, N] with the rows in `cut` ([BB] bool) set to 0: the state a reset step starts from, or the
    gradient that does not cross back over a reset."""
    return tl.where(cut[:, None], tl.zeros_like(x), x)


@triton.jit
def rows_at(t, b64, B):
    """int64 [BB]: the row index t*B + b of a [T, B, ...] tensor (T*B*G*H passes 2^31 at e.g.
    T=1024, B=256, H=2048, so offsets are int64)."""
    return t.to(tl.int64) * B + b64


@triton.jit
def mma(a, w, acc, PREC: tl.constexpr):
    """acc + a @ w with fp32 (fp64 for fp64) accumulation.

    bf16 operands are widened to fp32 and multiplied as tf32, which holds a bf16 value exactly (10 vs 7
    mantissa bits), so the products and sums are those of a bf16 MMA with fp32 accumulation. The reason
    is the interpreter: triton 3.9's interpreter keeps bf16 as uint16 and matmuls the raw bits (error
    1e11 on a 16x16 product), and the kernels must be the ones a GPU runs. The cost on a GPU is the tf32
    MMA rate (half of bf16 on H100), which the recurrence does not reach (see docs/triton.md)."""
    if a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="tf32", out_dtype=acc.dtype)
    return tl.dot(a, w, acc, input_precision=PREC, out_dtype=acc.dtype)


@triton.jit
def gemm_gates_out(a_ptr, a_rows, a_ok, K, w_ptr, acc0, acc1, acc2, acc3, G: tl.constexpr, KP: tl.constexpr,
                   BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """The forward tile: acc_k + A[rows, :K] @ W_k^T for the G gates of BN units, one accumulator per gate.

    a_rows: int64 [BB] element offsets of the rows of A; a_ok: [BB] which rows to read (others are 0).
    acc0..acc3: [BB, BN] ACC initial accumulators (gx_t for the gates, or zeros; those of gates >= G are
    returned as given). w_ptr: this tile of the packed weights [KP, G, BN] (pack_gates_out): each K row
    holds all G gates of the tile's units side by side, so one program streams one contiguous block. The
    K loop is shared by the G accumulators: A is loaded once per BK and used by every gate."""
    offs_n = tl.arange(0, BN)
    for k0 in range(0, KP, BK):
        offs_k = k0 + tl.arange(0, BK)
        a = tl.load(a_ptr + a_rows[:, None] + offs_k[None, :], mask=a_ok[:, None] & (offs_k < K)[None, :], other=0.0)
        w = w_ptr + offs_k[:, None] * (G * BN) + offs_n[None, :]
        acc0 = mma(a, tl.load(w), acc0, PREC)
        if G > 1:
            acc1 = mma(a, tl.load(w + BN), acc1, PREC)
        if G > 2:
            acc2 = mma(a, tl.load(w + 2 * BN), acc2, PREC)
        if G > 3:
            acc3 = mma(a, tl.load(w + 3 * BN), acc3, PREC)
    return acc0, acc1, acc2, acc3


@triton.jit
def gemm_gates_in(a_ptr, a_rows, a_ok, S, NSEG: tl.constexpr, SP: tl.constexpr, w_ptr, acc, BN: tl.constexpr,
                  BK: tl.constexpr, PREC: tl.constexpr):
    """The backward tile: acc + A[rows, :NSEG*S] @ W for BN output units, A being NSEG gate segments of S.

    acc: [BB, BN] ACC initial accumulator. w_ptr: this tile of the packed weights [NSEG*SP, BN]
    (pack_gates_in), zero past S in each segment."""
    offs_n = tl.arange(0, BN)
    for seg in tl.static_range(NSEG):
        for k0 in range(0, SP, BK):
            offs_k = k0 + tl.arange(0, BK)
            a = tl.load(a_ptr + a_rows[:, None] + seg * S + offs_k[None, :],
                        mask=a_ok[:, None] & (offs_k < S)[None, :], other=0.0)
            w = tl.load(w_ptr + (seg * SP + offs_k)[:, None] * BN + offs_n[None, :])
            acc = mma(a, w, acc, PREC)
    return acc


@triton.jit
def load_resident(w_ptr, gate, G: tl.constexpr, KP: tl.constexpr, NP: tl.constexpr):
    """[KP, NP]: gate `gate` of packed weights [KP, G, NP] (pack_gates_out with one tile), for a
    persistent kernel to hold across all T steps."""
    offs_k = tl.arange(0, KP)
    offs_n = tl.arange(0, NP)
    return tl.load(w_ptr + offs_k[:, None] * (G * NP) + gate * NP + offs_n[None, :])


@triton.jit
def load_resident_in(w_ptr, seg, SP: tl.constexpr, NP: tl.constexpr):
    """[SP, NP]: segment `seg` of packed weights [NSEG*SP, NP] (pack_gates_in with one tile)."""
    offs_k = tl.arange(0, SP)
    offs_n = tl.arange(0, NP)
    return tl.load(w_ptr + (seg * SP + offs_k)[:, None] * NP + offs_n[None, :])


@triton.jit
def ping_pong(h_ptr, s, B, N):
    """(h_{t-1}, h_t) slots of the state buffer [2, B, N] at step s: a step kernel reads every unit of
    h_{t-1} while other programs of the same launch write their units of h_t, so they cannot share one."""
    par = (s % 2).to(tl.int64)
    return h_ptr + par * B * N, h_ptr + (1 - par) * B * N


@triton.jit
def carry_store(h_new, h_prev, act2, inb, h_dst, state_off, y_ptr, y_off):
    """The step's state and output: h_t where active, the carried h_{t-1} elsewhere; y_t = 0 elsewhere."""
    tl.store(h_dst + state_off, tl.where(act2, h_new, h_prev).to(h_dst.dtype.element_ty), mask=inb)
    tl.store(y_ptr + y_off, tl.where(act2, h_new, 0.0).to(y_ptr.dtype.element_ty), mask=inb)


@triton.jit
def grad_state_in(a_ptr, a_rows, a_ok, S, NSEG: tl.constexpr, SP: tl.constexpr, w_ptr, dh_ptr, state_off,
                  inb, dy_ptr, dy_off, act2, rst_ptr, rows_done, BN: tl.constexpr, BK: tl.constexpr,
                  ACC: tl.constexpr, PREC: tl.constexpr, HAS_RESETS: tl.constexpr):
    """The gradient reaching h_t for a tile of units, in a backward step kernel.

    The GEMM of step t+1 (dh_t += dGh_{t+1} W_hh) needs every unit of dGh_{t+1}, which the previous
    launch wrote, so it is done here, one launch later: dh_in = dh_buf + dGh_{t+1} W_hh, where dh_buf
    holds the part that does not go through W_hh (0 for LSTM/RNN, dh z for GRU, the whole gradient at
    an inactive step) and dGh is 0 at inactive steps. Returns (dh_in, dh_in + dy_t where active).
    With resets, no gradient crosses a reset: the GEMM rows of sequences that reset at step t+1
    (rows_done = its t*B + b) are dh_buf alone. dh_buf is the GEMM's accumulator init, the reset a select
    on its result (restart_rows says why)."""
    init = tl.load(dh_ptr + state_off, mask=inb, other=0.0).to(ACC)
    dh_in = gemm_gates_in(a_ptr, a_rows, a_ok, S, NSEG, SP, w_ptr, init, BN, BK, PREC)
    if HAS_RESETS:
        dh_in = restart_rows(dh_in, init, reset_rows(rst_ptr, rows_done, a_ok))
    dy = tl.load(dy_ptr + dy_off, mask=act2, other=0.0).to(ACC)
    return dh_in, dh_in + dy


# ----------------------------------------------------------------------------------------------------
# Host side

# Limits and sizes set from compile-time resource reports (compile_check: registers and spills for sm_80
# and sm_90), not from timings; no GPU has run these kernels yet (docs/triton.md).
# The persistent kernels hold all of W_hh (and W_hr) on chip for the T steps (in shared memory: the
# compiler hoists its allocation out of the loop). At 128 KiB (fp16 LSTM, H=128) they spilled 328-344 B
# of registers on sm_80/sm_90; at 64 KiB they do not. An fp32 GEMM without TF32 is not an MMA: tl.dot
# unrolls it into FMAs over the whole K, which spilled 80-5088 B at 64 KiB and not at 16 KiB.
# fp64 LSTM with a projection holds two weight tiles and two state widths in fp64 MMA fragments: at
# 20-40 KiB (HP=32) triton 3.6 spilled 248-640 B on sm_90 (16 warps: 1.6-2.2 KB), at 10 KiB (HP=16) at
# most 8 B, so it gets the small budget too.
PERSISTENT_MAX_BYTES = 64 * 1024
PERSISTENT_MAX_BYTES_SMALL = 16 * 1024
PERSISTENT_WARPS = 8  # 4 warps spilled 48-648 B in the fp16 persistent kernels; 8 leave at most 8 B
# Step kernels: BB=64 with 4 warps spilled 296-440 B (LSTM fp16, sm_90); BB <= 32 does not. fp32 and
# fp64 use 16 rows: an fp32 GEMM without TF32 runs on FMAs and fp64 MMAs at that same rate (67 TFLOP/s
# on H100 vs 989 for fp16), so they want more programs (docs/triton.md, cost model).
STEP_BB_MAX = 32
STEP_BB_MAX_FMA = 16
STEP_WARPS = 4

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_forced = None


@contextlib.contextmanager
def force_kernel(kind):
    """Run every op in this block with the 'step' or 'persistent' kernels (tests and benchmarks)."""
    global _forced
    if kind not in ("step", "persistent"):
        raise ValueError(f"fastrnn triton: kernel kind must be 'step' or 'persistent', not {kind!r}")
    before, _forced = _forced, kind
    try:
        yield
    finally:
        _forced = before


def interpreting():
    """Whether triton runs kernels in its CPU interpreter (triton.knobs.runtime.interpret; a triton without
    knobs is treated as not interpreting, so the backend is then offered on CUDA only)."""
    knobs = getattr(triton, "knobs", None)
    runtime = getattr(knobs, "runtime", None)
    return bool(getattr(runtime, "interpret", False))


def _version(text):
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


# The oldest triton whose interpreter was seen to run these kernels with numpy >= 2.4. triton 3.6's
# interpreter calls int() on one-element arrays, which numpy 2.4 made a TypeError ("only 0-dimensional
# arrays can be converted to Python scalars"): 34 of the 77 interpreter tests of tests/test_triton.py
# failed with triton 3.6.0 and numpy 2.4.6; triton 3.9.0 passes them. 3.7 and 3.8 were not tried, so
# they count as incompatible.
INTERPRETER_MIN_TRITON_WITH_NUMPY_2_4 = (3, 9)


def interpreter_problem():
    """Why triton's interpreter cannot run these kernels with the installed numpy, or None. The compiled
    (GPU) path does not use numpy this way and is unaffected; requirements.txt pins triton>=3.9."""
    if not interpreting():
        return None
    import numpy

    if _version(numpy.__version__) >= (2, 4) and _version(triton.__version__) < INTERPRETER_MIN_TRITON_WITH_NUMPY_2_4:
        return (f"triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} (it converts "
                "one-element arrays with int(), an error since numpy 2.4); install triton>=3.9 or numpy<2.4")
    return None


def devices():
    types = []
    if torch.cuda.is_available():
        types.append("cuda")
    if interpreting() and interpreter_problem() is None:
        types.append("cpu")
    return tuple(types)


def on_device(device):
    """The device guard of every launch: triton launches on torch's current CUDA device and its current
    stream, so a tensor on cuda:1 while cuda:0 is current would run on the wrong device without it."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def guarded(launcher):
    """Runs an op's launcher (its first argument a tensor) with that tensor's device current."""

    @functools.wraps(launcher)
    def run(*args, **kwargs):
        with on_device(args[0].device):
            return launcher(*args, **kwargs)

    return run


# Read once per device (a CUDA-graph capture then finds it cached; the read itself does not synchronise);
# functools.lru_cache is thread-safe.
def shared_memory_limit(device):
    """The most shared memory one block may have on a CUDA device (232,448 B on an H100/H200), the limit
    triton itself checks when it loads a kernel."""
    return _shared_memory_limit(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _shared_memory_limit(index):
    from triton.runtime import driver

    return driver.active.utils.get_device_properties(index)["max_shared_mem"]


def compiled_shared_memory(kernel, grid, args, meta):
    """Bytes of shared memory of the binary `kernel[grid](*args, **meta)` runs (triton compiles it, or
    finds it in its cache, with the very specialisation of that launch: int64 vs int32 arguments,
    divisibility-by-16 hints, constexprs); None under the interpreter, which has no such limit."""
    if interpreting():
        return None
    return kernel.warmup(*args, grid=grid, **meta).metadata.shared


class PersistentDoesNotFit(RuntimeError):
    """force_kernel('persistent') on sizes whose compiled persistent kernel exceeds the device's shared
    memory per block (Launch.fits)."""


def pow2(n):
    """The power of two >= max(n, 16) (tl.dot needs every tile dimension >= 16)."""
    return max(16, triton.next_power_of_2(n))


def round_up(n, m):
    return (n + m - 1) // m * m


@dataclass(frozen=True)
class Plan:
    persistent: bool
    BB: int  # batch rows per program
    BN: int  # output units per program (step kernels)
    BK: int  # K per GEMM iteration (step kernels)
    HP: int  # H padded to a power of two (persistent kernels)
    OP: int  # Hout padded to a power of two >= HP/2 (persistent kernels)
    acc: object  # tl.float32, or tl.float64 for fp64
    prec: str  # tl.dot input precision for fp32 operands
    warps: int

    def meta(self, **kw):
        """The launch keywords every kernel takes from the plan, plus `kw`."""
        return dict(BB=self.BB, ACC=self.acc, PREC=self.prec, num_warps=self.warps, **kw)


def plan(B, H, Hout, G, proj, dtype, persistent=None):
    """Step kernels or the persistent kernel, and the block sizes, from the shapes. `persistent`, when
    given, decides the path (the launchers' fall-back to the step kernels when the compiled persistent
    kernel does not fit the device, see Launch.fits); else force_kernel, else the weights' size."""
    # Hout pads to at least HP/2: with proj_size <= 16 (OP = 16) at HP = 64 the persistent LSTM kernels
    # spilled 40-1040 B (fp16/bf16, sm_90, triton 3.9, the launch's specialisation), at HP = 256 (which the
    # weight budget then allowed) 7-8 KB; with OP = HP/2 the same sizes spill nothing (compile_check). The
    # padded columns are zero weights and masked stores; the budget below counts them.
    HP, OP = pow2(H), max(pow2(Hout), pow2(H) // 2)
    # TF32 only behind torch's own switch (torch.set_float32_matmul_precision('high'|'medium')).
    tf32 = dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
    slow_math = dtype == torch.float64 or (dtype == torch.float32 and not tf32)
    # bf16 weights are widened to fp32 for the MMA (see mma), so they take 4 bytes on chip.
    elsize = 4 if dtype == torch.bfloat16 else dtype.itemsize
    resident = (G * HP * OP + (HP * OP if proj else 0)) * elsize
    if persistent is not None:
        pass
    elif _forced:
        persistent = _forced == "persistent"
    else:
        fma = dtype == torch.float32 and not tf32
        persistent = resident <= (PERSISTENT_MAX_BYTES_SMALL if fma or (proj and dtype == torch.float64)
                                  else PERSISTENT_MAX_BYTES)
    # tl.dot needs M >= 16.
    BB = 16 if persistent else min(STEP_BB_MAX_FMA if slow_math else STEP_BB_MAX, pow2(B))
    # 32 units x G gates per tile: at H=512 that is 16 tiles per batch block; BK=32 keeps the streamed
    # weight tiles at G x 32 x 32.
    BN, BK = 32, 32
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    warps = PERSISTENT_WARPS if persistent else STEP_WARPS
    return Plan(persistent, BB, BN, BK, HP, OP, acc, "tf32" if tf32 else "ieee", warps)


def workspace_dtype(dtype):
    """The dtype states are carried in between steps (c, and dh/dc in backward): fp32, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def pack_gates_out(w, G, N, K, BN, KP):
    """w [G*N, K] (gate-major rows, PyTorch's layout) -> [cdiv(N, BN), KP, G, BN], zero-padded.

    Tile n holds, for each k < KP, the G gates of units n*BN .. n*BN+BN-1 side by side: the weights one
    step-kernel program needs are one contiguous block, and a K row of it feeds all G accumulators."""
    NP = round_up(N, BN)
    wp = w.new_zeros(G, NP, KP)
    wp[:, :N, :K] = w.reshape(G, N, K)
    return wp.view(G, NP // BN, BN, KP).permute(1, 3, 0, 2).contiguous()


def pack_gates_in(w, G, S, N, SP, BN):
    """w [G*S, N] (gate-major rows) -> [cdiv(N, BN), G*SP, BN], zero-padded: the operand of
    A[B, G*S] @ w, each tile holding BN output columns with every gate segment padded to SP rows."""
    NP = round_up(N, BN)
    wp = w.new_zeros(G, SP, NP)
    wp[:, :S, :N] = w.reshape(G, S, N)
    return wp.view(G * SP, NP // BN, BN).permute(1, 0, 2).contiguous()


class Launch:
    """One kernel with its grid and arguments. A step kernel is called with s, the processing step: s is
    a do_not_specialize argument of every step kernel, so one compiled kernel serves every step (triton
    would otherwise specialise s == 1 and s % 16 == 0 and compile three variants). A persistent kernel is
    called with nothing."""

    def __init__(self, kernel, grid, args, meta):
        self.kernel, self.grid, self.args, self.meta = kernel, grid, args, meta

    def __call__(self, *s):
        self.kernel[self.grid](*self.args, *s, **self.meta)

    def fits(self, op, device):
        """Whether this persistent launch fits the device's shared memory, judged on the binary triton
        compiles for it (the plan's byte budget counts only the weights; the compiled kernel adds its
        staging buffers: the fp64 LSTM backward at H=37, 128 KiB of weights, needs 237,824 B on sm_90, over
        the 232,448 B an H100/H200 block may have). Not fitting under force_kernel('persistent') is an
        error; under the plan it sends the op to the step kernels."""
        need = compiled_shared_memory(self.kernel, self.grid, self.args, self.meta)
        if need is None:
            return True
        limit = shared_memory_limit(device)
        if need <= limit:
            return True
        if _forced == "persistent":
            raise PersistentDoesNotFit(
                f"fastrnn_triton::{op}: force_kernel('persistent'), but {self.kernel.__name__} needs {need} B of "
                f"shared memory here (HP={self.meta.get('HP')}, OP={self.meta.get('OP')}) and {device} allows "
                f"{limit} B per block; use smaller sizes or the step kernels")
        return False


def run_steps(steps, *launches):
    """The host loop of the step path: for s = 0..steps-1, each launch in order. Nothing here reads
    device memory (lengths stay on the device), so there is no host synchronisation."""
    for s in range(steps):
        for launch in launches:
            launch(s)


# ----------------------------------------------------------------------------------------------------
# Validation: the contract's shapes, one dtype, one device; a clear error instead of a kernel fault.


def check_common(op, ref, tensors, lengths, resets=None):
    """All of `tensors` (name -> tensor or None) in ref's dtype and on ref's device; lengths int64 and
    resets bool on ref's device."""
    if ref.dtype not in _DTYPES:
        raise TypeError(f"fastrnn_triton::{op}: dtype {ref.dtype} is not supported (fp16, bf16, fp32, fp64)")
    if ref.device.type not in devices():
        why = (interpreter_problem() if ref.device.type == "cpu" else None) or (
            "CPU tensors need triton's interpreter, enabled before triton is first imported")
        raise RuntimeError(
            f"fastrnn_triton::{op}: cannot run on {ref.device.type} tensors here (runs on {list(devices())}; {why})"
        )
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dtype != ref.dtype or t.device != ref.device:
            raise TypeError(
                f"fastrnn_triton::{op}: {name} is {t.dtype} on {t.device}, expected {ref.dtype} on {ref.device}"
            )
    if lengths is not None:
        if lengths.dtype != torch.int64 or lengths.device != ref.device:
            raise TypeError(f"fastrnn_triton::{op}: lengths must be int64 on {ref.device}, got {lengths.dtype} "
                            f"on {lengths.device}")
    if resets is not None:
        if resets.dtype != torch.bool or resets.device != ref.device:
            raise TypeError(f"fastrnn_triton::{op}: resets must be bool on {ref.device}, got {resets.dtype} "
                            f"on {resets.device}")


def check_inputs(op, ref, specs, lengths, resets, T, B):
    """specs: name -> (tensor or None, expected shape). ref: the tensor the sizes were read from.
    lengths: None or int64 [B]; resets: None or bool [T, B], contiguous (the kernels index it t*B + b)."""
    check_common(op, ref, {name: t for name, (t, _) in specs.items()}, lengths, resets)
    for name, (t, shape) in specs.items():
        check_shape(op, name, t, shape)
    check_shape(op, "lengths", lengths, (B,))
    check_shape(op, "resets", resets, (T, B))
    if resets is not None and not resets.is_contiguous():
        raise ValueError(f"fastrnn_triton::{op}: resets must be contiguous (a [T, B] bool tensor, indexed t*B + b), "
                         f"got strides {resets.stride()}")


def with_input_bias(gx, b_gx):
    """gx with the op's optional b_gx [G*H] added (docs/contract.md). One pass over gx before the kernels: the
    modules pass the bias here only on the cpu backend, whose kernels add it in the cell; elsewhere it stays in
    the input projection (autograd.split_input_bias), so this only keeps the contract."""
    return gx if b_gx is None else gx + b_gx


def check_sizes(op, name, t, G):
    """(T, B, H) of a [T, B, G*H] tensor (H = 0 is a valid, empty problem, as in torch.nn)."""
    check_3d(op, name, t)
    T, B, GH = t.shape
    if GH % G:
        raise ValueError(f"fastrnn_triton::{op}: {name} has {GH} columns, expected {G}*H")
    return T, B, GH // G


def check_shape(op, name, t, shape):
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"fastrnn_triton::{op}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def check_3d(op, name, t):
    if t.dim() != 3:
        raise ValueError(f"fastrnn_triton::{op}: {name} must be [T, B, *], got shape {tuple(t.shape)}")


def contiguous(*tensors):
    return [t.contiguous() if t is not None else None for t in tensors]


def lengths_arg(lengths, like):
    """(pointer argument, HAS_LENGTHS): a tensor must be passed even when there are no lengths."""
    return (lengths, True) if lengths is not None else (like, False)


def resets_arg(resets, like):
    """(pointer argument, HAS_RESETS): a tensor must be passed even when there are no resets; with
    HAS_RESETS=False the kernels never read it, and compile as they did before resets existed."""
    return (resets, True) if resets is not None else (like, False)
