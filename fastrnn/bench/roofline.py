"""FLOPs of a case counted from the math, the device's GEMM rate measured with torch.mm, and on the CPU
the best GEMM path measured in the same run (MKL's torch.mm, oneDNN's linear, fastrnn's own input
projection) and the FMA peak (measured by the extension's FMA loop; the nominal clock's formula without it).

The roofline fraction of a measurement is (FLOPs / seconds) / (GEMM FLOP/s): how close the recurrent
module comes to running as fast as one dense matrix product does on the same device, in the same dtype,
in the same run. Only the matrix products are counted (docs/benchmarks.md gives the formulas): the
pointwise gate math is O(G*H) per row against O(G*H*(I+H)) for the products, under 1% at H=128.
"""

import torch

import fastrnn
from fastrnn import autograd

from .timing import Repeats, measure, percentile

# (M, K, N) of the reference product per device type. CPU: the class of the fastrnns default case's
# input GEMM ([T*B=6400, I=512] x [512, 4H=2048]) with a third of its rows, ~4.3 GFLOP, about 50 ms
# on 2 cores; CUDA: 4096^3, ~137 GFLOP, long enough (0.2 ms in bf16 on an H100) to time with events.
GEMM_SHAPES = {"cpu": (2048, 512, 2048), "cuda": (4096, 4096, 4096)}
_GEMM_REPEATS = Repeats(warmup=2, min_reps=5, max_reps=50, budget_s=0.5)


def layer_flops(case, input_size):
    """Forward FLOPs of one layer and one direction: the input GEMM 2*T*B*I*G*H, the hidden GEMM
    2*B*Hout*G*H per step, and the projection 2*B*H*Hout per step (LSTM with proj_size)."""
    G, H, rows = case.gates, case.H, case.T * case.B
    hout = case.proj or H
    flops = 2 * rows * input_size * G * H + 2 * rows * hout * G * H
    if case.proj:
        flops += 2 * rows * H * hout
    return flops


def forward_flops(case):
    directions = 2 if case.bidirectional else 1
    hout = case.proj or case.H
    total = 0
    for layer in range(case.layers):
        input_size = case.I if layer == 0 else directions * hout
        total += directions * layer_flops(case, input_size)
    return total


def flops(case, pass_name):
    """FLOPs of one call. Backward runs two products for each forward one (the input gradient dA = dC B^T
    and the weight gradient dB = A^T dC: dx and dW_ih, the recurrent dh and dW_hh, dm and dW_hr), and
    the benchmark's input requires grad, so forward+backward is 3x forward."""
    return forward_flops(case) * (1 if pass_name == "fwd" else 3)


def gemm_rate(device, dtype):
    """FLOP/s of torch.mm at the device type's reference shape (GEMM_SHAPES), median of repeated calls."""
    device = torch.device(device)
    M, K, N = GEMM_SHAPES.get(device.type, GEMM_SHAPES["cpu"])
    a = torch.randn(M, K, device=device).to(dtype)
    b = torch.randn(K, N, device=device).to(dtype)
    out = torch.empty(M, N, device=device, dtype=dtype)
    seconds = percentile(measure(lambda: torch.mm(a, b, out=out), device, _GEMM_REPEATS), 50)
    return 2 * M * K * N / seconds


# fp32 FLOPs a core does per cycle with each of fastrnn's ISA capabilities: lanes x 2 (an FMA is two FLOPs) x
# 2 FMA pipes. AVX-512 assumes two full-width (512-bit) FMA units (Intel Xeon Gold/Platinum, AMD Zen 5); on a
# CPU with one (Zen 4 double-pumps 256-bit units, some Xeon Silver/Bronze) the real peak is half of it.
# default: 4-lane SSE, a multiply and an add a cycle. Used for the clock a measured peak implies, and for
# the nominal-clock peak where nothing can be measured.
FLOPS_PER_CYCLE = {"default": 8, "avx2": 32, "avx512": 64}
# How long the FMA loop runs (csrc/cpu/fma_peak.cpp): the best of ~1 ms runs for this long in all.
FMA_PEAK_SECONDS = 0.05


