"""One autograd.Function per cell, for one layer and one direction (docs/contract.md, docs/transforms.md).

The input projection Gx = x W_ih^T + b is one GEMM over all T*B rows outside these Functions
(`input_projection`), so autograd does the big dx / dW_ih GEMMs. Inside, only the recurrence runs through
the backend's ops; the hidden-weight gradient dW_hh = sum_t dGh_t^T h_{t-1} is then one GEMM over all T*B
rows too.

Two backwards per Function:
- first order (the usual `loss.backward()`, grad mode off inside backward): the backend's backward op;
- `create_graph=True` (double backward, gradient penalties, torch.func.grad/jacrev/hessian): the ops are
  opaque to autograd, so the returned gradients must come from something autograd can differentiate. The
  recurrence is recomputed from the saved inputs with plain torch ops (the reference backend's forward,
  reference.py), Gx included from the saved (x, W_ih, b) (b None where the op adds the input bias as b_gx,
  split_input_bias: then b_gx is one more input of the recomputation), and differentiated with `create_graph`. The
  projection's own backward saves those inputs already, so first-order memory and speed do not change.

The Functions use `setup_context` and `generate_vmap_rule`, so torch.func transforms them; the ops carry
batching rules (fastrnn/backends/vmap.py).

T: time steps  B: batch  H: hidden size  Hout: output size (proj_size or H)  G: gates per cell
"""

import functools
import os

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch._functorch import utils as _functorch_utils

from . import backends
from .backends import ops
from .backends import reference


def _native():
    """fastrnn.backends.native, the cpu backend's module, which the registry imported when that backend resolved
    (only the cpu backend's paths ask for it). An import statement at each use costs ~0.7 us, a visible share
    of a small layer's call."""
    return backends._module("cpu")


def transformed():
    """Whether a forward-AD dual level or a torch.func transform is active (they see only torch ops and
    fastrnn's recurrence ops, whose batching and jvp rules live in this package)."""
    return forward_ad._current_level >= 0 or torch._C._functorch.maybe_current_level() is not None


# fp32 products of fewer FLOPs than these (an input projection with no gradient to take; one whose backward
# runs too, and dW_hh) take torch's own matmul even where fastrnn_cpu's oneDNN path is the faster one for large
# products (native_gemm).
NATIVE_GEMM_MIN_FLOPS = 10_000_000
NATIVE_GEMM_MIN_FLOPS_TRAINING = 40_000_000
# Except, in training, products with a weight of at least this size: its gradient, as big, then comes from
# fastrnn's output cache (csrc/cpu/output_cache.cpp keeps outputs from 2 MB) instead of fresh pages (native_gemm).
NATIVE_GEMM_MIN_WEIGHT_BYTES_TRAINING = 2 << 20
# Where fp32 products take MKL either way (Intel CPUs), only those with an output of at least this size, or the
# weight rule's, go through fastrnn_cpu::linear: glibc maps an allocation past 32 MB (its largest mmap threshold)
# anew at every call, so torch's own output faults its pages in, where fastrnn's comes from its output cache.
NATIVE_GEMM_MIN_OUTPUT_BYTES_MKL = 32 << 20


