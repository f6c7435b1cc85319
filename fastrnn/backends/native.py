"""The compiled extension's recurrence ops, torch.ops.fastrnn.* (backends `cpu` and `cuda`).

csrc/ops.cpp declares the six schemas of docs/contract.md once; csrc/cpu/*.cpp registers the CPU
kernels and csrc/cuda/bindings.cpp the CUDA ones, and the dispatcher picks by the tensors' device.
The fake (meta) kernels are the shared Python ones of schemas.py. Importing this module raises
ImportError when the extension is neither prebuilt nor compiled on first use (fastrnn/_jit.py), or cannot
run here; the registry then warns once and backend="auto" falls back to the reference backend.

The CPU kernels exist in one copy per instruction set (csrc/cpu/kernels.h); fastrnn._C picks the best one
this CPU runs when it loads (FASTRNN_CPU_CAPABILITY or ATEN_CPU_CAPABILITY lower it). cpu_capability() says
which runs, set_cpu_capability() switches it (tests, benchmarks), supported_cpu_capabilities() lists what
the CPU can run.
"""

import os

import torch

from .. import _jit
from .schemas import FAKES, register_fakes

# The prebuilt fastrnn._C, else the one compiled on first use (fastrnn/_jit.py); the ops register themselves
# as the library loads, and _C loads the best CPU-capability library beside it. Raises ImportError with the
# reason and how to get the compiled ops.
EXTENSIONS = _jit.load()

register_fakes("fastrnn")


# fastrnn_cpu::mm / linear (csrc/cpu/linear.cpp): the big GEMMs on the fastest CPU path; shapes for tracing.
@torch.library.register_fake("fastrnn_cpu::mm")
def _mm_fake(a, b):
    return a.new_empty(a.shape[0], b.shape[1])


@torch.library.register_fake("fastrnn_cpu::linear")
def _linear_fake(x, w, bias):
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.register_fake("fastrnn_cpu::small_linear")
def _small_linear_fake(x, w, bias):
    return x.new_empty(x.shape[0], w.shape[0])


# Their gradients are products of the same kind, on the same path: linear's dx = dy w and dw = dy^T x (the
# input projection's backward GEMMs), db = the column sums; mm's da = dc b^T and db = a^T dc. small_linear
# (the packed panels, in fp32) has linear's formula: its products run on linear's path.
def _linear_setup(ctx, inputs, output):
    x, w, bias = inputs
    ctx.save_for_backward(x, w)
    ctx.has_bias = bias is not None


def _linear_backward(ctx, grad):
    x, w = ctx.saved_tensors
    dx = torch.ops.fastrnn_cpu.mm(grad, w) if ctx.needs_input_grad[0] else None
    dw = torch.ops.fastrnn_cpu.mm(grad.t(), x) if ctx.needs_input_grad[1] else None
    db = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, dw, db


def _mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _mm_backward(ctx, grad):
    a, b = ctx.saved_tensors
    da = torch.ops.fastrnn_cpu.mm(grad, b.t()) if ctx.needs_input_grad[0] else None
    db = torch.ops.fastrnn_cpu.mm(a.t(), grad) if ctx.needs_input_grad[1] else None
    return da, db


# fastrnn_cpu::pad_rows (csrc/cpu/pad.cpp): the padded batch (batch_sizes[0]) is data, not shape.
@torch.library.register_fake("fastrnn_cpu::pad_rows")
def _pad_rows_fake(rows, batch_sizes):
    return rows.new_empty(batch_sizes.shape[0], torch.library.get_ctx().new_dynamic_size(), rows.shape[1])


# Its gradient: the padded gradient's rows gathered back into packed order (one index_select, differentiable).
def _pad_rows_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _pad_rows_backward(ctx, grad):
    from ..autograd import padded_row_index

    (batch_sizes,) = ctx.saved_tensors
    return grad.reshape(-1, grad.shape[2]).index_select(0, padded_row_index(batch_sizes, grad.device)), None