def cpu_clock_hz():
    """The clock /proc/cpuinfo reports (in a VM usually the nominal one; turbo can run above it), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            mhz = [float(line.split(":", 1)[1]) for line in f if line.startswith("cpu MHz")]
        return max(mhz) * 1e6 if mhz else None
    except (OSError, ValueError):
        return None


def fma_peak(isa, threads=None, measure=True):
    """The fp32 FMA peak of `threads` cores (torch's thread count; the loop runs on torch's threads) with
    fastrnn's ISA capability `isa`, as {flops, clock_hz, source, formula}, or None:
    - source "measured": the compiled extension's FMA loop of the running capability on each of torch's
      threads (native.fma_peak, csrc/cpu/fma_peak.cpp); clock_hz is the clock that rate implies at
      FLOPS_PER_CYCLE[isa] (two FMA units: on a CPU with one, half the real clock);
    - source "nominal clock": without the extension (or measure=False), FLOPS_PER_CYCLE[isa] x threads x the
      clock /proc/cpuinfo reports, which in a VM is the nominal one (1.5x too low on the Zen 5 of issue 11,
      below torch.mm's measured rate on the Xeon of 2026-12-02); None when that clock cannot be read."""
    threads = threads or torch.get_num_threads()
    per = FLOPS_PER_CYCLE.get(isa)
    if per is None:
        return None
    if measure:
        try:
            from ..backends import native

            flops = native.fma_peak(FMA_PEAK_SECONDS)
        except (ImportError, AttributeError, RuntimeError):  # no extension, or one built before fma_peak
            flops = None
        if flops:
            clock = flops / (per * threads)
            return {"flops": flops, "clock_hz": clock, "source": "measured",
                    "formula": f"{isa} FMA loop on {threads} threads, measured; {per} FLOP/cycle x {threads} "
                               f"cores x {clock / 1e9:.2f} GHz implied"}
    clock = cpu_clock_hz()
    if clock is None:
        return None
    return {"flops": per * threads * clock, "clock_hz": clock, "source": "nominal clock",
            "formula": f"{isa}: {per} FLOP/cycle x {threads} cores x {clock / 1e9:.2f} GHz (/proc/cpuinfo)"}


def best_gemm(device, dtype, repeats=_GEMM_REPEATS):
    """{rates: {path: FLOP/s}, best, best_flops}: the GEMM paths torch and fastrnn use on the CPU, in `dtype`,
    at GEMM_SHAPES["cpu"], in one run: torch.mm (MKL in fp32, which on AMD CPUs runs its AVX2 code; in bf16
    oneDNN, on AMX where the CPU has it), oneDNN's linear (torch.ops.mkldnn._linear_pointwise, JIT-compiled
    for the running ISA) and fastrnn's input projection (the path its cpu backend takes in that dtype:
    autograd.input_projection). The best of them is the roofline reference: torch.mm alone under-states an
    AVX-512 AMD CPU by ~2.5x in fp32 (docs/benchmarks.md), and each dtype has its own (bf16 on AMX: 359
    GFLOP/s against 96 for fp32 in one run on the Xeon of 2026-12-02, 2 threads, load 6.7)."""
    device = torch.device(device)
    rates = {"torch.mm": gemm_rate(device, dtype)}
    if device.type == "cpu":
        M, K, N = GEMM_SHAPES["cpu"]
        a, w = torch.randn(M, K).to(dtype), torch.randn(N, K).to(dtype)
        paths = {}
        if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            paths["onednn linear"] = lambda: torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")
        if "cpu" in fastrnn.available_backends("cpu"):
            # What fastrnn's cpu backend runs for its big GEMMs in this dtype (autograd.input_projection):
            # fastrnn_cpu::linear (MKL on Intel, oneDNN elsewhere) in fp32 and in fp16 (computed in fp32,
            # conversions included), torch's F.linear in bf16.
            paths["fastrnn linear"] = lambda: autograd.input_projection(a.unsqueeze(0), w, None, "cpu")
        for name, call in paths.items():
            try:
                with torch.no_grad():
                    call()  # a path this torch or dtype lacks raises here
                    seconds = percentile(measure(call, device, repeats), 50)
            except (AttributeError, RuntimeError, NotImplementedError):
                continue
            rates[name] = 2 * M * K * N / seconds
    best = max(rates, key=rates.get)
    return {"rates": rates, "best": best, "best_flops": rates[best]}