def native_gemm(backend, dtype, flops, training, weight_bytes=0, output_bytes=0):
    """Whether a big GEMM of `dtype` on `backend` goes through fastrnn_cpu::linear / mm (oneDNN's fp32 matmul)
    instead of torch's own: fp32 (MKL's sgemm runs its AVX2 code on AMD CPUs: 1.2-2.3x slower per product on
    the Zen 5, docs/cpu.md) and fp16 on a CPU without avx512_fp16, computed in fp32 (exact conversions; both
    sum in fp32): torch's fp16 matmul there ran 16 GFLOP/s against 123 converted to fp32
    ([6400,512]x[512,2048], Zen 5, 2 threads, load 5.5). With avx512_fp16 torch's fp16 matmul is oneDNN's on
    it, with fp32 sums, and faster than the conversions (native.TORCH_FP16_GEMM_IS_NATIVE; docs/cpu.md).
    Not bf16: torch's bf16 matmul is already oneDNN's on avx512_bf16 / AMX (232 vs 97 GFLOP/s for fp32 on
    the Zen 5). Not under a torch.func transform (these ops have no batching rule).

    Where those ops would take MKL anyway (Intel CPUs, csrc/cpu/linear.cpp; native.blas()), torch's own
    F.linear / mm run the same MKL GEMM without the custom op's Python autograd layer, which cost ~20 us a
    forward and ~30 us a forward+backward of a small layer's projection ([50,64]x[64,512], Intel Xeon AVX-512,
    1 thread, fastest of 300, load 7: 49 vs 28 us and 130 vs 103 us), and again around dW_hh: there fp32
    products take the custom ops only for their output cache, from `output_bytes` of
    NATIVE_GEMM_MIN_OUTPUT_BYTES_MKL (32 MB) or, in training, by the weight rule below. Modules, cpu backend,
    Intel Xeon with AMX, 2 threads, p10 of interleaved blocks, time on torch's / on fastrnn_cpu's (d067446 with a
    temporary switch, 2026-12-03): forward at (100,64,512,512) GRU 1.09, LSTM 1.07-1.10 (39 / 52 MB
    projections), RNN 1.00 (13 MB); forward+backward GRU 1.04, LSTM 1.03-1.05; at smaller outputs 0.87-0.99
    ((20,4,128,128) LSTM forward 0.87; GRU and LSTM (200,8,128,128), (100,16,256,256) 0.96-0.99; RNN
    (100,32,256,256) forward+backward 0.97-0.99); GRU H=512 T=2 B=1-8 and LSTM H=512 T=4 B=1 training (3-4 MB
    weights): medians 1.18-1.28, p10 0.96-1.02.

    On the oneDNN path not fp32 products of `flops` below NATIVE_GEMM_MIN_FLOPS (10 M; with `training`, a product
    whose backward runs too, NATIVE_GEMM_MIN_FLOPS_TRAINING, 40 M): there oneDNN's per-call cost (~20 us against
    MKL's ~10 for [50,64]x[64,128]) and the custom op's layer outweigh oneDNN's rate. Modules, Zen 5 AVX-512, 2
    threads, time on oneDNN / on MKL (docs/cpu.md, "The big GEMMs"): forward 1.34 at a 0.8 MFLOP projection (RNN
    50,1,64,128), 1.04 at 6.6 M, 0.98 at 13 M, 0.73-0.87 from 26 M; forward+backward 1.53 at 0.8 M, 1.04-1.22 at
    6.6-26 M, 1.02 at 39 M, 0.82-1.0 from 52 M. But in training fp32 products with a weight (W_ih, W_hh:
    `weight_bytes`) of at least NATIVE_GEMM_MIN_WEIGHT_BYTES_TRAINING (2 MB) take the native path at any FLOPs: its
    weight gradient is as big, and torch's own allocation of it faulted its pages in at every call (a
    [1536,2]x[2,512] product, 3 MB out, ~330 us), where fastrnn_cpu::mm takes it from the output cache. Modules,
    forward+backward, cpu backend, p10 / median of interleaved blocks (Zen 5, AVX-512 copy, 2 threads, 9a0be74,
    2026-12-03), us, torch's matmul -> FASTRNN_CPU_BLAS=onednn: GRU H=512 T=2 B=1 2000 / 2565 -> 1337 / 1752, B=8
    3050 / 4163 -> 2093 / 2518; LSTM H=512 T=4 B=1 3844 / 4386 -> 2294 / 2806; RNN H=1024 T=2 B=1 3921 / 4547 -> 2453
    / 2898; but GRU H=256 (768 KB weights) 529 / 641 -> 675 / 797. FASTRNN_CPU_BLAS, set, forces its path at every
    size (tests, benchmarks): onednn fastrnn_cpu's ops, mkl torch's own."""
    if backend != "cpu" or dtype not in (torch.float32, torch.float16) or transformed():
        return False
    native = _native()
    if dtype == torch.float16:
        return not native.TORCH_FP16_GEMM_IS_NATIVE
    if native.blas() == "mkl":
        if torch.compiler.is_compiling() or os.environ.get("FASTRNN_CPU_BLAS"):
            return False
        return output_bytes >= NATIVE_GEMM_MIN_OUTPUT_BYTES_MKL or (
            training and weight_bytes >= NATIVE_GEMM_MIN_WEIGHT_BYTES_TRAINING)
    # A graph compiled with a dynamic sequence length has no number here: it keeps the path of large products.
    # FASTRNN_CPU_BLAS, set, forces its path at every size.
    if torch.compiler.is_compiling() or os.environ.get("FASTRNN_CPU_BLAS"):
        return True
    if training:
        return flops >= NATIVE_GEMM_MIN_FLOPS_TRAINING or weight_bytes >= NATIVE_GEMM_MIN_WEIGHT_BYTES_TRAINING
    return flops >= NATIVE_GEMM_MIN_FLOPS


def shifted_hidden(y, h0, lengths, resets, reverse):
    """(rows [T, B, Hout], first [B, Hout]): the state h_{t-1} each step t started from is rows[t-1] forward,
    rows[t+1] reverse, and `first` at the walk's first step (t = 0 forward, T-1 reverse).

    rows is y itself unless something breaks the shift: reverse, step t+1 may be padding (t+1 >= lengths[b]),
    and then the sequence starts at t from h0; a step that resets started from zeros. Then rows is a copy of
    y with those rows replaced, laid out like y (the same shape, strides and offsets, so the GEMM reading it
    sees the same alignment: an all-false `resets` gives resets=None's bits, tests/test_resets.py). `first` is
    always a fresh block for the same reason. Inactive steps have zero gradient, so what stands there does not
    matter (it is finite: y is 0 there)."""
    rows = y
    if reverse and lengths is not None:  # rows[t] is read by step t-1, which starts from h0 where t is padding
        padding = torch.arange(y.shape[0], device=y.device).unsqueeze(1) >= lengths.unsqueeze(0)
        rows = torch.where(padding.unsqueeze(2), h0.unsqueeze(0), rows)
    if resets is None:
        return rows, h0.clone()
    # rows[t] is read by step t+1 forward, t-1 reverse; the wrapped-around row is never read.
    read_by_reset = torch.roll(resets, 1 if reverse else -1, 0)
    first_resets = resets[-1] if reverse else resets[0]
    return rows.masked_fill(read_by_reset.unsqueeze(2), 0), h0.masked_fill(first_resets.unsqueeze(1), 0)