torch.library.register_autograd("fastrnn_cpu::pad_rows", _pad_rows_backward, setup_context=_pad_rows_setup)
torch.library.register_autograd("fastrnn_cpu::linear", _linear_backward, setup_context=_linear_setup)
torch.library.register_autograd("fastrnn_cpu::small_linear", _linear_backward, setup_context=_linear_setup)
torch.library.register_autograd("fastrnn_cpu::mm", _mm_backward, setup_context=_mm_setup)

OPS = {name: getattr(torch.ops.fastrnn, name) for name in FAKES}


def _has_kernel(dispatch_key):
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"fastrnn::{name}", dispatch_key) for name in OPS)


def devices():
    """cpu always; cuda when the extension was built with its CUDA kernels and a GPU is visible."""
    found = ["cpu"]
    if torch.cuda.is_available() and _has_kernel("CUDA"):
        found.append("cuda")
    return tuple(found)


# The capability the CPU kernels run, as fastrnn_cpu::capability() last said: read at import and on every
# set_cpu_capability(), the one way it changes (the op costs ~1 us, and the layers ask at every call).
_capability = None


def cpu_capability():
    """The instruction set the CPU kernels run: "default", "avx2" or "avx512"."""
    return _capability


def set_cpu_capability(name):
    """Runs the CPU kernels compiled for `name` from now on (process-wide); returns it. RuntimeError if this
    CPU cannot run it or it was not built."""
    global _capability
    try:
        return torch.ops.fastrnn_cpu.set_capability(name)
    finally:
        _capability = torch.ops.fastrnn_cpu.capability()


def supported_cpu_capabilities():
    """The capabilities this CPU can run, lowest first (whether or not each was built)."""
    return tuple(torch.ops.fastrnn_cpu.supported())


def fma_peak(seconds):
    """The fp32 FMA throughput, FLOP/s, of the running capability's vectors on each of torch's threads at once:
    the best of ~1 ms runs of an FMA loop for about `seconds` (csrc/cpu/fma_peak.cpp; the benchmark's FMA
    peak)."""
    return torch.ops.fastrnn_cpu.fma_peak(seconds)


def linear(x, w, bias=None):
    """x [M, K] @ w [N, K]^T (+ bias [N]) like torch.nn.functional.linear on 2-D CPU input: fp32 through
    oneDNN's matmul where torch has it (faster than MKL on AMD CPUs), MKL on Intel CPUs (faster there;
    csrc/cpu/linear.cpp), else torch.addmm.
    Differentiable (its backward runs the same path: dx = dy w, dw = dy^T x)."""
    return torch.ops.fastrnn_cpu.linear(x, w, bias)


def small_linear(x, w, bias=None, grad=True):
    """x [M, K] @ w [N, K]^T (+ bias [N]) in fp32 on the running CPU copy's packed panels, w's kept across calls
    (csrc/cpu/small_linear.cpp): the input projections of autograd.packed_projection. Differentiable (linear's
    formula: dx = dy w and dw = dy^T x through mm()).

    grad=False, for a caller that knows no gradient can flow (no input requires one; eager, no torch.func
    transform or forward-AD level): the op runs past its Python autograd layer, which then only redispatches,
    as that layer does (below autograd), at ~3-4 us a call: (50,1,64,128)'s LSTM forward module 131-133 against
    135-137 us (Zen 5, 2 threads, 1c4fbfc, medians of 1500 interleaved calls)."""
    if grad:
        return torch.ops.fastrnn_cpu.small_linear(x, w, bias)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.fastrnn_cpu.small_linear.default(x, w, bias)


def pad_rows(rows, batch_sizes, grad=True):
    """A PackedSequence's rows [N, F] -> padded [T, B, F], zeros past each length, as torch's
    _pad_packed_sequence, into fastrnn's output cache (csrc/cpu/pad.cpp). Differentiable (the gather back);
    grad=False as in small_linear()."""
    if grad:
        return torch.ops.fastrnn_cpu.pad_rows(rows, batch_sizes)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.fastrnn_cpu.pad_rows.default(rows, batch_sizes)


