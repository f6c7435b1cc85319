"""bf16 / fp16 on the CPU: fastrnn backend="cpu" against torch.nn in the same dtype, in one process.

    python bench/cpu_bf16.py [--dtype bfloat16] [--repeats 7] [--cells lstm,gru,rnn] [--sizes T,B,I,H;...]
                             [--parts] [--error]

For each cell and (T, B, I, H): forward under no_grad and forward+backward (loss = output.sum(), x and
every parameter requiring grad), torch.nn and fastrnn with the same state_dict, both converted to --dtype,
runs alternated, median of --repeats after warm-up, on --threads threads.
--parts: where fastrnn's forward time goes: the input projection (F.linear in the dtype, as the layer runs
it) against the recurrence op alone (gx given), medians of interleaved calls.
--dot-off: also fastrnn with FASTRNN_CPU_BF16_DOT=0 (bf16 step products in fp32, the path before avx512_bf16).
--amx-off: also fastrnn with FASTRNN_CPU_BF16_AMX=0 (bf16 step products on vdpbf16ps, the path before AMX).
--gemm-alt: also fastrnn with its big fp16 GEMMs on the other route (torch's fp16 matmul against fp32 through
fastrnn_cpu::linear / mm; fastrnn.backends.native.TORCH_FP16_GEMM_IS_NATIVE flipped for those calls).
--error: the worst error of y and of every gradient against the same module in fp64 (the oracle), for
torch.nn and fastrnn in the dtype, each divided by the largest magnitude of that fp64 tensor.

T: steps  B: batch  I: input size  H: hidden size
"""

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from fastrnn.backends import native
from fastrnn.bench.machine import cpu_name

from cpu_configs import MODULES, SIZES  # bench/ is the script's directory, first on sys.path


def modules(cell, I, H, dtype, **kw):
    torch.manual_seed(0)
    ref_cls, fast_cls = MODULES[cell]
    ref = ref_cls(I, H, **kw)
    fast = fast_cls(I, H, backend="cpu", **kw)
    fast.load_state_dict(ref.state_dict())
    return ref.to(dtype), fast.to(dtype)


STAT = statistics.median