def previous_hidden(y, h0, lengths, resets, reverse):
    """[T, B, Hout]: the state h_{t-1} each step t started from, as one tensor (shifted_hidden's rows shifted
    by one step, `first` at the walk's first step)."""
    rows, first = shifted_hidden(y, h0, lengths, resets, reverse)
    if reverse:
        return torch.cat([rows[1:], first.unsqueeze(0)])
    return torch.cat([first.unsqueeze(0), rows[:-1]])


def hidden_weight_grad(dgh, y, h0, lengths, resets, reverse, backend):
    """dW_hh [G*H, Hout] = sum over t and b of dGh_t^T h_{t-1}, over all T*B rows at once (on the cpu backend
    in fp32/fp16 through fastrnn_cpu::mm, like the input projection: native_gemm).

    With many rows (T*B at least G*H, the rows of dW_hh), two products: dGh over the (T-1)*B rows of every
    step but the walk's first against y shifted by one step (a view, shifted_hidden), plus dGh_first^T h_first
    over B rows, summed in fp32 (fp64 in fp64). Building the shifted [T, B, Hout] tensor instead (a 13 MB cat
    at T=100, B=64, H=512: 7-12 ms on the Xeon at load ~4, docs/cpu.md) cost more than the 0.1 GFLOP B-row
    product. With fewer rows, one product over that shifted copy (previous_hidden): the copy is then smaller
    than the second product's [G*H, Hout] output and the sum, two more writes of dW_hh's size (fresh pages
    each: 3-4 MB at H = 512). Forward+backward of the module, cpu backend, split / one product (Zen 5,
    AVX-512 copy, 2 threads, 3dacd40 with the rule patched in, p10 and median of interleaved blocks,
    2026-12-03): GRU H=512 T=2 B=1 1.18 / 1.26,
    B=8 1.93 / 2.08; LSTM H=512 T=4 B=1 1.36 / 1.51, T=10 B=8 1.11 / 1.07; RNN H=512 T=4 B=1 1.09 / 1.10;
    LSTM H=512 T=100 B=16 (1600 rows) 1.00 / 0.99; with more rows than G*H (split kept) GRU H=512 T=100 B=32
    1.00 / 0.96, LSTM H=256 T=100 B=32 1.01 / 1.02. Under torch.compile always two products (fp32/fp64), as
    before that rule. In bf16 always one product: the sum of two would round once more in bf16 than one
    product does."""
    weight_bytes = dgh.shape[-1] * y.shape[-1] * 4
    native = native_gemm(backend, dgh.dtype, 2 * dgh.numel() * y.shape[-1], training=True,
                         weight_bytes=weight_bytes, output_bytes=weight_bytes)
    T, B, gates = dgh.shape
    # Not under torch.compile: a graph with a dynamic T would guard on T * B < gates and compile again past it.
    few_rows = not torch.compiler.is_compiling() and T * B < gates
    if T == 1 or few_rows or not (native or dgh.dtype in (torch.float32, torch.float64)):
        prev = previous_hidden(y, h0, lengths, resets, reverse).to(dgh.dtype)
        return _product(dgh.flatten(0, 1).t(), prev.flatten(0, 1), native)
    rows, first_h = shifted_hidden(y, h0, lengths, resets, reverse)
    first, inner, outer = (-1, slice(None, -1), slice(1, None)) if reverse else (0, slice(1, None), slice(None, -1))
    dw = _product(dgh[inner].flatten(0, 1).t(), rows[outer].flatten(0, 1).to(dgh.dtype), native, keep_fp32=True)
    # Out of place: under vmap (the Functions' generated rule) one term may be batched and the other not.
    dw = dw + _product(dgh[first].t(), first_h.to(dgh.dtype), native, keep_fp32=True)
    return dw.to(dgh.dtype)


def _product(a, b, native, keep_fp32=False):
    """a @ b: through fastrnn_cpu::mm in fp32 where `native` (the result in a's dtype unless keep_fp32, for a
    sum of products rounded once), else torch's matmul."""
    if not native:
        return a @ b
    c = _native().mm(a.float(), b.float())
    return c if keep_fp32 else c.to(a.dtype)


# The largest weight whose packed panels the cpu backend keeps across calls (csrc/cpu/panel_cache.h, kMaxBytes).
PANEL_CACHE_MAX_BYTES = 1 << 20
# The largest W_ih whose projection runs on the packed panels (packed_projection): what the panel cache keeps;
# in inference a larger one would be packed again at every call, which lost to oneDNN at 4 MB. In training every
# W_ih is packed again (the optimizer's step changes it) and still won up to 1 MB: [3200,256]x[256,1024] 4.91 ms
# against oneDNN's 5.84, [6400,512]x[512,512] 8.60 against 9.38 (Zen 5).
PACKED_PROJECTION_MAX_WEIGHT_BYTES = PANEL_CACHE_MAX_BYTES