def mm(a, b):
    """a @ b like torch.mm (2-D CPU tensors), on the path of linear()."""
    return torch.ops.fastrnn_cpu.mm(a, b)


def output_cache_stats():
    """The output cache's counters (csrc/cpu/output_cache.cpp): the CPU ops' outputs of 2 MB and more made in a
    kept block ("hits") or a new one ("made"), the bytes of free blocks kept, and the most it keeps
    (FASTRNN_CPU_OUTPUT_CACHE_MB)."""
    hits, made, free_bytes, capacity = torch.ops.fastrnn_cpu.output_cache_stats()
    return {"hits": hits, "made": made, "free_bytes": free_bytes, "capacity_bytes": capacity}


def empty_output_cache():
    """Frees the output cache's free blocks; returns their bytes."""
    return torch.ops.fastrnn_cpu.empty_output_cache()


# Whether the big fp16 GEMMs of the layer code stay on torch's own fp16 matmul (autograd.native_gemm): on a
# CPU with avx512_fp16 that is oneDNN's brgemm on it, summing in fp32 (its error against fp64 equals the fp32
# product's rounded to fp16, K up to 20000) and faster than the fp32 route (docs/cpu.md, "bf16 and fp16").
# Read once here: a constant for torch.compile.
TORCH_FP16_GEMM_IS_NATIVE = bool(torch.ops.fastrnn_cpu.has_avx512_fp16()) and torch.backends.mkldnn.is_available()

# "intel", "amd" or "other": the CPU's vendor (csrc/cpu/linear.cpp). MKL runs its AVX-512 code on Intel CPUs
# only, and some of backend="auto"'s rules were measured faster on one vendor's CPUs (fastrnn/modules.py).
CPU_VENDOR = torch.ops.fastrnn_cpu.cpu_vendor()


_answers_of_setting = {}


def _per_setting(variable, query):
    """query()'s answer under the current value of the environment variable that decides it (read by the op
    at each call), remembered per value: the op call costs ~3 us, a visible share of a small layer."""
    key = (variable, os.environ.get(variable))
    answer = _answers_of_setting.get(key)
    if answer is None:
        answer = _answers_of_setting[key] = query()
    return answer


@torch.compiler.assume_constant_result  # a compiled graph takes the path of its tracing
def blas():
    """"onednn" or "mkl": the path fp32 products of linear() and mm() take (csrc/cpu/linear.cpp) under the
    current FASTRNN_CPU_BLAS."""
    return _per_setting("FASTRNN_CPU_BLAS", torch.ops.fastrnn_cpu.blas)


def onednn_matmul():
    """Whether fp32 products on the oneDNN path run torch's mkldnn_matmul into fastrnn's own output (csrc/cpu/
    linear.cpp) under the current FASTRNN_CPU_ONEDNN_MATMUL."""
    return _per_setting("FASTRNN_CPU_ONEDNN_MATMUL", lambda: bool(torch.ops.fastrnn_cpu.onednn_matmul()))


def built_cpu_capabilities():
    """The capabilities this CPU can run and fastrnn._C can load, lowest first (switches to each and back)."""
    current, found = cpu_capability(), []
    try:
        for name in supported_cpu_capabilities():
            try:
                set_cpu_capability(name)
                found.append(name)
            except RuntimeError:
                pass
    finally:
        set_cpu_capability(current)
    return tuple(found)


# The choice is made here, at import, so that a bad FASTRNN_CPU_CAPABILITY fails the import (the registry
# then falls back to the reference backend with a warning that carries the message) rather than an op call.
try:
    _capability = torch.ops.fastrnn_cpu.capability()
except RuntimeError as e:
    raise ImportError(f"fastrnn: the CPU kernels cannot start: {e}") from e
