"""Module configurations beyond one layer on the CPU: fastrnn backend="cpu" against torch.nn, in one process.

    python bench/cpu_configs.py [--configs layers2,bidir,packed,bf16] [--repeats 5] [--cells lstm,gru,rnn]
                                [--sizes T,B,I,H;...] [--threads 2] [--backend cpu|auto]

Configurations: base (one layer, fp32: the grid's own configuration), layers2 (num_layers=2), bidir
(bidirectional=True), packed (a PackedSequence of B sequences
with lengths spread evenly over [T/2, T], unsorted, enforce_sorted=False), bf16 (one layer, module and input
in bfloat16), bf16-layers2 and bf16-bidir (the same with 2 layers or bidirectional), fp16 (one layer in
float16). For each: forward under no_grad and forward+backward
(loss = output.sum(), x and every parameter requiring grad), torch.nn and fastrnn with the same state_dict,
runs alternated (each first in every other round), median of --repeats after 2 warm-ups. --backend auto times
what a user of the default gets (issue 11: auto never slower than torch.nn in any of these configurations). What
backend="auto" uses to choose between them: fastrnn/modules.py, `_RecurrentMixin._torch_nn_is_faster`.

T: steps  B: batch  I: input size  H: hidden size
"""

import argparse
import statistics
import time

import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
from fastrnn.backends import native
from fastrnn.bench.cases import CPU_TARGET_SIZES
from fastrnn.bench.machine import cpu_name

SIZES = CPU_TARGET_SIZES  # issue 11's four
MODULES = {
    "lstm": (torch.nn.LSTM, fastrnn.LSTM),
    "gru": (torch.nn.GRU, fastrnn.GRU),
    "rnn": (torch.nn.RNN, fastrnn.RNN),
}
CONFIGS = {
    "base": ({}, torch.float32),
    "layers2": (dict(num_layers=2), torch.float32),
    "bidir": (dict(bidirectional=True), torch.float32),
    "packed": ({}, torch.float32),
    "bf16": ({}, torch.bfloat16),
    "bf16-layers2": (dict(num_layers=2), torch.bfloat16),
    "bf16-bidir": (dict(bidirectional=True), torch.bfloat16),
    "fp16": ({}, torch.float16),
}


def case(cell, config, T, B, I, H, backward, backend="cpu"):
    """(torch.nn module, fastrnn module, a function making a fresh input)."""
    kw, dtype = CONFIGS[config]
    torch.manual_seed(0)
    ref_cls, fast_cls = MODULES[cell]
    ref = ref_cls(I, H, **kw)
    fast = fast_cls(I, H, backend=backend, **kw)
    fast.load_state_dict(ref.state_dict())
    ref, fast = ref.to(dtype), fast.to(dtype)
    x = torch.randn(T, B, I, dtype=dtype, requires_grad=backward)
    if config == "packed":
        lengths = torch.linspace(T, (T + 1) // 2, B).round().long()[torch.randperm(B)]
        return ref, fast, lambda: pack_padded_sequence(x, lengths, enforce_sorted=False), x
    return ref, fast, lambda: x, x


STAT = statistics.median


def timed(ref, fast, make_input, x, backward, repeats, warmup=2):
    def run(module):
        if backward:
            module.zero_grad(set_to_none=True)
            x.grad = None
            out = module(make_input())[0]
            (out.data if hasattr(out, "batch_sizes") else out).float().sum().backward()
        else:
            with torch.no_grad():
                module(make_input())

    runs = {"torch": ref, "fast": fast}
    for _ in range(warmup):
        for m in runs.values():
            run(m)
    times = {k: [] for k in runs}
    for r in range(repeats):
        # Each side first in every other round: run right after the other, a side found its caches in the
        # other's state (bf16 2-layer LSTM inference, torch.nn's forward on both sides: 0.91-0.94 in a fixed order).
        for k, m in list(runs.items())[:: 1 if r % 2 == 0 else -1]:
            t0 = time.perf_counter()
            run(m)
            times[k].append(time.perf_counter() - t0)
    return {k: STAT(v) for k, v in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="layers2,bidir,packed,bf16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stat", choices=("median", "min"), default="median",
                        help="median of the repeats, or the fastest (on a loaded machine: the least disturbed run)")
    parser.add_argument("--cells", default="lstm,gru,rnn")
    parser.add_argument("--sizes", help="T,B,I,H;T,B,I,H... (default: issue 11's four)")
    parser.add_argument("--passes", default="fwd,fwd+bwd")
    parser.add_argument("--backend", choices=("cpu", "auto"), default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global STAT
    STAT = min if args.stat == "min" else statistics.median
    sizes = [tuple(int(v) for v in s.split(",")) for s in args.sizes.split(";")] if args.sizes else SIZES
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {cpu_name()}, torch {torch.__version__} (ISA "
          f"{torch.backends.cpu.get_cpu_capability()}), fastrnn ISA {native.cpu_capability()}, "
          f"{torch.get_num_threads()} threads, backend {args.backend}, {args.stat} of {args.repeats}, "
          f"load average "
          f"{open('/proc/loadavg').read().split()[0]}")
    print("| config | cell | T, B, I, H | pass | torch.nn ms | fastrnn ms | ratio torch.nn / fastrnn | load |")
    print("|---|---|---|---|---|---|---|---|")
    for config in args.configs.split(","):
        for cell in args.cells.split(","):
            for T, B, I, H in sizes:
                for p in args.passes.split(","):
                    backward = p == "fwd+bwd"
                    ref, fast, make_input, x = case(cell, config, T, B, I, H, backward, args.backend)
                    t = timed(ref, fast, make_input, x, backward, args.repeats)
                    print(f"| {config} | {cell} | {T}, {B}, {I}, {H} | {p} | {t['torch'] * 1e3:.2f} | "
                          f"{t['fast'] * 1e3:.2f} | {t['torch'] / t['fast']:.2f} | "
                          f"{open('/proc/loadavg').read().split()[0]} |", flush=True)


if __name__ == "__main__":
    main()