def packed_projection(backend, x, w_ih, training):
    """Whether an input projection runs on fastrnn's packed panels (fastrnn_cpu::small_linear, the step
    products' kernel with W_ih packed once and kept) instead of torch's or oneDNN's GEMM: fp32 on the cpu
    backend's AVX-512 copy, on CPUs where fp32 products take oneDNN (not Intel's: MKL runs AVX-512 there and
    was not measured against it), for W_ih up to PACKED_PROJECTION_MAX_WEIGHT_BYTES and at least 2 rows of x;
    in training only where the product would take fastrnn_cpu::linear anyway (native_gemm: from
    NATIVE_GEMM_MIN_FLOPS_TRAINING), whose autograd formula it shares, so that the custom op's Python autograd
    layer (~20 us a call) stays off small layers. Measured (Zen 5, 2 threads, fastest of 200-400 interleaved
    calls, us, F.linear / oneDNN's linear / packed): [50,64]x[64,512] 23 / - / 14; [100,128]x[128,512] 74 / 58
    / 39; [1600,128]x[128,512] 1024 / 534 / 495; [3200,256]x[256,1024] 8871 / 5168 / 4359; [800,512]x[512,2048]
    (4 MB, repacked each call) - / 4169 / 4523; one row (a GEMV) [1,64]x[64,512] 4.1 / - / 4.7, two rows 6.6 / -
    / 4.9 (docs/cpu.md, "The input projection on the packed panels")."""
    if (backend != "cpu" or x.dtype != torch.float32 or w_ih.dtype != torch.float32
            or x.numel() < 2 * x.shape[-1] or w_ih.numel() * 4 > PACKED_PROJECTION_MAX_WEIGHT_BYTES
            or torch.compiler.is_compiling() or transformed()):
        return False
    if training and 2 * x.numel() * w_ih.shape[0] < NATIVE_GEMM_MIN_FLOPS_TRAINING:
        return False
    native = _native()
    return native.cpu_capability() == "avx512" and native.blas() == "onednn"


def padded_row_index(batch_sizes, device):
    """The padded row (t * B + b, B = batch_sizes[0]) of each of a PackedSequence's rows, [N] int64 on `device`:
    packed row i, the b-th sequence of step t (rows start[t] .. start[t] + batch_sizes[t] - 1), goes to padded
    row i + (t * B - start[t])."""
    steps, batch = batch_sizes.numel(), int(batch_sizes[0])
    start = torch.cumsum(batch_sizes, 0) - batch_sizes
    rows = int(start[-1] + batch_sizes[-1])
    shift = torch.repeat_interleave(torch.arange(steps) * batch - start, batch_sizes, output_size=rows)
    return (shift + torch.arange(rows)).to(device)


def padded(rows, batch_sizes):
    """A PackedSequence's rows [N, F] (its data, or their projection) -> padded, time-major [T, B, F] with zeros
    past each length (what the ops take with lengths); rows itself when batch_sizes is None.

    On the CPU (eager, no torch.func transform) fastrnn_cpu::pad_rows, into fastrnn's output cache: a padded Gx
    past 32 MB is then no fresh allocation that faults its pages in at every call. Elsewhere, with a gradient to
    take, one index_copy_ into fresh zeros. Either's backward is one gather: torch's _pad_packed_sequence copies a
    slice a step, and its autograd then copies the whole gradient once a step: GRU (100,64,512,512), lengths over
    [50, 100], forward+backward 743 ms with it against 209 with the index_copy (Intel Xeon with AMX, 2 threads).
    Elsewhere without a gradient, torch's pad as before (the index costs a host-to-device copy on CUDA, which
    waits for the stream; neither measured on a GPU)."""
    if batch_sizes is None:
        return rows
    grad = torch.is_grad_enabled() and rows.requires_grad
    if rows.device.type == "cpu" and not torch.compiler.is_compiling() and not transformed():
        return _native().pad_rows(rows, batch_sizes, grad=grad)
    steps, batch = batch_sizes.numel(), int(batch_sizes[0])
    if not grad:
        return torch._VF._pad_packed_sequence(rows, batch_sizes, False, 0.0, steps)[0]
    index = padded_row_index(batch_sizes, rows.device)
    # In place into the fresh zeros: torch.index_copy would copy them first (1.6 against 1.0 ms at 13 MB).
    out = rows.new_zeros(steps * batch, *rows.shape[1:]).index_copy_(0, index, rows)
    return out.view(steps, batch, *rows.shape[1:])


def projects_before_padding(x):
    """Whether the first layer projects a PackedSequence's rows x [N, I] before padding them (input_projection):
    the projection, and in training dx and dW_ih, then run over the N rows instead of T * B (a quarter fewer at
    lengths spread over [T/2, T]) and the pad copies G*H values a row instead of I. On the CPU, where the pad
    writes into the output cache (padded): modules, cpu backend, lengths over [T/2, T], the two orders alternated
    call by call (Intel Xeon with AMX, AVX-512 copy, 2 threads, 52b9034, ms p10, pad first / project first),
    inference GRU (100,64,512,512) 70.5 / 64.3, LSTM 99.6 / 90.8, RNN 25.2 / 22.9, GRU (100,32,256,256) 9.90 /
    8.93, LSTM 13.3 / 12.2, LSTM (200,8,128,128) 2.68 / 2.61, (50,4,64,128) 0.463 / 0.453; training GRU
    (100,64,512,512) 238 / 219, LSTM 303 / 288, RNN 86.1 / 77.5, LSTM (100,32,256,256) 47.4 / 42.6,
    (200,8,128,128) 9.67 / 9.14. Other devices (not measured) pad x first."""
    return x.device.type == "cpu"