def interleaved(fns, repeats, warmup=2):
    """STAT (median or min) seconds of each fn of {name: fn}, calls alternated."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: STAT(t) for name, t in times.items()}


VARIANTS = {  # the other fastrnn paths a run can add: (column name, environment, fp16 GEMM route flipped)
    "dot_off": ("fastrnn dot off", {"FASTRNN_CPU_BF16_DOT": "0"}, False),
    "amx_off": ("fastrnn AMX off", {"FASTRNN_CPU_BF16_AMX": "0"}, False),
    "gemm_alt": ("fastrnn other fp16 GEMM", {}, True),
}


def run(module, x, backward, variant=None):
    """One forward (+ backward), on the path of VARIANTS[variant] for this call (None: the default path)."""
    _, env, flip = VARIANTS[variant] if variant else (None, {}, False)
    os.environ.update(env)
    native.TORCH_FP16_GEMM_IS_NATIVE ^= flip
    try:
        if backward:
            module.zero_grad(set_to_none=True)
            x.grad = None
            module(x)[0].float().sum().backward()
        else:
            with torch.no_grad():
                module(x)
    finally:
        native.TORCH_FP16_GEMM_IS_NATIVE ^= flip
        for name in env:
            os.environ.pop(name)


def parts(cell, T, B, I, H, dtype, repeats):
    """Medians of fastrnn's input projection and of its recurrence op (forward, save=False) in dtype, as the cpu
    backend splits them: the projection without its bias, which the op adds in its cell (b_gx)."""
    G = {"lstm": 4, "gru": 3, "rnn": 1}[cell] * H
    x, w_ih, b = torch.randn(T, B, I, dtype=dtype), torch.randn(G, I, dtype=dtype) / I**0.5, torch.randn(G, dtype=dtype)
    gx, h0, c0 = torch.randn(T, B, G, dtype=dtype), torch.randn(B, H, dtype=dtype), torch.randn(B, H, dtype=dtype)
    w_hh = torch.randn(G, H, dtype=dtype) / H**0.5
    ops = torch.ops.fastrnn
    if cell == "lstm":
        rec = lambda: ops.lstm_fwd(gx, w_hh, h0, c0, None, None, None, False, False, b)  # noqa: E731
    elif cell == "gru":
        rec = lambda: ops.gru_fwd(gx, w_hh, b, h0, None, None, False, False, b)  # noqa: E731
    else:
        rec = lambda: ops.rnn_fwd(gx, w_hh, h0, None, None, False, False, b)  # noqa: E731
    return interleaved({"projection": lambda: F.linear(x, w_ih).contiguous(), "recurrence": rec}, repeats)


def errors(cell, T, B, I, H, dtype):
    """{name: (y error, worst gradient error)} of torch.nn and fastrnn in dtype against fp64 torch.nn."""
    ref, fast = modules(cell, I, H, torch.float64)
    torch.manual_seed(1)
    x64 = torch.randn(T, B, I, dtype=torch.float64)
    dy = torch.randn(T, B, H, dtype=torch.float64)
    out = {}
    results = {}
    for name, module, dt in (("oracle", ref, torch.float64), ("torch.nn", ref, dtype), ("fastrnn", fast, dtype)):
        m = module.to(dt)
        x = x64.detach().to(dt).clone().requires_grad_()
        m.zero_grad(set_to_none=True)
        y = m(x)[0]
        (y.double() * dy).sum().backward()
        results[name] = [y.detach().double(), x.grad.double()] + [p.grad.double() for p in m.parameters()]
    for name in ("torch.nn", "fastrnn"):
        errs = [((a - o).abs().max() / o.abs().max().clamp_min(1e-30)).item()
                for a, o in zip(results[name], results["oracle"])]
        out[name] = (errs[0], max(errs[1:]))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stat", choices=("median", "min"), default="median",
                        help="median of the repeats, or the fastest (on a loaded machine: the least disturbed run)")
    parser.add_argument("--cells", default="lstm,gru,rnn")
    parser.add_argument("--sizes", help="T,B,I,H;T,B,I,H... (default: issue 11's four)")
    parser.add_argument("--passes", default="fwd,fwd+bwd")
    parser.add_argument("--parts", action="store_true")
    parser.add_argument("--error", action="store_true")
    parser.add_argument("--dot-off", action="store_true", help="also fastrnn with FASTRNN_CPU_BF16_DOT=0")
    parser.add_argument("--amx-off", action="store_true", help="also fastrnn with FASTRNN_CPU_BF16_AMX=0")
    parser.add_argument("--gemm-alt", action="store_true", help="also fastrnn with the other fp16 GEMM route")
    args = parser.parse_args()
    variants = [v for v in VARIANTS if getattr(args, v)]
    torch.set_num_threads(args.threads)
    global STAT
    STAT = min if args.stat == "min" else statistics.median
    dtype = getattr(torch, args.dtype)
    sizes = [tuple(int(v) for v in s.split(",")) for s in args.sizes.split(";")] if args.sizes else SIZES
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {cpu_name()}, torch {torch.__version__} (ISA "
          f"{torch.backends.cpu.get_cpu_capability()}), fastrnn ISA {native.cpu_capability()}, {args.dtype}, "
          f"{torch.get_num_threads()} threads, {args.stat} of {args.repeats}, load average "
          f"{open('/proc/loadavg').read().split()[0]}")
    print("| cell | T, B, I, H | pass | torch.nn ms | fastrnn ms | ratio |"
          + "".join(f" {VARIANTS[v][0]} ms | ratio |" for v in variants)
          + (" proj ms | rec ms |" if args.parts else "")
          + (" y err torch.nn / fastrnn | grad err torch.nn / fastrnn |" if args.error else ""))
    for cell in args.cells.split(","):
        for T, B, I, H in sizes:
            ref, fast = modules(cell, I, H, dtype)
            for p in args.passes.split(","):
                backward = p == "fwd+bwd"
                x = torch.randn(T, B, I, dtype=dtype, requires_grad=backward)
                fns = {"torch": lambda: run(ref, x, backward), "fast": lambda: run(fast, x, backward)}
                for v in variants:
                    fns[v] = lambda v=v: run(fast, x, backward, v)
                t = interleaved(fns, args.repeats)
                line = f"| {cell} | {T}, {B}, {I}, {H} | {p} | {t['torch'] * 1e3:.2f} | {t['fast'] * 1e3:.2f} | " \
                       f"{t['torch'] / t['fast']:.2f} |"
                for v in variants:
                    line += f" {t[v] * 1e3:.2f} | {t['torch'] / t[v]:.2f} |"
                if args.parts:
                    if backward:
                        line += " | |"
                    else:
                        pt = parts(cell, T, B, I, H, dtype, args.repeats)
                        line += f" {pt['projection'] * 1e3:.2f} | {pt['recurrence'] * 1e3:.2f} |"
                if args.error:
                    if backward:
                        e = errors(cell, T, B, I, H, dtype)
                        line += f" {e['torch.nn'][0]:.2e} / {e['fastrnn'][0]:.2e} | " \
                                f"{e['torch.nn'][1]:.2e} / {e['fastrnn'][1]:.2e} |"
                    else:
                        line += " | |"
                print(line, flush=True)


if __name__ == "__main__":
    main()
