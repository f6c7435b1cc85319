"""Short calls on the CPU (a few steps a call: step-by-step decoding, RL acting, streaming), in one process.

    python bench/cpu_short_calls.py [--cells gru,lstm,rnn] [--steps 1,2,4,8,16] [--batches 1,8,64]
                                    [--hidden 512,1024] [--backend auto] [--threads 2] [--ops]

Default: fastrnn (--backend) against torch.nn with the same state_dict, I = H, one layer, fp32, forward under
no_grad and forward+backward (loss = y.sum(), x requiring grad), the two alternated call by call (which one
goes first alternates too), medians over ~0.4 s each. Ratio torch.nn / fastrnn: above 1, fastrnn is faster.

--ops: the forward and backward recurrence ops alone (gx given), W_hh's product on the packed panels against
the library GEMM and W_hh read where it lies (FASTRNN_CPU_GEMM=packed / aten / in_place, alternated: the dot
path forward, the strided path backward where H is a multiple of the panel width), the measurements behind the
rules of csrc/cpu/recurrence.h (HiddenGemm::kMinStepsToPack, dot_wins, strided_wins). Ratios library / packed
and in place / packed: above 1, packing is faster.

T: steps  B: batch  I: input size  H: hidden size
"""

import argparse
import itertools
import os
import statistics
import time

import torch

import fastrnn
from cpu_isa import GATES, op_args  # bench/ is on the path when this file runs
from fastrnn.backends import native
from fastrnn.bench.machine import cpu_name


def alternate(*fns, budget=0.4):
    """Medians (us) of each of fns called in turn, the order reversed every other round."""
    for _ in range(2):
        start = time.perf_counter()
        for fn in fns:
            fn()
    rounds = max(7, min(400, int(budget / max(time.perf_counter() - start, 1e-6))))
    times = [[] for _ in fns]
    for r in range(rounds):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            t = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t)
    return tuple(statistics.median(t) * 1e6 for t in times)


def modules(cell, T, B, H, backend):
    ref = getattr(torch.nn, cell.upper())(H, H)
    fast = getattr(fastrnn, cell.upper())(H, H, backend=backend)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, H)
    xg = x.clone().requires_grad_()

    def forward(m):
        def run():
            with torch.no_grad():
                m(x)
        return run

    def train(m):
        def run():
            m(xg)[0].sum().backward()
        return run

    return alternate(forward(ref), forward(fast)), alternate(train(ref), train(fast))


def op_calls(cell, T, B, H):
    """(forward, backward) calls of the recurrence ops (bench/cpu_isa.py's arguments), the forward saving what
    the backward reads."""
    fwd_op, fwd_args, bwd_op, bwd_args = op_args(cell, T, B, H)
    saved = bwd_args(fwd_op(*fwd_args))
    return lambda: fwd_op(*fwd_args), lambda: bwd_op(*saved)


def with_path(path, fn):
    def run():
        os.environ["FASTRNN_CPU_GEMM"] = path  # read at each call (recurrence.h, gemm_path_override)
        fn()
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", default="gru,lstm,rnn")
    parser.add_argument("--steps", default="1,2,4,8,16")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--hidden", default="512,1024")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ops", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {cpu_name()}, fastrnn ISA {native.cpu_capability()}, torch "
          f"{torch.__version__}, {args.threads} threads, load average {open('/proc/loadavg').read().split()[0]}")
    if args.ops:
        print("| cell | H | W_hh MB | B | T | forward packed / library / in place us (library / packed, in place / "
              "packed) | backward, the same |")
    else:
        print(f"| cell | H | B | T | forward torch.nn / {args.backend} us (ratio) | forward+backward |")
    print("|---|---|---|---|---|---|" + ("---|" if args.ops else ""))
    for cell, H, B, T in itertools.product(args.cells.split(","), ints(args.hidden), ints(args.batches),
                                           ints(args.steps)):
        if args.ops:
            cells = []
            for fn in op_calls(cell, T, B, H):
                packed, library, in_place = alternate(*(with_path(p, fn) for p in ("packed", "aten", "in_place")))
                cells.append(f"{packed:.0f} / {library:.0f} / {in_place:.0f} ({library / packed:.2f}, "
                             f"{in_place / packed:.2f})")
            os.environ.pop("FASTRNN_CPU_GEMM")
            mb = GATES[cell] * H * H * 4 / 2**20
            print(f"| {cell} | {H} | {mb:.1f} | {B} | {T} | {cells[0]} | {cells[1]} |", flush=True)
            continue
        (nn_f, fr_f), (nn_t, fr_t) = modules(cell, T, B, H, args.backend)
        print(f"| {cell} | {H} | {B} | {T} | {nn_f:.0f} / {fr_f:.0f} ({nn_f / fr_f:.2f}) | "
              f"{nn_t:.0f} / {fr_t:.0f} ({nn_t / fr_t:.2f}) |", flush=True)


if __name__ == "__main__":
    main()