def input_projection(x, w_ih, b_in, backend, batch_sizes=None):
    """Gx [T, B, G*H] = x W_ih^T + b, one GEMM over the rows of x: x [T, B, I], or with batch_sizes a
    PackedSequence's rows [N, I], projected before they are padded (a GEMM over N rows, not T * B: at lengths
    spread over [T/2, T] a quarter fewer; docs/cpu.md, "Packed input"). On the cpu backend in fp32 with a W_ih
    of up to 1 MB on fastrnn's packed panels (packed_projection), in fp32 and fp16 otherwise (native_gemm)
    through fastrnn_cpu::linear (oneDNN's matmul, which JIT-compiles for the running ISA); both differentiable
    twice through linear's autograd formula (so dx and dW_ih run on fastrnn_cpu::mm); otherwise F.linear."""
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w_ih, b_in))
    rows = x.reshape(-1, x.shape[-1])
    if packed_projection(backend, rows, w_ih, training):
        # Not training: nothing requires grad, and packed_projection rules out compile and transforms.
        gx = _native().small_linear(rows, w_ih, b_in, grad=training)
    elif native_gemm(backend, x.dtype, 2 * rows.numel() * w_ih.shape[0], training, w_ih.numel() * 4,
                     rows.shape[0] * w_ih.shape[0] * 4):
        b = None if b_in is None else b_in.float()
        gx = _native().linear(rows.float(), w_ih.float(), b).to(x.dtype)
    else:
        gx = F.linear(rows, w_ih, b_in)
    if batch_sizes is not None:
        return padded(gx, batch_sizes)
    return gx.view(*x.shape[:-1], w_ih.shape[0])


def function_for(plain, forward_mode, *tensors):
    """The autograd.Function a forward goes through, or None for the bare op (inference: the ops then save
    nothing, and apply() alone costs 6-17 us a call, a visible share of a whole B=1, H=128 layer).

    Reverse mode shows in requires_grad. Forward mode does not (a tangent may sit on a tensor that requires
    no grad), so inside a forward-AD dual level or a torch.func transform the Function with a jvp rule is
    used, or the tangents would be silently dropped. It is a separate class because Dynamo refuses to trace
    an autograd.Function that defines jvp; forward-mode AD is not available under torch.compile anyway.
    """
    if not torch.compiler.is_compiling() and transformed():
        return forward_mode
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return plain
    return None


# autograd.Function's C entry point, which Function.apply (Python) calls after binding the arguments to
# forward's signature with inspect; None on a torch that lays it out otherwise (then Function.apply is used).
_FUNCTION_APPLY = getattr(torch._C, "_FunctionBase", object).__dict__.get("apply")


def apply(function, *args):
    """function.apply(*args) without autograd.Function.apply's Python layer where that layer does nothing for
    us: it binds the arguments to forward's signature with inspect on every call (our forwards take every
    argument positionally and have no defaults), ~40 us a call: LSTMFunction at (50,1,64,128), Intel Xeon, 1
    thread, fastest of 200, load 5.9: 192 us against 148 for the C entry (the op alone: 139). Function.apply
    itself under torch.compile (Dynamo traces it) and inside functorch transforms (custom_function_call)."""
    if _FUNCTION_APPLY is None or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return function.apply(*args)
    return _FUNCTION_APPLY.__get__(None, function)(*_functorch_utils.unwrap_dead_wrappers(args))


def split_input_bias(b_in, backend):
    """(the projection's bias, the op's b_gx): where the input bias b_in (folded into Gx) is added.

    On the cpu backend in the recurrence op's cell (b_gx, docs/contract.md): torch's addmm (MKL) writes the bias
    into all of Gx before the product adds to it, one more pass over the layer's largest tensor, while the cell
    adds it from a vector in L1 as it reads gx_t. F.linear with / without its bias, fp32 (Intel Xeon with AMX,
    2 threads, ms p10): [3200,256]x[256,768] 3.57 / 3.27, [1600,128]x[128,512] 0.614 / 0.545. Elsewhere in the
    projection: cuBLAS adds it in the GEMM's epilogue, and the CUDA and Triton ops would add it in a pass of
    their own."""
    return (None, b_in) if backend == "cpu" else (b_in, None)


# The recurrence of one layer and one direction, x [T, B, I] -> y [T, B, Hout] and the final states.
# `b_in` is the input bias (folded into Gx; split_input_bias says where it is added). With batch_sizes, x is a
# PackedSequence's rows [N, I] (input_projection).


