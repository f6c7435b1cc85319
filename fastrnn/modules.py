"""Drop-in modules: fastrnn.LSTM is a torch.nn.LSTM whose forward runs fastrnn's kernels.

Subclassing the torch classes gives us PyTorch's own constructor validation, parameter names, shapes and
initialisation, state_dict, repr, pickling and `isinstance(m, nn.LSTM)`. Only `forward` changes, plus one
keyword, `backend`. The forward mirrors torch.nn's argument handling and reuses its checks
(`check_forward_args`, `permute_hidden`) so bad input raises the same exception with the same message.

torch.compile: Dynamo refuses every nn.LSTM/GRU/RNN instance, subclasses included, unless
`torch._dynamo.config.allow_rnn = True`. We keep isinstance compatibility (user code that initialises or
inspects recurrent layers by type keeps working) and ask compile users to set that flag; see docs/design.md.
"""

import contextlib
import copy
import functools

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from . import autograd, functional
from .functional import LayerWeights

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "convert"]

# backend="auto" on the CPU hands LSTMs of at least this batch, in these dtypes (bf16 only in inference and
# where the CPU has avx512_bf16), on padded input, to torch.nn's own forward, and fp32 LSTMs when training
# (but for the batches and sizes below; measured: _RecurrentMixin._torch_nn_is_faster).
AUTO_TORCH_NN_MIN_BATCH = 8
AUTO_TORCH_NN_DTYPES = (torch.float32, torch.bfloat16)
# On a CPU with AMX also bf16 LSTM inference at any batch, and on one with avx512_fp16 fp16 LSTM inference
# from this batch (_torch_nn_is_faster).
AUTO_TORCH_NN_FP16_MIN_BATCH = 32
# Except fp32 LSTM training of at least this many gate values a layer (T * B * 4H; 9 MB), which stays fastrnn's
# where _fastrnn_trains_large_lstms_faster() (_torch_nn_is_faster): between the largest size measured slower
# (2.15 M) and the smallest measured faster (2.29 M; Intel Xeon, 2026-12-03).
AUTO_FP32_TRAINING_MIN_GATES = 2_250_000
# And fp32 LSTM training of at most this batch on fastrnn's AVX-512 copy with two threads or more, which stays
# fastrnn's at any size (_fastrnn_trains_small_lstms_faster); on Intel CPUs of at most _INTEL (measured on a Xeon
# with AMX since the cells run on pairs of vectors and the threads split the rows, 544590c-5a9c4a7).
AUTO_FP32_TRAINING_FASTRNN_MAX_BATCH = 2
AUTO_FP32_TRAINING_FASTRNN_MAX_BATCH_INTEL = 16
# And fp32 LSTM inference from AUTO_TORCH_NN_MIN_BATCH with batch * hidden size at most this, under the same
# condition on AMD and Intel CPUs (_fastrnn_runs_small_lstm_inference_faster); on Intel CPUs of hidden size at most
# _INTEL too (at H = 128, B = 8 a tie on the Xeon with AMX: 1.00-1.10 one day, 0.93-1.02 the next).
AUTO_FP32_INFERENCE_FASTRNN_MAX_BATCH_HIDDEN = 1024
AUTO_FP32_INFERENCE_FASTRNN_MAX_HIDDEN_INTEL = 96
# GRU and RNN (fp32, padded, any layers and directions) called for a few steps (step-by-step decoding, an RL agent
# acting): at most AUTO_TORCH_NN_SHORT_CALL_MAX_STEPS steps (the GRU one, the RNN three) and fewer than
# AUTO_TORCH_NN_SHORT_CALL_MAX_GATES gate values a layer in the call (T * B * G * H; G = 3 for the GRU, 1 for the
# RNN; _TRAINING when a gradient will flow) run torch.nn's own forward: there fastrnn's fixed cost of a call (its
# Python layers, the projection and the op around a few steps) outweighs its kernels
# (_RecurrentMixin._short_call_is_faster_in_torch_nn).
AUTO_TORCH_NN_SHORT_CALL_MAX_STEPS = {"gru": 1, "rnn": 3}
AUTO_TORCH_NN_SHORT_CALL_MAX_GATES = 4096
AUTO_TORCH_NN_SHORT_CALL_MAX_GATES_TRAINING = 65536
# On Intel CPUs (measured on a Xeon with AMX, where torch.nn's per-step products are MKL's at AVX-512 width) more
# calls are short: the GRU up to two steps, the RNN up to four, of fewer than AUTO_TORCH_NN_SHORT_CALL_MAX_GATES_INTEL
# gate values a layer, with or without a gradient; fewer steps (_UNCACHED) where W_hh is over the panel cache's
# PANEL_CACHE_MAX_BYTES (it is then read where it lies, not packed, csrc/cpu/recurrence.h).
AUTO_TORCH_NN_SHORT_CALL_MAX_STEPS_INTEL = {"gru": 2, "rnn": 4}
AUTO_TORCH_NN_SHORT_CALL_MAX_STEPS_INTEL_UNCACHED = {"gru": 1, "rnn": 2}
AUTO_TORCH_NN_SHORT_CALL_MAX_GATES_INTEL = 2**17
# The dtypes any of the rules above can hand to torch.nn.
_AUTO_CANDIDATE_DTYPES = (*AUTO_TORCH_NN_DTYPES, torch.float16)
# On CUDA, backend="auto" hands padded fp32/bf16 calls of every cell to torch.nn (cuDNN) where fastrnn's
# kernels measured slower (_cuda_torch_nn_is_faster): the cuda backend from this batch when H is at least
# this, and wherever auto would run the triton or reference backend (no CUDA kernels built).
AUTO_CUDA_TORCH_NN_MIN_BATCH = 64
AUTO_CUDA_TORCH_NN_MIN_HIDDEN = 512


