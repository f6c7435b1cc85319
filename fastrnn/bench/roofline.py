"""FLOPs of a case counted from the math, and the device's GEMM rate measured with torch.mm.

The roofline fraction of a measurement is (FLOPs / seconds) / (GEMM FLOP/s): how close the recurrent
module comes to running as fast as one dense matrix product does on the same device, in the same dtype,
in the same run. Only the matrix products are counted (docs/benchmarks.md gives the formulas): the
pointwise gate math is O(G*H) per row against O(G*H*(I+H)) for the products, under 1% at H=128.
"""

import torch

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
