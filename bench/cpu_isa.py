"""The CPU recurrence ops on each ISA capability, side by side in one process, per step.

    python bench/cpu_isa.py [--threads 1] [--repeats 30] [--steps 10] [--cells lstm,gru,rnn]

For each cell and (B, H): the forward op (save=True, what training runs) and the backward op on one
layer's recurrence (gx given: the input projection is not part of it), once per capability of
set_cpu_capability, calls interleaved across the capabilities. Reported: microseconds per step from the
fastest call (the least disturbed one: on a shared machine the median measures the neighbours) and the
hidden product's GFLOP/s at that time (2*B*H*G*H a step forward, the same backward). This isolates the
kernels' vector width from the GEMMs around them; bench/cpu_kernels.py times whole modules.

Legend: T steps (--steps), B batch, H hidden, G gates (LSTM 4, GRU 3, RNN 1).
"""

import argparse
import time

import torch

from fastrnn.backends import native
from fastrnn.bench.machine import cpu_name

SIZES = ((1, 128), (8, 128), (32, 256), (64, 512))
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def op_args(cell, T, B, H):
    """(forward op, its args, backward op, a function of the forward outputs giving its args)."""
    G = GATES[cell] * H
    gx, w_hh, h0 = torch.randn(T, B, G), torch.randn(G, H) / H**0.5, torch.randn(B, H)
    dy, dh = torch.randn(T, B, H), torch.randn(B, H)
    ops = torch.ops.fastrnn
    if cell == "lstm":
        c0 = torch.randn(B, H)
        return (ops.lstm_fwd, (gx, w_hh, h0, c0, None, None, None, False, True), ops.lstm_bwd,
                lambda out: (dy, dh, torch.randn(B, H), w_hh, c0, None, out[3], out[4], None, None, False))
    if cell == "gru":
        b_hh = torch.randn(G)
        return (ops.gru_fwd, (gx, w_hh, b_hh, h0, None, None, False, True), ops.gru_bwd,
                lambda out: (dy, dh, w_hh, out[0], h0, out[2], None, None, False))
    return (ops.rnn_fwd, (gx, w_hh, h0, None, None, False, False), ops.rnn_bwd,
            lambda out: (dy, dh, w_hh, out[0], None, None, False, False))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cells", default="lstm,gru,rnn")
    parser.add_argument("--isa", help="comma-separated capabilities (default: every one built)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    isas = args.isa.split(",") if args.isa else list(native.built_cpu_capabilities())
    start = native.cpu_capability()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {cpu_name()}, torch {torch.__version__}, {args.threads} threads, "
          f"T={args.steps}, fastest of {args.repeats}, load average {open('/proc/loadavg').read().split()[0]}")
    print("| cell | B, H | pass | " + " | ".join(f"{i} us/step (GFLOP/s)" for i in isas) + " | "
          + " | ".join(f"{isas[-1]} vs {i}" for i in isas[:-1]) + " |")
    print("|---|---|---|" + "---|" * (2 * len(isas) - 1))
    T = args.steps
    for cell in args.cells.split(","):
        for B, H in SIZES:
            fwd, fwd_args, bwd, bwd_args_of = op_args(cell, T, B, H)
            bwd_args = bwd_args_of(fwd(*fwd_args))
            flops = 2 * B * H * GATES[cell] * H
            for name, op, a in (("fwd", fwd, fwd_args), ("bwd", bwd, bwd_args)):
                best = {i: float("inf") for i in isas}
                for i in isas:  # warm-up
                    native.set_cpu_capability(i)
                    op(*a)
                for _ in range(args.repeats):
                    for i in isas:
                        native.set_cpu_capability(i)
                        t0 = time.perf_counter()
                        op(*a)
                        best[i] = min(best[i], time.perf_counter() - t0)
                per_step = {i: best[i] / T for i in isas}
                cells = " | ".join(f"{per_step[i] * 1e6:.1f} ({flops / per_step[i] / 1e9:.1f})" for i in isas)
                gains = " | ".join(f"{per_step[i] / per_step[isas[-1]]:.2f}x" for i in isas[:-1])
                print(f"| {cell} | {B}, {H} | {name} | {cells} | {gains} |", flush=True)
    native.set_cpu_capability(start)


if __name__ == "__main__":
    main()
