"""The big GEMMs of a recurrent layer on the CPU through each path torch offers, side by side in one process.

    python bench/cpu_gemm.py [--repeats 9] [--threads 2] [--sizes "100,64,512,512;100,32,256,256"] [--cell lstm]

For each (T, B, I, H) of a layer of --cell (G = 4H gates for the LSTM, 3H for the GRU, H for the RNN) the
products fastrnn's layer runs outside the recurrence: the input projection gx = x W_ih^T + b ([T*B, I] x [I, G]),
backward's dx = dgx W_ih ([T*B, G] x [G, I]), dW_ih = dgx^T x ([G, T*B] x [T*B, I]), and one step's hidden product
h W_hh^T ([B, H] x [H, G]): a library GEMM at the shape of the recurrence's steps. Paths:
  torch.mm       MKL sgemm (on AMD CPUs MKL runs its AVX2 code whatever the CPU has)
  onednn         torch.ops.mkldnn._linear_pointwise (oneDNN matmul, JIT-compiled for the running ISA)
  fastrnn        fastrnn_cpu::mm (csrc/cpu/linear.cpp: the path fastrnn's rule picks, torch.compile-safe)
Calls alternate between the paths (load from other processes falls on all); GFLOP/s from the median and
from the fastest call. Legend: T steps, B batch, I input size, H hidden size, G gates x H.
"""

import argparse
import statistics
import time

import torch

from fastrnn.backends import native
from fastrnn.bench.machine import cpu_name


GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def products(T, B, I, H, cell="lstm"):
    """(name, a, b): a @ b for each product of a layer of `cell` of this size (fp32, random)."""
    G, M = GATES[cell] * H, T * B
    x, w_ih, dgx = torch.randn(M, I), torch.randn(G, I), torch.randn(M, G)
    h, w_hh = torch.randn(B, H), torch.randn(G, H)
    return [
        ("x W_ih^T", x, w_ih.t()),
        ("dgx W_ih", dgx, w_ih),
        ("dgx^T x", dgx.t(), x),
        ("h W_hh^T (one step)", h, w_hh.t()),
    ]


def paths():
    out = {"torch.mm": torch.mm, "fastrnn": native.mm}
    if torch.backends.mkldnn.is_available():
        linear = torch.ops.mkldnn._linear_pointwise
        # a @ b as linear(a, b^T): oneDNN gets the weight [N, K] it expects (a view, no copy).
        out["onednn"] = lambda a, b: linear(a, b.t(), None, "none", [], "")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", default="100,64,512,512;100,32,256,256")
    parser.add_argument("--cell", choices=sorted(GATES), default="lstm")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fns = paths()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {cpu_name()}, torch {torch.__version__} (torch ISA "
          f"{torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads, fastrnn's fp32 path: "
          f"{torch.ops.fastrnn_cpu.blas()}, {args.cell} layers, load average {open('/proc/loadavg').read().split()[0]}")
    print("| T, B, I, H | product | M, K, N | " + " | ".join(f"{p} GFLOP/s p50 (best)" for p in fns) + " |")
    print("|---|---|---|" + "---|" * len(fns))
    for size in args.sizes.split(";"):
        T, B, I, H = (int(v) for v in size.split(","))
        for name, a, b in products(T, B, I, H, args.cell):
            ref = torch.mm(a.double(), b.double())
            flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
            times = {p: [] for p in fns}
            for p, fn in fns.items():  # warm-up (oneDNN JIT-compiles its kernels on first use), and check
                err = (fn(a, b).double() - ref).abs().max().item() / ref.abs().max().item()
                assert err < 1e-5, f"{p} {name}: relative error {err:.2g}"
            for _ in range(args.repeats):
                for p, fn in fns.items():
                    t0 = time.perf_counter()
                    fn(a, b)
                    times[p].append(time.perf_counter() - t0)
            cells = " | ".join(
                f"{flops / statistics.median(times[p]) / 1e9:.0f} ({flops / min(times[p]) / 1e9:.0f})" for p in fns
            )
            print(f"| {T}, {B}, {I}, {H} | {name} | {a.shape[0]}, {a.shape[1]}, {b.shape[1]} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
