"""The bf16 step product with and without avx512_bf16 (or, --amx, on vdpbf16ps against AMX), per step of the
recurrence ops, in one process.

    python bench/cpu_bf16_steps.py [--threads 1] [--repeats 15] [--cells lstm,gru,rnn] [--amx]

For each cell and (B, H): the forward op (save=True) and the backward op on bf16 tensors, with
FASTRNN_CPU_BF16_DOT=0 (weights widened to fp32, fp32 FMA tile: the path before) and unset (bf16 pair panels,
vdpbf16ps tile), calls alternated. Each at T=1 and T=50: us per step = (t50 - t1) / 49 separates the step from
the per-call cost (packing W_hh, buffers), which is reported as the T=1 time. Fastest of --repeats (on a shared
machine the median measures the neighbours). Needs the avx512 capability and a CPU with avx512_bf16.
--amx: the two compared are the vdpbf16ps tile (FASTRNN_CPU_BF16_AMX=0, "off") and the pair panels on AMX
(FASTRNN_CPU_BF16_AMX=1, "on"; needs a CPU where torch's oneDNN micro-kernel runs bf16 on AMX).

Legend: B batch, H hidden, G gates (LSTM 4, GRU 3, RNN 1).
"""

import argparse
import os
import time

import torch

from cpu_isa import op_args
from fastrnn.backends import native
from fastrnn.bench.machine import cpu_name


def bf16(args):
    return tuple(a.bfloat16() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def fastest(fns, repeats):
    """{name: fastest seconds} of {name: (environment, fn)}, calls alternated."""
    times = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, (env, fn) in fns.items():
            os.environ.update(env)
            t0 = time.perf_counter()
            fn()
            times[k] = min(times[k], time.perf_counter() - t0)
            for name in env:
                os.environ.pop(name)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--cells", default="lstm,gru,rnn")
    parser.add_argument("--sizes", default="1,128;8,128;32,256;64,512")
    parser.add_argument("--amx", action="store_true",
                        help="vdpbf16ps tile against AMX (instead of fp32 against vdpbf16ps)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    assert torch.ops.fastrnn_cpu.bf16_dot_products() >= 0, "needs the avx512 copy on a CPU with avx512_bf16"
    if args.amx:
        assert torch.ops.fastrnn_cpu.bf16_amx_products() >= 0, "needs a CPU where torch's brgemm runs bf16 on AMX"
        envs = {"off": {"FASTRNN_CPU_BF16_AMX": "0"}, "on": {"FASTRNN_CPU_BF16_AMX": "1"}}
        off, on = "vdpbf16ps", "AMX"
    else:
        envs = {"off": {"FASTRNN_CPU_BF16_DOT": "0"}, "on": {"FASTRNN_CPU_BF16_DOT": "1", "FASTRNN_CPU_BF16_AMX": "0"}}
        off, on = "fp32", "bf16"
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {cpu_name()}, torch {torch.__version__}, fastrnn ISA "
          f"{native.cpu_capability()} + avx512_bf16, {args.threads} threads, fastest of {args.repeats}, load average "
          f"{open('/proc/loadavg').read().split()[0]}")
    print(f"| cell | B, H | pass | per call {off} / {on} us | {off} tile us/step | {on} tile us/step | step speedup |"
          f" {on} GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    G = {"lstm": 4, "gru": 3, "rnn": 1}
    for cell in args.cells.split(","):
        for size in args.sizes.split(";"):
            B, H = (int(v) for v in size.split(","))
            res = {}
            for T in (1, 50):
                fwd_op, fwd_args, bwd_op, bwd_of = op_args(cell, T, B, H)
                fwd_args = bf16(fwd_args)
                bwd_args = bf16(bwd_of(fwd_op(*fwd_args)))
                for name, op, a in (("fwd", fwd_op, fwd_args), ("bwd", bwd_op, bwd_args)):
                    t = fastest({k: (env, lambda: op(*a)) for k, env in envs.items()}, args.repeats)
                    res[T, name] = t
            for name in ("fwd", "bwd"):
                step = {k: (res[50, name][k] - res[1, name][k]) / 49 for k in ("off", "on")}
                flops = 2 * B * H * G[cell] * H
                call = res[1, name]
                print(f"| {cell} | {B}, {H} | {name} | {call['off'] * 1e6:.0f} / {call['on'] * 1e6:.0f} "
                      f"| {step['off'] * 1e6:.1f} | {step['on'] * 1e6:.1f} | {step['off'] / step['on']:.2f} | "
                      f"{flops / step['on'] / 1e9:.0f} |", flush=True)
    print(f"# load average at the end {open('/proc/loadavg').read().split()[0]}")


if __name__ == "__main__":
    main()