def lstm(x, w_ih, b_in, w_hh, h0, c0, w_hr, lengths, resets, reverse, backend, batch_sizes=None):
    """y, h_n, c_n."""
    b_proj, b_gx = split_input_bias(b_in, backend)
    gx = input_projection(x, w_ih, b_proj, backend, batch_sizes)
    function = function_for(LSTMFunction, LSTMForwardModeFunction, gx, w_hh, h0, c0, w_hr, b_gx)
    if function is not None:
        y, h_n, c_n, _, _ = apply(function, gx, w_hh, h0, c0, w_hr, b_gx, lengths, resets, reverse, backend, x,
                                  w_ih, b_proj, batch_sizes)
        return y, h_n, c_n
    y, h_n, c_n, _, _ = ops(backend)["lstm_fwd"](gx, w_hh, h0, c0, w_hr, lengths, resets, reverse, False, b_gx)
    return y, h_n, c_n


def gru(x, w_ih, b_in, w_hh, b_hh, h0, lengths, resets, reverse, backend, batch_sizes=None):
    """y, h_n."""
    b_proj, b_gx = split_input_bias(b_in, backend)
    gx = input_projection(x, w_ih, b_proj, backend, batch_sizes)
    function = function_for(GRUFunction, GRUForwardModeFunction, gx, w_hh, b_hh, h0, b_gx)
    if function is not None:
        y, h_n, _ = apply(function, gx, w_hh, b_hh, h0, b_gx, lengths, resets, reverse, backend, x, w_ih, b_proj,
                          batch_sizes)
        return y, h_n
    y, h_n, _ = ops(backend)["gru_fwd"](gx, w_hh, b_hh, h0, lengths, resets, reverse, False, b_gx)
    return y, h_n


def rnn(x, w_ih, b_in, w_hh, h0, lengths, resets, reverse, relu, backend, batch_sizes=None):
    """y, h_n (the op saves nothing beyond y)."""
    b_proj, b_gx = split_input_bias(b_in, backend)
    gx = input_projection(x, w_ih, b_proj, backend, batch_sizes)
    function = function_for(RNNFunction, RNNForwardModeFunction, gx, w_hh, h0, b_gx)
    if function is not None:
        return apply(function, gx, w_hh, h0, b_gx, lengths, resets, reverse, relu, backend, x, w_ih, b_proj,
                     batch_sizes)
    return ops(backend)["rnn_fwd"](gx, w_hh, h0, lengths, resets, reverse, relu, b_gx)


def without_autocast(backward):
    """Runs a backward with autocast off, as its forward ran (the modules turn it off around the layers).
    A backward called inside an autocast region would otherwise run the ops' fp32 math (the reference
    backend's matmuls, the dW_hh GEMM) in the autocast dtype: the gradients then differed from the same
    module cast to bf16 (PyTorch's test_autocast_rnn, tests/test_torch_rnn.py)."""

    @functools.wraps(backward)
    def wrapped(ctx, *grads):
        # All None when no output reaches the loss (materialize_grads is off: zeros_where_missing).
        device_type = next((g.device.type for g in grads if g is not None), None)
        if device_type is None or not torch.is_autocast_enabled(device_type):
            return backward(ctx, *grads)
        with torch.autocast(device_type, enabled=False):
            return backward(ctx, *grads)

    return wrapped


# The recurrence in plain torch ops (the reference backend's forward, reference.py), as a function of the
# differentiable inputs: what the create_graph backward and the jvp rules differentiate.


def lstm_in_torch_ops(lengths, resets, reverse):
    return lambda gx, w_hh, h0, c0, w_hr, b_gx: reference.lstm_fwd(gx, w_hh, h0, c0, w_hr, lengths, resets,
                                                                   reverse, False, b_gx)[:3]


def gru_in_torch_ops(lengths, resets, reverse):
    return lambda gx, w_hh, b_hh, h0, b_gx: reference.gru_fwd(gx, w_hh, b_hh, h0, lengths, resets, reverse, False,
                                                              b_gx)[:2]


def rnn_in_torch_ops(lengths, resets, reverse, relu):
    return lambda gx, w_hh, h0, b_gx: reference.rnn_fwd(gx, w_hh, h0, lengths, resets, reverse, relu, b_gx)


def _over_present(fn, args):
    """fn over only the arguments that are not None (torch.func takes tensors only): (wrapped fn, present
    arguments, a function that puts results back in place with None for the missing ones)."""
    present = [k for k, a in enumerate(args) if a is not None]

    def wrapped(*given):
        full = list(args)
        for k, a in zip(present, given):
            full[k] = a
        return fn(*full)

    def expand(results):
        full = [None] * len(args)
        for k, r in zip(present, results):
            full[k] = r
        return full

    return wrapped, [args[k] for k in present], expand


def differentiable_backward(recurrence, projection, inputs, cotangents):
    """The create_graph backward: the gradients of `recurrence(gx, *inputs)` (torch ops only), themselves
    differentiable by autograd and by the torch.func transforms (torch.func.vjp composes with both).

    projection: the saved (x, W_ih, b, batch_sizes) that Gx came from (input_projection; b the projection's
    bias, None where the op took it as b_gx), so that Gx is rebuilt with its history. Returns one gradient (or
    None) for gx and for each input.
    """
    x, w_ih, b_proj, batch_sizes = projection
    gx = padded(F.linear(x, w_ih, b_proj), batch_sizes)
    fn, present, expand = _over_present(recurrence, (gx, *inputs))
    _, pullback = torch.func.vjp(fn, *present)
    return expand(pullback(tuple(cotangents)))