def _cuda_torch_nn_is_faster(backend, batch, hidden_size):
    """Whether torch.nn (cuDNN) measured faster than fastrnn's `backend` (the one auto resolves to on CUDA) for
    a padded fp32/bf16 call of `batch` rows of `hidden_size` units. Measured on an H200 (torch 2.11, cuDNN
    9.19, 7986282 and f244118, T = 100, I = H = 512 unless said; docs/benchmarks.md, "First GPU runs"),
    ratios torch.nn / fastrnn, forward / forward+backward: the cuda backend at B = 64 LSTM 0.80 / 0.77
    (fp32) and 0.92 / 0.90 (bf16) against cuDNN with flattened weights, GRU 0.92 / 0.83 and 0.90 / 0.88,
    RNN 0.81 / 0.77 and 0.94 / 0.89 against cuDNN compacting its weights at every call (slower still
    flattened); at B = 1 and 8 (LSTM) 2.2-4.6, and 1.35 / 1.38 at B = 16, T = 1024, H = 768 (bf16): kept.
    The triton backend 0.42-0.64 at every size measured (B = 1, 8, 64; launch-bound), the reference backend
    slower still. Batches 17-63 are unmeasured and stay fastrnn's."""
    if backend != "cuda":
        return True
    return batch >= AUTO_CUDA_TORCH_NN_MIN_BATCH and hidden_size >= AUTO_CUDA_TORCH_NN_MIN_HIDDEN


def _native_module():
    """fastrnn.backends.native (the compiled CPU library's Python side), or None where it cannot be loaded: the
    rules below that ask the CPU library then keep their default."""
    try:
        from .backends import native
    except ImportError:
        return None
    return native


@functools.cache
def _cpu_has_amx():
    """Whether torch runs bf16 on AMX here (its oneDNN LSTM then does; torch.cpu's own check, False where
    this torch has none)."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check()) if check is not None else False


@functools.cache
def _cpu_has_avx512_bf16():
    """Whether this CPU has avx512_bf16 (torch.cpu's own check, False where this torch has none): without it
    oneDNN's bf16 LSTM, torch.nn's, emulates bf16 and loses to fastrnn's (_torch_nn_is_faster)."""
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check()) if check is not None else False


@functools.cache
def _torch_fp16_gemm_is_native():
    """Whether torch's fp16 matmul runs on avx512_fp16 here (fastrnn.backends.native; False without it)."""
    native = _native_module()
    return native is not None and native.TORCH_FP16_GEMM_IS_NATIVE


@functools.cache
def _torch_large_allocations_fault():
    """Whether torch's CPU allocator hands a large tensor (48 MB) out on fresh 4 KB pages at every allocation,
    as it does with glibc's malloc (which maps each one anew), so that its first touch faults every page in:
    an allocation after a touched and freed one of the same size is not resident (mincore), and torch's own
    huge pages are off (torch's THP_MEM_ALLOC_ENABLE=1, read at its start-up, and the kernel's THP mode
    "always" both fault a large tensor in 2 MB at a time). False where this cannot be read (not Linux), and where
    the memory is reused (jemalloc, tcmalloc)."""
    import ctypes
    import os

    if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1":
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[always]" in f.read():
                return False
    except OSError:
        pass
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        page = os.sysconf("SC_PAGE_SIZE")
        numel = (48 << 20) // 4  # past glibc's largest mmap threshold (32 MB): mapped anew by default
        torch.empty(numel).fill_(0)  # touched, then freed
        fresh = torch.empty(numel)
        pages = fresh.numel() * 4 // page - 1
        start = (fresh.data_ptr() + page - 1) // page * page
        resident = (ctypes.c_ubyte * pages)()
        if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(pages * page), resident) != 0:
            return False
    except (AttributeError, OSError, ValueError):
        return False
    return sum(v & 1 for v in resident) < pages // 2


def _fastrnn_trains_large_lstms_faster():
    """Whether fp32 LSTM training of AUTO_FP32_TRAINING_MIN_GATES gate values or more a layer stays fastrnn's
    (_torch_nn_is_faster): where fastrnn runs its AVX-512 kernels with the big GEMMs on the paths measured, oneDNN's
    matmul into its own outputs on huge pages (csrc/cpu/linear.cpp: non-Intel CPUs, measured on a Zen 5) or MKL at
    its AVX-512 width (Intel CPUs, measured on a Xeon with AMX), and torch's own large allocations fault their pages
    in at every call (_torch_large_allocations_fault)."""
    native = _native_module()
    if native is None or native.cpu_capability() != "avx512":
        return False
    big_gemms_measured = native.onednn_matmul() if native.blas() == "onednn" else _cpu_vendor() == "intel"
    return big_gemms_measured and _torch_large_allocations_fault()


def _fastrnn_trains_small_lstms_faster():
    """Whether fp32 LSTM training of batch up to AUTO_FP32_TRAINING_FASTRNN_MAX_BATCH (and of a PackedSequence of
    one sequence) stays fastrnn's (_torch_nn_is_faster): where its AVX-512 copy runs and torch runs 2 threads or
    more, as measured (Zen 5 and an Intel Xeon with AMX; 1 thread lost from T = 50 on the Zen 5; the AVX2 copy
    against torch.nn's AVX-512 oneDNN lost up to 0.86 at I = H = 256, and a CPU with AVX2 only was not measured)."""
    native = _native_module()
    return native is not None and native.cpu_capability() == "avx512" and torch.get_num_threads() >= 2


def _fastrnn_runs_small_lstm_inference_faster(hidden_size):
    """Whether fp32 LSTM inference from batch 8 of batch * H up to AUTO_FP32_INFERENCE_FASTRNN_MAX_BATCH_HIDDEN stays
    fastrnn's (_torch_nn_is_faster): on AMD and Intel CPUs (the two measured: a Zen 5, and an Intel Xeon with AMX
    since the cells run on pairs of vectors, 544590c; before them torch.nn's oneDNN LSTM was as fast or faster
    there, 0.84-1.03) under _fastrnn_trains_small_lstms_faster's condition; on Intel CPUs up to
    AUTO_FP32_INFERENCE_FASTRNN_MAX_HIDDEN_INTEL units: at H = 128, B = 8 the two measured a tie there (one layer
    1.00-1.10 in the benchmark's grid on 2026-12-04, 0.93-1.02 on the evening of 2026-12-05, two layers 0.81-1.00
    then; docs/benchmarks.md, "Issue 11's grid with the input bias in the ops' cells"), and a tie goes to torch.nn,
    which auto promises never to be slower than; H = 64-96 measured 1.00-1.23 one layer both days."""
    vendor = _cpu_vendor()
    if vendor == "intel" and hidden_size > AUTO_FP32_INFERENCE_FASTRNN_MAX_HIDDEN_INTEL:
        return False
    return _fastrnn_trains_small_lstms_faster() and vendor in ("amd", "intel")


@functools.cache
def _cpu_vendor():
    """native.CPU_VENDOR ("intel", "amd" or "other"; "other" where the extension is not built), read once: the
    short-call rule asks at every call."""
    native = _native_module()
    return native.CPU_VENDOR if native is not None else "other"


def _check_backend(backend):
    from .backends import BACKENDS

    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"fastrnn: unknown backend {backend!r}; expected 'auto' or one of {list(BACKENDS)}")
    return backend


def _autocast(tensors, device_type):
    """Under autocast, run in the autocast dtype, as torch.nn's recurrent layers do on CUDA: returns the
    tensors cast to it and a context that turns autocast off around the layers, so the fp32 math inside
    the ops is not lowered a second time. Otherwise the tensors as they are and a no-op context (entering
    torch.autocast costs ~6 us, a visible share of a small layer)."""
    if not torch.is_autocast_enabled(device_type):
        return tensors, contextlib.nullcontext()
    dtype = torch.get_autocast_dtype(device_type)
    cast = [t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors]
    return cast, torch.autocast(device_type, enabled=False)


class _FastRNNModule:
    """What every fastrnn module adds to its torch class: the `backend` keyword and the cell's op name."""

    _cell = None  # "lstm" or "gru"; the RNN classes take theirs from `nonlinearity`

    def __init__(self, *args, backend="auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = _check_backend(backend)

    def _cell_name(self):
        return self._cell or f"rnn_{self.nonlinearity}"


class _RecurrentMixin(_FastRNNModule):
    """The forward shared by LSTM, GRU and RNN. Subclasses set `_input_dim_message`."""

    def _layer_weights(self):
        # The parameters as they are now, by name: what torch's _update_flat_weights() would refresh
        # _flat_weights from (after functional_call, reassignment), read once instead of compared and then
        # read (~16 us a call). Straight from _parameters (getattr goes through Module.__getattr__, ~1.7 us
        # each); a name not there (a parametrization's computed weight) through getattr.
        params = self._parameters
        flat = [params[name] if name in params else getattr(self, name, None) for name in self._flat_weights_names]
        per_layer = len(flat) // (self.num_layers * (2 if self.bidirectional else 1))
        weights = []
        for k in range(0, len(flat), per_layer):
            group = flat[k : k + per_layer]
            w_ih, w_hh = group[0], group[1]
            b_ih, b_hh = (group[2], group[3]) if self.bias else (None, None)
            w_hr = group[-1] if self.proj_size > 0 else None
            weights.append(LayerWeights(w_ih, w_hh, b_ih, b_hh, w_hr))
        return weights

    def _zeros_state(self, batch, size, like):
        num_directions = 2 if self.bidirectional else 1
        return torch.zeros(self.num_layers * num_directions, batch, size, dtype=like.dtype, device=like.device)

    def _torch_nn_is_faster(self, input):
        """backend="auto" runs torch.nn's own forward where it measured faster than fastrnn's kernels (on CUDA:
        _torch_nn_is_faster_on_cuda; on the CPU as follows, AVX-512
        Zen 5, ratios torch.nn / fastrnn; docs/api.md, "Where auto hands the layer to torch.nn"): short calls of a
        small GRU (one step) or RNN (up to three; _short_call_is_faster_in_torch_nn), and LSTMs on the CPU, padded
        input, where torch.nn runs oneDNN's fused LSTM (aten::mkldnn_rnn_layer):
        - fp32 or bf16, batch >= 8: fp32 0.75-0.98 (2 threads), 2 layers 0.72-1.01, bidirectional 0.71-1.05; but not
          fp32 inference of batch * H <= AUTO_FP32_INFERENCE_FASTRNN_MAX_BATCH_HIDDEN where
          _fastrnn_runs_small_lstm_inference_faster() (AMD CPUs): forward, T = 16-200, I = 64 or H, p10 of interleaved
          blocks (Zen 5, 2 threads, 5b8752f, 2026-12-03): B = 8 H = 64-128 1.13-1.51 one layer (1.12-1.45 with
          torch.nn's allocations warm), 2 layers 1.08-1.47, bidirectional 1.10-1.51; B = 12 H = 64 1.22-1.38; B = 16
          H = 64 1.26-1.33; above 1024: B = 8 H = 192 0.98-1.34 (the lows at T = 200), B = 8-16 H = 256 0.92-1.17,
          B = 16 H = 128 0.99-1.12; 1 thread, B = 8, H = 64-192: 1.10-1.17 at T = 16, 0.93-0.97 at T = 200; on an
          Intel Xeon with AMX (family 6 model 167, AVX-512 copy, 2 threads) torch.nn's as fast or faster before the
          cells ran on pairs of vectors (da4948d: B = 8 H = 64 1.00-1.03, H = 128 0.88-0.95, B = 16 H = 64
          0.84-0.85), fastrnn's since (544590c, medians of alternated calls, T = 16-200, I = H): B = 8 H = 64-128
          1.03-1.35, B = 12 H = 64 1.17-1.20, B = 16 H = 64 1.06-1.11, 2 layers 1.05-1.32, bidirectional 1.07-1.35;
          above 1024: B = 12-16 H = 96-128 0.90-1.01 (2 layers, bidirectional 0.90-1.01); bf16 forward 0.45-0.68
          (1 thread), 0.71 / 0.77 / 1.17 at (100,64,512,512) / (100,32,256,256) / (200,8,128,128) (2 threads,
          e4cc676). bf16 in inference only: fastrnn's bf16 forward+backward (on avx512_bf16, outputs on huge
          pages) measured faster, 1.17 / 1.26 / 1.47 / 1.29 at the four sizes of issue 11 (2 threads; the
          benchmark's run: 0.98 / 1.25 / 2.20 / 1.53), 2 layers 1.03-1.35, bidirectional 1.08-1.67, 1 thread 1.17
          / 1.05 / 1.33 / 0.90 (Zen 5, 2026-12-02 18:47-18:49 UTC, e4cc676; 0.87-1.11 before the big-GEMM and
          memory changes of that session). bf16
          only on a CPU with avx512_bf16: on an Intel Xeon without it (Ice Lake, family 6 model 106, AVX-512
          F/BW/VL/DQ/VNNI, no AMX), where oneDNN emulates bf16, fastrnn won every bf16 LSTM row: one layer at the four
          sizes of issue 11 forward 1.39-1.48, forward+backward 1.15-1.42 (2 threads), 1.26-1.46 from B = 8
          (1 thread); 2 layers or bidirectional 1.16-2.23 (2 threads; docs/benchmarks.md, "Issue 11's targets on an
          Ice Lake Xeon");
        - fp32 when a gradient will flow (training), from batch 3 (AUTO_FP32_TRAINING_FASTRNN_MAX_BATCH + 1; on Intel
          CPUs from batch 17, AUTO_FP32_TRAINING_FASTRNN_MAX_BATCH_INTEL + 1: on the Xeon with AMX, since the cells
          run on pairs of vectors and the threads split the rows (544590c-5a9c4a7, 2 threads, medians of alternated
          calls, I = H), forward+backward at B = 3-16, H = 64-256, T = 16-200 measured 0.99-1.46 (all but one row
          from 1.00), 2 layers and bidirectional at B = 4-16 1.02-1.39, against 0.95-1.11 at B = 32-64), and at
          any batch with one thread or off fastrnn's AVX-512 copy (_fastrnn_trains_small_lstms_faster). Below it with
          2 threads fastrnn's forward+backward measured, one layer over T = 4-200, I = 64 or H, H = 64-256 (p10 of
          interleaved blocks; medians within a few %): B = 1 1.09-1.69, B = 2 1.06-1.67 with glibc's default malloc,
          B = 1 1.16-2.55 with torch.nn's allocations kept warm (MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ set
          high); 2 layers 0.92-2.27, bidirectional 0.96-2.17 (B = 1-2; the lows at H = 256, T = 16-50); against B = 3
          0.95-1.51, B = 4 0.92-1.61, B = 8 0.81-1.34, B = 16 0.79-1.17; 1 thread, B = 1-2: 0.94-1.56 up to T = 16 but
          0.84-1.15 at T = 50-200 (Zen 5, AVX-512 copy, 9a0be74, 2026-12-03); Intel Xeon with AMX, 2 threads, B = 1-2:
          0.95-2.55 (the low at T = 4, H = 64, ~470 us a call on both sides), 2 layers 1.18-2.18, bidirectional
          1.19-2.01 (da4948d-d067446). Before that session's kernels (the rule's history): one layer forward+backward
          0.78-0.90 at B = 1-4 (T=50, I=64, H=128, and T=200, B=4, I=H=128; 1 thread, load 1.4) and 0.75-0.92
          (2 threads, fastest of 15, load 1.6-2.2); 2 layers or bidirectional 0.45-1.05 (1 thread; 5 of 6 rows below
          1), 0.91 / 0.96 at B = 1 (2 threads). Inference there stays fastrnn's (one layer 0.94-1.22, stacked
          0.84-1.19). Except from AUTO_FP32_TRAINING_MIN_GATES gate values a layer (T * B * 4H) where
          _fastrnn_trains_large_lstms_faster(): there fastrnn's forward+backward measured 1.05-1.28 at 2.5-13 M gate
          values (one layer, (25,64,512,512), (75,32,256,256), (100,32,256,256), (100,64,512,512), (100,64,128,128),
          (100,256,128,128)), 2 layers and bidirectional 1.17-1.25 (2 threads; 1 thread 1.07-1.37), against 0.78-0.98
          at 1.6 M and below ((50,32,256,256), (100,16,256,256), (100,32,128,128), (10,64,512,512); Zen 5, 2026-12-02,
          b2536f9); with torch's own allocations on huge pages (THP_MEM_ALLOC_ENABLE=1) torch.nn led at
          (100,64,512,512), 0.92-0.94. Intel Xeon with AMX (MKL, 2 threads, da4948d): 1.03-1.17 at 2.29-13 M
          ((35,64,256,256), (100,24,256,256), (300,8,256,256), (100,48,128,128), (25,64,512,512), (100,64,512,512),
          (100,256,128,128), (10,128,512,512) among others), 2 layers 1.14-1.19, bidirectional 1.09-1.21, 1 thread
          1.03-1.14; 0.78-0.94 at 2.15 M and below ((100,42,128,128), (64,32,256,256), (50,32,256,256),
          (100,16,256,256), (100,32,128,128)), hence the threshold.
        On an Intel Xeon with AMX and avx512_fp16 (1 thread, load 3.5-5.7; docs/cpu.md, "bf16 and fp16"), where
        torch.nn's bf16 LSTM is oneDNN's on AMX and its fp16 loop runs each step's addmm on avx512_fp16:
        - bf16 inference at any batch (the CPU has AMX): forward 0.46-0.80 at B = 1-4, 0.17-0.62 at B >= 8
          (fastrnn's steps on AMX too); bf16 training at any batch stays fastrnn's, as everywhere:
          forward+backward, quiet machine (load 1.1-1.5), 5955ff5, 2 threads 1.23 / 1.36 /
          2.23 / 1.82 at the four sizes of issue 11, 1 thread 1.18 / 1.02 / 1.36 / 0.95; 2 layers or
          bidirectional 1.06-2.28 (2 threads, (100,32,256,256), (200,8,128,128), (50,1,64,128));
        - fp16 inference from batch 32 (the CPU has avx512_fp16): forward 0.88-0.90 at B = 32, 64; 1.06 at
          B = 16, 1.51 at B = 8; fp16 training stays fastrnn's (1.01-13).
        A PackedSequence only when it holds one sequence, in fp32 training: torch.nn's packed LSTM is ATen's
        generic loop (an addmm a step, no oneDNN), which fastrnn beats from B = 2 (2.2-5.5, 1 and 2 threads) but
        not for a single sequence's forward+backward (0.85 / 0.90, 1 / 2 threads, load 1.4-1.7), but where
        _fastrnn_trains_small_lstms_faster() (AVX-512 copy, 2 threads or more) as for padded batch 1-2: one
        sequence, forward+backward, T = 4-200, I = 64 or H, H = 64-256, 1.01-2.47 at 2 threads, 0.89-1.29 at 1
        (Zen 5, 2026-12-03, 0ffd9e6, p10 of interleaved blocks); 1.02-2.41 at 2 threads on the Intel Xeon with
        AMX (d067446). Not for fp16
        without avx512_fp16 (torch.nn's generic loop on the CPU's slow fp16 GEMM). Never under torch.compile or
        export (torch.nn's LSTM would be unrolled there) nor under a torch.func transform (torch.nn has no
        batching rule): there the custom ops serve every shape."""
        if self.backend != "auto":
            return False
        packed = isinstance(input, PackedSequence)
        data = input.data if packed else input
        dtype = data.dtype
        if data.is_cuda:
            return not packed and self._torch_nn_is_faster_on_cuda(data)
        # is_cpu and a fixed tuple: this check runs on every call of an auto module (device.type alone ~0.3 us).
        if not data.is_cpu or dtype not in _AUTO_CANDIDATE_DTYPES or data.dim() not in (2, 3):
            return False
        if torch.compiler.is_compiling() or autograd.transformed() or torch.is_autocast_enabled("cpu"):
            return False
        grad = torch.is_grad_enabled() and (
            data.requires_grad or any(p is not None and p.requires_grad for p in self._parameters.values()))
        if self._cell != "lstm":
            return not packed and self._short_call_is_faster_in_torch_nn(data, grad)
        fp32 = dtype == torch.float32
        if packed:
            return (fp32 and grad and input.batch_sizes.numel() > 0 and int(input.batch_sizes[0]) == 1
                    and not _fastrnn_trains_small_lstms_faster())
        shape = data.shape
        batch = shape[0 if self.batch_first else 1] if len(shape) == 3 else 1
        if fp32:  # first: the common case, and this runs before every call
            if not grad:
                return batch >= AUTO_TORCH_NN_MIN_BATCH and not (
                    batch * self.hidden_size <= AUTO_FP32_INFERENCE_FASTRNN_MAX_BATCH_HIDDEN
                    and _fastrnn_runs_small_lstm_inference_faster(self.hidden_size))
            most = (AUTO_FP32_TRAINING_FASTRNN_MAX_BATCH_INTEL if _cpu_vendor() == "intel"
                    else AUTO_FP32_TRAINING_FASTRNN_MAX_BATCH)
            if batch <= most and _fastrnn_trains_small_lstms_faster():
                return False
            gates = shape[0] * shape[1] * 4 * self.hidden_size if len(shape) == 3 else 0
            return gates < AUTO_FP32_TRAINING_MIN_GATES or not _fastrnn_trains_large_lstms_faster()
        if dtype == torch.float16:
            return not grad and batch >= AUTO_TORCH_NN_FP16_MIN_BATCH and _torch_fp16_gemm_is_native()
        return not grad and (_cpu_has_amx() or (_cpu_has_avx512_bf16() and batch >= AUTO_TORCH_NN_MIN_BATCH))

    def _torch_nn_is_faster_on_cuda(self, data):
        """The CUDA part of _torch_nn_is_faster: padded batched fp32/bf16 input, no compile, transform or
        autocast (as on the CPU), where _cuda_torch_nn_is_faster says cuDNN measured faster."""
        if data.dtype not in AUTO_TORCH_NN_DTYPES or data.dim() != 3:
            return False
        if torch.compiler.is_compiling() or autograd.transformed() or torch.is_autocast_enabled("cuda"):
            return False
        from .backends import resolve

        batch = data.shape[0 if self.batch_first else 1]
        return _cuda_torch_nn_is_faster(resolve(self.backend, data.device), batch, self.hidden_size)

    def _short_call_is_faster_in_torch_nn(self, data, grad):
        """The GRU/RNN part of _torch_nn_is_faster (padded input on the CPU, no compile, transform or autocast):
        a call of an fp32 layer for at most AUTO_TORCH_NN_SHORT_CALL_MAX_STEPS steps (GRU 1, RNN 3) of fewer than
        AUTO_TORCH_NN_SHORT_CALL_MAX_GATES gate values a layer (T * B * G * H; _TRAINING when a gradient will
        flow), where fastrnn's fixed cost of a call outweighs its kernels. Measured (Zen 5, AVX-512 copy; I = H,
        ratio torch.nn / fastrnn backend="cpu", `bench/cpu_short_calls.py --backend cpu`, 2026-12-03):
        - one step (bb4a69b; 2 layers / bidirectional at f3ba6b2; one layer, 2 threads / 1 thread): forward GRU
          0.78-0.94 below 4096 gate values (H = 64-512, B = 1-16) but for H = 256, B = 4 (3072: 1.05-1.12),
          0.97-1.84 from 6144; RNN 0.64-0.86 below 4096 but for H = 512, B = 4 (2048: 0.99-1.09), at 4096
          0.88-0.93 (H = 64, B = 64) and 1.01-1.11 (H = 256, B = 16), 1.07-1.90 above; forward+backward: GRU
          0.52-0.98 below 65536 (B = 64, H = 256: 0.93-0.98), 1.22-1.38 at B = 64, H = 512 (98304); RNN
          0.62-0.90 at every size up to B = 64, H = 512 (32768), 1.12 at B = 64, H = 1024. 2 layers or
          bidirectional (2 threads, H = 64-512, B = 1-16): forward GRU 0.88-1.01 but for H = 256, B = 4
          (1.14-1.18), RNN 0.66-0.79; forward+backward GRU 0.54-0.92, RNN 0.54-0.66;
        - the RNN at two and three steps (1c4fbfc, H = 64-512, B = 1-64, 2 threads and 1 thread): forward below 4096
          gate values 0.65-1.02 but for T = 3, H = 256, B = 4 (3072: 1.04-1.20) and T = 3, H = 128, B = 8 (3072:
          0.98-1.09), 0.97-1.85 from 4096; forward+backward below 65536 0.63-1.05 (above 1.01 only at T = 3: B = 8,
          H = 256-512, up to 1.05, and B = 64, H = 256, 1.04), 1.05-1.52 from 65536. 2 layers or bidirectional
          (2 threads, H = 64-512, B = 1-16): forward 0.65-0.97 below 4096 but for B = 4, H = 256 (1.01-1.26),
          bidirectional T = 3, B = 4, H = 64-128 (1.08-1.13) and 2 layers T = 3, B = 16, H = 64 (1.05);
          forward+backward 0.67-1.05 at every size measured (up to T = 3, B = 16, H = 512: 24576).
        At four steps the RNN's kernels win from B * H = 512-1024 (forward+backward 1.03-1.18, 2 threads). The
        GRU's win from two steps at most sizes (T = 2 forward 0.82-1.76, forward+backward 0.81-1.70), but lose at
        T = 2 for H = 256, B = 1 (0.82-0.92, both thread counts) and H = 512 (W_hh 3 MB), B = 1-8 (forward
        0.82-0.96 at 1 thread, forward+backward 0.81-0.95 at both): not ruled, a limit in gate values that took
        them would take rows the kernels win by 7-20% (T = 2, B = 4-8, H = 64-128).
        On Intel CPUs (_cpu_vendor) the GRU up to AUTO_TORCH_NN_SHORT_CALL_MAX_STEPS_INTEL steps (2), the RNN up to 4,
        below AUTO_TORCH_NN_SHORT_CALL_MAX_GATES_INTEL (2^17) gate values in both modes. Measured on an Intel Xeon
        with AMX (family 6 model 167, `bench/cpu_short_calls.py`, auto against torch.nn, I = H = 64-512, B = 1-64,
        435871b, before the rule): GRU at 1-2 steps forward 0.70-0.96 (but B = 64 at 2 steps, 0.96-1.06),
        forward+backward 0.77-1.00 at 2 threads, 0.79-0.96 forward at 1 thread; RNN at 1-4 steps forward 0.59-0.98
        (B = 64, H = 512 at 3-4 steps 1.05-1.07), forward+backward 0.84-0.99 at H <= 256 and 0.94-1.06 at H = 512
        (1 thread 0.80-0.97 at H = 128, 0.97-1.13 at H = 512); past the limit B = 64, H = 512: GRU 2 steps
        0.96-0.97, RNN 4 steps 1.02-1.07. Handed over, these calls read 0.87-0.98 against torch.nn called directly
        (the rule's check and a Python frame: 1.5 us in a loop, ~7 us between heavy calls). Where W_hh is over the
        panel cache's 1 MB it is read where it lies since 12035aa (forward, the dot path) and the strided path
        (backward; csrc/cpu/recurrence.h), and fewer calls are short (the _UNCACHED step limits: the GRU one
        step, the RNN two). `--backend cpu`, 2 threads, forward / forward+backward, B = 1-16:
        GRU H = 512 T = 2 1.00-1.26 / 1.09-1.38 and H = 1024 1.01-1.31 / 1.22-1.48 with the dot path alone, T = 2
        training 1.27-1.52 with the strided path too; T = 1 0.91-1.01 / 0.76-1.00 (0.59-0.92 before the strided
        path). RNN H = 1024 T = 2 0.88-1.16 / 0.90-0.99, T = 3 0.93-1.23 / 1.02-1.15, T = 1 0.84-1.07 /
        0.67-0.72. After it (auto): GRU H = 512 / 1024 T = 2 0.98-1.34 / 0.98-1.41, T = 3 1.04-1.40 / 1.13-2.27;
        RNN H = 1024 T = 3 0.93-1.23 / 1.02-1.15. The GRU at H = 512, B = 1-8, 3-16 steps, forward, 0.73-0.95
        before the dot path, reads 0.99-1.45 with it."""
        if data.dtype != torch.float32:
            return False
        shape = data.shape  # [T, B, I], [B, T, I] with batch_first, or unbatched [T, I]
        steps, batch = (shape[0], 1) if len(shape) == 2 else (shape[1], shape[0]) if self.batch_first else shape[:2]
        gate_rows = (3 if self._cell == "gru" else 1) * self.hidden_size
        gates = steps * batch * gate_rows
        if _cpu_vendor() == "intel":
            uncached = gate_rows * self.hidden_size * 4 > autograd.PANEL_CACHE_MAX_BYTES
            most = (AUTO_TORCH_NN_SHORT_CALL_MAX_STEPS_INTEL_UNCACHED if uncached
                    else AUTO_TORCH_NN_SHORT_CALL_MAX_STEPS_INTEL)[self._cell or "rnn"]
            return steps <= most and gates < AUTO_TORCH_NN_SHORT_CALL_MAX_GATES_INTEL
        if steps > AUTO_TORCH_NN_SHORT_CALL_MAX_STEPS[self._cell or "rnn"]:
            return False
        return gates < (AUTO_TORCH_NN_SHORT_CALL_MAX_GATES_TRAINING if grad else AUTO_TORCH_NN_SHORT_CALL_MAX_GATES)

    def _runs_torch_nn(self, input, resets):
        # torch.nn has no resets: a call with them always runs fastrnn's kernels.
        return resets is None and self._torch_nn_is_faster(input)

    def resolved_backend(self, input, resets=None):
        """What a forward on `input` (with `resets`) runs here, in the current grad mode and with the inputs'
        requires_grad as they are: "torch.nn" where backend="auto" hands the layer to torch.nn's own forward
        (_torch_nn_is_faster), else the concrete fastrnn backend ("cpu", "cuda", "triton", "reference"). The
        benchmark records it for every backend="auto" row (docs/benchmarks.md)."""
        if self._runs_torch_nn(input, resets):
            return "torch.nn"
        from .backends import resolve

        data = input.data if isinstance(input, PackedSequence) else input
        return resolve(self.backend, data.device)

    def forward(self, input, hx=None, *, resets=None):
        """torch.nn's forward, plus `resets` (keyword only): a bool mask of episode starts, [T, B] for
        time-major input, [B, T] with batch_first, [T] unbatched; where resets[t, b] is true no state crosses
        between steps t-1 and t of sequence b (docs/api.md, "Episode resets"). None: torch.nn's behaviour."""
        if self._runs_torch_nn(input, resets):
            return super().forward(input, hx)
        lstm = self._cell == "lstm"
        real_hidden = self.proj_size if self.proj_size > 0 else self.hidden_size
        packed = isinstance(input, PackedSequence)
        sorted_indices = unsorted_indices = batch_sizes = None
        is_batched = True
        if packed:
            if resets is not None:
                raise ValueError(
                    "fastrnn: resets= takes padded input, not a PackedSequence (pad it with "
                    "torch.nn.utils.rnn.pad_packed_sequence, or run without resets)"
                )
            data, batch_sizes, sorted_indices, unsorted_indices = input
            host_lengths = functional.packed_lengths(batch_sizes)
            steps = batch_sizes.numel()
            batch = int(batch_sizes[0]) if steps else 0
            # All lengths equal: the packed rows are the padded input. Else functional.stacked pads them, or on
            # the CPU the first layer's projection of them.
            # (No steps at all: stacked raises torch.nn's error.)
            ragged = host_lengths is not None or steps == 0
            x = data if ragged else data.view(steps, batch, *data.shape[1:])
            ragged_batch_sizes = batch_sizes if ragged else None
            check_input = data
        else:
            if input.dim() not in (2, 3):
                raise ValueError(self._input_dim_message.format(input.dim()))
            is_batched = input.dim() == 3
            if not is_batched:
                input = input.unsqueeze(0 if self.batch_first else 1)
            if hx is not None:
                hx = self._check_hidden_dims(hx, is_batched)
            x = input.transpose(0, 1) if self.batch_first else input
            resets = _time_major_resets(resets, x, self.batch_first, is_batched)
            host_lengths = ragged_batch_sizes = None
            batch = x.shape[1]
            check_input = input
        if hx is None:
            h0 = self._zeros_state(batch, real_hidden, x)
            c0 = self._zeros_state(batch, self.hidden_size, x) if lstm else None
            hx = (h0, c0) if lstm else h0
        self.check_forward_args(check_input, hx, batch_sizes)
        hx = self.permute_hidden(hx, sorted_indices)
        h0, c0 = hx if lstm else (hx, None)

        weights = self._layer_weights()
        no_autocast = contextlib.nullcontext()
        if torch.is_autocast_enabled(x.device.type):
            (x, h0, c0, *flat), no_autocast = _autocast([x, h0, c0, *(w for lw in weights for w in lw)],
                                                        x.device.type)
            weights = [LayerWeights(*flat[k : k + 5]) for k in range(0, len(flat), 5)]
        # After the autocast cast: under autocast, torch.nn takes an fp32 input with a bf16 state.
        _check_state_dtype(x, h0, c0)
        # The kernels read lengths on the device; packing the output back uses the host copy (no sync).
        lengths = host_lengths.to(x.device) if host_lengths is not None else None
        with no_autocast:
            y, h_n, c_n = functional.stacked(
                self._cell_name(), x.contiguous(), h0, c0, weights, lengths,
                num_layers=self.num_layers, bidirectional=self.bidirectional, dropout=self.dropout,
                training=self.training, backend=self.backend, resets=resets, batch_sizes=ragged_batch_sizes,
            )

        hidden = (h_n, c_n) if lstm else h_n
        if packed:
            out = PackedSequence(functional.pack(y, host_lengths), batch_sizes, sorted_indices, unsorted_indices)
            return out, self.permute_hidden(hidden, unsorted_indices)
        if self.batch_first:
            y = y.transpose(0, 1)
        if not is_batched:
            y = y.squeeze(0 if self.batch_first else 1)
            hidden = (h_n.squeeze(1), c_n.squeeze(1)) if lstm else h_n.squeeze(1)
        return y, hidden


def _time_major_resets(resets, x, batch_first, is_batched):
    """The user's resets as the ops take it, [T, B] bool contiguous on x's device (x is [T, B, I], after
    unbatched input got its batch of one), or None; a clear error for anything else."""
    if resets is None:
        return None
    T, B = x.shape[:2]
    if not isinstance(resets, torch.Tensor):
        raise TypeError(f"fastrnn: resets must be a bool tensor or None, got {type(resets).__name__}")
    if resets.dtype != torch.bool:
        raise TypeError(f"fastrnn: resets must be a bool tensor (e.g. dones.bool()), got {resets.dtype}")
    if resets.device != x.device:
        raise ValueError(f"fastrnn: resets is on {resets.device} but the input is on {x.device}")
    if not is_batched:
        want, layout = (T,), "[T]"
    elif batch_first:
        want, layout = (B, T), "[B, T] (batch_first=True)"
    else:
        want, layout = (T, B), "[T, B]"
    if tuple(resets.shape) != want:
        raise ValueError(f"fastrnn: resets must have shape {layout} = {list(want)}, got {list(resets.shape)}")
    if not is_batched:
        resets = resets.unsqueeze(1)
    elif batch_first:
        resets = resets.t()
    return resets.contiguous()


def _check_state_dtype(x, h0, c0):
    for name, s in (("hx", h0), ("cx", c0)):
        if s is not None and (s.dtype != x.dtype or s.device != x.device):
            raise RuntimeError(
                f"fastrnn: {name} must have the input's dtype and device ({x.dtype}, {x.device}), "
                f"got ({s.dtype}, {s.device})"
            )


class LSTM(_RecurrentMixin, nn.LSTM):
    """torch.nn.LSTM with fastrnn's kernels. Same arguments, plus `backend` ("auto", "reference", "cpu",
    "cuda", "triton")."""

    _cell = "lstm"
    _input_dim_message = "LSTM: Expected input to be 2D or 3D, got {}D instead"

    def _check_hidden_dims(self, hx, is_batched):
        want = 3 if is_batched else 2
        if hx[0].dim() != want or hx[1].dim() != want:
            kind = "batched 3-D" if is_batched else "unbatched 2-D"
            raise RuntimeError(
                f"For {kind} input, hx and cx should also be {want}-D but got "
                f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
            )
        return hx if is_batched else (hx[0].unsqueeze(1), hx[1].unsqueeze(1))


class _SingleStateMixin:
    def _check_hidden_dims(self, hx, is_batched):
        if is_batched and hx.dim() != 3:
            raise RuntimeError(f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor")
        if not is_batched:
            if hx.dim() != 2:
                raise RuntimeError(f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor")
            hx = hx.unsqueeze(1)
        return hx


class GRU(_SingleStateMixin, _RecurrentMixin, nn.GRU):
    """torch.nn.GRU with fastrnn's kernels. Same arguments, plus `backend`."""

    _cell = "gru"
    _input_dim_message = "GRU: Expected input to be 2D or 3D, got {}D instead"


class RNN(_SingleStateMixin, _RecurrentMixin, nn.RNN):
    """torch.nn.RNN (tanh or relu) with fastrnn's kernels. Same arguments, plus `backend`."""

    _input_dim_message = "RNN: Expected input to be 2D or 3D, got {}D tensor instead"


# ----- cells -----


class _CellMixin(_FastRNNModule):
    """The forward shared by the *Cell modules: one step through the same ops as the layers."""

    _num_states = 1

    def _check_step_args(self, input, states):
        # The checks and messages of ATen's check_rnn_cell_forward_input/_hidden, which torch.nn's cells hit.
        if input.size(1) != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected {self.input_size}")
        for k, s in enumerate(states):
            if input.size(0) != s.size(0):
                raise RuntimeError(f"Input batch size {input.size(0)} doesn't match hidden{k} batch size {s.size(0)}")
            if s.size(1) != self.hidden_size:
                raise RuntimeError(
                    f"hidden{k} has inconsistent hidden_size: got {s.size(1)}, expected {self.hidden_size}"
                )
            # Under autocast every tensor is cast to the autocast dtype first, as torch.nn does.
            autocast = torch.is_autocast_enabled(input.device.type)
            if (s.dtype != input.dtype and not autocast) or s.device != input.device:
                raise RuntimeError(
                    f"fastrnn: hidden{k} must have the input's dtype and device ({input.dtype}, {input.device}), "
                    f"got ({s.dtype}, {s.device})"
                )
        if input.dtype != self.weight_ih.dtype and not torch.is_autocast_enabled(input.device.type):
            raise RuntimeError(
                f"fastrnn: input dtype ({input.dtype}) does not match weight dtype ({self.weight_ih.dtype})"
            )

    def forward(self, input, hx=None):
        name = type(self).__name__
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None and self._num_states == 2:
            for idx, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(f"{name}: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead")
        if hx is not None and self._num_states == 1 and hx.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
            states = [zeros] * self._num_states
        else:
            states = list(hx) if self._num_states == 2 else [hx]
            if not is_batched:
                states = [s.unsqueeze(0) for s in states]
        self._check_step_args(input, states)
        tensors, no_autocast = _autocast(
            [input, *states, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh], input.device.type
        )
        x, states, weights = tensors[0], tensors[1 : 1 + len(states)], tensors[1 + len(states) :]
        with no_autocast:
            h, c = functional.cell_step(self._cell_name(), x, states[0], states[1] if len(states) > 1 else None,
                                        *weights, self.backend)
        if not is_batched:
            h, c = h.squeeze(0), (c.squeeze(0) if c is not None else None)
        return (h, c) if self._num_states == 2 else h


class LSTMCell(_CellMixin, nn.LSTMCell):
    """torch.nn.LSTMCell with fastrnn's kernels. Same arguments, plus `backend`."""

    _cell = "lstm"
    _num_states = 2

class GRUCell(_CellMixin, nn.GRUCell):
    """torch.nn.GRUCell with fastrnn's kernels. Same arguments, plus `backend`."""

    _cell = "gru"


class RNNCell(_CellMixin, nn.RNNCell):
    """torch.nn.RNNCell (tanh or relu) with fastrnn's kernels. Same arguments, plus `backend`."""


# ----- convert -----

_REPLACEMENTS = {
    nn.LSTM: LSTM,
    nn.GRU: GRU,
    nn.RNN: RNN,
    nn.LSTMCell: LSTMCell,
    nn.GRUCell: GRUCell,
    nn.RNNCell: RNNCell,
}


def _swap(module, backend):
    """The fastrnn twin of a torch recurrent module, holding the very same Parameter objects."""
    cls = _REPLACEMENTS[type(module)]
    new = cls.__new__(cls)
    # The same Parameter objects, in containers of the twin's own (so the two modules do not alias dicts).
    new.__dict__.update({k: (copy.copy(v) if isinstance(v, (dict, list)) else v) for k, v in module.__dict__.items()})
    new.backend = _check_backend(backend)
    return new


def convert(model, backend="auto"):
    """Replaces every torch.nn LSTM/GRU/RNN/*Cell inside `model` (in place) by its fastrnn twin, sharing the
    same Parameter objects (an optimizer built before keeps working). Returns the model, or the twin when
    `model` itself is one of those modules. Subclasses of the torch modules are left alone: their forward
    may do more than the base class."""
    if type(model) in _REPLACEMENTS:
        return _swap(model, backend)
    for name, child in list(model.named_children()):
        if type(child) in _REPLACEMENTS:
            setattr(model, name, _swap(child, backend))
        else:
            convert(child, backend)
    return model