def forward_tangents(recurrence, primals, tangents):
    """Forward-mode AD (torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad): the tangents J t of
    `recurrence(*primals)` (torch ops only), missing tangents taken as zeros. The ops are opaque, so, as for
    create_graph, the recurrence is recomputed in torch ops. J t comes from two pullbacks (the pullback
    v -> J^T v is linear, and its own pullback at t is J t) rather than a nested jvp, which a forward-AD
    dual level, already open around this call, does not allow. Three passes: forward mode is not a training
    path, so this costs nothing where speed matters."""
    fn, present, _ = _over_present(recurrence, primals)
    tangents = tuple(torch.zeros_like(p) if t is None else t for p, t in zip(primals, tangents) if p is not None)
    outputs, pullback = torch.func.vjp(fn, *present)
    _, pullback_of_pullback = torch.func.vjp(pullback, tuple(torch.zeros_like(o) for o in outputs))
    return pullback_of_pullback(tangents)[0]


def zeros_where_missing(grads, likes):
    """The output gradients with zeros for the ones autograd left None. The Functions turn off
    materialize_grads: autograd would otherwise fill a zero gradient for every output the loss does not use,
    the saved non-differentiable ones included (GRU's [T, B, 4H], LSTM's gates and c_t: 13-65 MB of zeros
    written every backward at T=100, B=64, H=512), and the ops read only dy, dh_n and dc_n."""
    return tuple(torch.zeros_like(like) if g is None else g for g, like in zip(grads, likes))


def input_bias_grad(ctx, index, b_gx, dgx):
    """The gradient of the op's b_gx (input `index` of the Function): the sum of dgx over all T*B rows, as the
    projection's autograd sums it where the bias is added there."""
    if b_gx is None or not ctx.needs_input_grad[index]:
        return None
    return dgx.sum((0, 1))


class LSTMFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(gx, w_hh, h0, c0, w_hr, b_gx, lengths, resets, reverse, backend, x, w_ih, b_proj, batch_sizes):
        return ops(backend)["lstm_fwd"](gx, w_hh, h0, c0, w_hr, lengths, resets, reverse, True, b_gx)

    @staticmethod
    def setup_context(ctx, inputs, output):
        gx, w_hh, h0, c0, w_hr, b_gx, lengths, resets, reverse, backend, x, w_ih, b_proj, batch_sizes = inputs
        y, _, _, gates, cs = output
        ctx.mark_non_differentiable(gates, cs)
        ctx.save_for_backward(w_hh, h0, c0, w_hr, b_gx, lengths, resets, y, gates, cs, x, w_ih, b_proj, batch_sizes)
        ctx.set_materialize_grads(False)
        ctx.save_for_forward(gx, w_hh, h0, c0, w_hr, b_gx, lengths, resets)
        ctx.reverse, ctx.backend = reverse, backend

    @staticmethod
    @without_autocast
    def backward(ctx, dy, dh_n, dc_n, _dgates, _dcs):
        w_hh, h0, c0, w_hr, b_gx, lengths, resets, y, gates, cs, x, w_ih, b_proj, batch_sizes = ctx.saved_tensors
        dy, dh_n, dc_n = zeros_where_missing((dy, dh_n, dc_n), (y, h0, c0))
        if torch.is_grad_enabled():
            grads = differentiable_backward(lstm_in_torch_ops(lengths, resets, ctx.reverse),
                                            (x, w_ih, b_proj, batch_sizes), (w_hh, h0, c0, w_hr, b_gx),
                                            (dy, dh_n, dc_n))
            return (*grads,) + (None,) * 8
        dgx, dh0, dc0, dw_hr = ops(ctx.backend)["lstm_bwd"](
            dy.contiguous(), dh_n.contiguous(), dc_n.contiguous(), w_hh, c0, w_hr, gates, cs, lengths, resets,
            ctx.reverse,
        )
        dw_hh = hidden_weight_grad(dgx, y, h0, lengths, resets, ctx.reverse, ctx.backend) \
            if ctx.needs_input_grad[1] else None
        dw_hr = dw_hr if w_hr is not None else None
        return (dgx, dw_hh, dh0, dc0, dw_hr, input_bias_grad(ctx, 5, b_gx, dgx)) + (None,) * 8


class LSTMForwardModeFunction(LSTMFunction):
    """LSTMFunction with a jvp rule, for forward-mode AD (see function_for)."""

    @staticmethod
    def jvp(ctx, dgx, dw_hh, dh0, dc0, dw_hr, db_gx, *_):
        gx, w_hh, h0, c0, w_hr, b_gx, lengths, resets = ctx.saved_tensors
        recurrence = lstm_in_torch_ops(lengths, resets, ctx.reverse)
        tangents = forward_tangents(recurrence, (gx, w_hh, h0, c0, w_hr, b_gx), (dgx, dw_hh, dh0, dc0, dw_hr, db_gx))
        return (*tangents, None, None)


class GRUFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(gx, w_hh, b_hh, h0, b_gx, lengths, resets, reverse, backend, x, w_ih, b_proj, batch_sizes):
        return ops(backend)["gru_fwd"](gx, w_hh, b_hh, h0, lengths, resets, reverse, True, b_gx)

    @staticmethod
    def setup_context(ctx, inputs, output):
        gx, w_hh, b_hh, h0, b_gx, lengths, resets, reverse, backend, x, w_ih, b_proj, batch_sizes = inputs
        y, _, saved = output
        ctx.mark_non_differentiable(saved)
        ctx.save_for_backward(w_hh, b_hh, h0, b_gx, lengths, resets, y, saved, x, w_ih, b_proj, batch_sizes)
        ctx.set_materialize_grads(False)
        ctx.save_for_forward(gx, w_hh, b_hh, h0, b_gx, lengths, resets)
        ctx.reverse, ctx.backend = reverse, backend

    @staticmethod
    @without_autocast
    def backward(ctx, dy, dh_n, _dsaved):
        w_hh, b_hh, h0, b_gx, lengths, resets, y, saved, x, w_ih, b_proj, batch_sizes = ctx.saved_tensors
        dy, dh_n = zeros_where_missing((dy, dh_n), (y, h0))
        if torch.is_grad_enabled():
            grads = differentiable_backward(gru_in_torch_ops(lengths, resets, ctx.reverse),
                                            (x, w_ih, b_proj, batch_sizes), (w_hh, b_hh, h0, b_gx), (dy, dh_n))
            return (*grads,) + (None,) * 8
        dgx, dgh, dh0 = ops(ctx.backend)["gru_bwd"](
            dy.contiguous(), dh_n.contiguous(), w_hh, y, h0, saved, lengths, resets, ctx.reverse
        )
        dw_hh = hidden_weight_grad(dgh, y, h0, lengths, resets, ctx.reverse, ctx.backend) \
            if ctx.needs_input_grad[1] else None
        db_hh = dgh.sum((0, 1)) if b_hh is not None and ctx.needs_input_grad[2] else None
        return (dgx, dw_hh, db_hh, dh0, input_bias_grad(ctx, 4, b_gx, dgx)) + (None,) * 8


class GRUForwardModeFunction(GRUFunction):
    """GRUFunction with a jvp rule, for forward-mode AD (see function_for)."""

    @staticmethod
    def jvp(ctx, dgx, dw_hh, db_hh, dh0, db_gx, *_):
        gx, w_hh, b_hh, h0, b_gx, lengths, resets = ctx.saved_tensors
        recurrence = gru_in_torch_ops(lengths, resets, ctx.reverse)
        return (*forward_tangents(recurrence, (gx, w_hh, b_hh, h0, b_gx), (dgx, dw_hh, db_hh, dh0, db_gx)), None)


class RNNFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(gx, w_hh, h0, b_gx, lengths, resets, reverse, relu, backend, x, w_ih, b_proj, batch_sizes):
        return ops(backend)["rnn_fwd"](gx, w_hh, h0, lengths, resets, reverse, relu, b_gx)

    @staticmethod
    def setup_context(ctx, inputs, output):
        gx, w_hh, h0, b_gx, lengths, resets, reverse, relu, backend, x, w_ih, b_proj, batch_sizes = inputs
        y, _ = output
        ctx.save_for_backward(w_hh, h0, b_gx, lengths, resets, y, x, w_ih, b_proj, batch_sizes)
        ctx.set_materialize_grads(False)
        ctx.save_for_forward(gx, w_hh, h0, b_gx, lengths, resets)
        ctx.reverse, ctx.relu, ctx.backend = reverse, relu, backend

    @staticmethod
    @without_autocast
    def backward(ctx, dy, dh_n):
        w_hh, h0, b_gx, lengths, resets, y, x, w_ih, b_proj, batch_sizes = ctx.saved_tensors
        dy, dh_n = zeros_where_missing((dy, dh_n), (y, h0))
        if torch.is_grad_enabled():
            grads = differentiable_backward(rnn_in_torch_ops(lengths, resets, ctx.reverse, ctx.relu),
                                            (x, w_ih, b_proj, batch_sizes), (w_hh, h0, b_gx), (dy, dh_n))
            return (*grads,) + (None,) * 9
        dgx, dh0 = ops(ctx.backend)["rnn_bwd"](
            dy.contiguous(), dh_n.contiguous(), w_hh, y, lengths, resets, ctx.reverse, ctx.relu
        )
        dw_hh = hidden_weight_grad(dgx, y, h0, lengths, resets, ctx.reverse, ctx.backend) \
            if ctx.needs_input_grad[1] else None
        return (dgx, dw_hh, dh0, input_bias_grad(ctx, 3, b_gx, dgx)) + (None,) * 9


class RNNForwardModeFunction(RNNFunction):
    """RNNFunction with a jvp rule, for forward-mode AD (see function_for)."""

    @staticmethod
    def jvp(ctx, dgx, dw_hh, dh0, db_gx, *_):
        gx, w_hh, h0, b_gx, lengths, resets = ctx.saved_tensors
        recurrence = rnn_in_torch_ops(lengths, resets, ctx.reverse, ctx.relu)
        return forward_tangents(recurrence, (gx, w_hh, h0, b_gx), (dgx, dw_hh, dh0, db_gx))
