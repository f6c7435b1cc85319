"""The CPU kernels (backend="cpu") against torch.nn in the same process, at the sizes of issue 3.

    python bench/cpu_kernels.py [--repeats 15] [--cells lstm,gru,rnn] [--isa avx2,avx512] [--json out.json]

For each cell and (T, B, I, H): forward under no_grad and forward+backward (loss = output.sum(), with
x and every parameter requiring grad), for torch.nn and for fastrnn with the same state_dict, on
torch.get_num_threads() threads (2 by default here, --threads), fastrnn once per ISA capability of --isa
(default: every one this CPU runs and the build has; switched in-process with set_cpu_capability). Runs
alternate torch.nn / fastrnn@isa... so that load from other processes on the machine falls on all; each
number is the median of --repeats runs after warm-up. The roofline reference is the machine's best
measured fp32 GEMM rate in this run (fastrnn.bench.roofline.best_gemm: MKL's torch.mm and oneDNN's
linear, fastest of the repeats) and, beside it, the FMA peak (measured by the extension's FMA loop of the
running ISA on each thread: fastrnn.bench.roofline.fma_peak).

T: steps  B: batch  I: input size  H: hidden size  G: gates (LSTM 4, GRU 3, RNN 1)
"""

import argparse
import json
import platform
import statistics
import subprocess
import time

import torch

import fastrnn
from fastrnn.backends import native
from fastrnn.bench import machine as bench_machine
from fastrnn.bench import roofline

SIZES = ((100, 64, 512, 512), (100, 32, 256, 256), (50, 1, 64, 128), (200, 8, 128, 128))
GATES = {"lstm": 4, "gru": 3, "rnn": 1}
MODULES = {
    "lstm": (torch.nn.LSTM, fastrnn.LSTM),
    "gru": (torch.nn.GRU, fastrnn.GRU),
    "rnn": (torch.nn.RNN, fastrnn.RNN),
}


def gemm_flops(cell, T, B, I, H, backward):
    """Forward: the input GEMM (T*B x I x G*H) and T hidden GEMMs (B x H x G*H). Backward does three times
    the forward's GEMM work (dx and dW_ih; dh_{t-1} per step and dW_hh)."""
    G = GATES[cell]
    fwd = 2 * T * B * G * H * (I + H)
    return 3 * fwd if backward else fwd


def run_case(cell, T, B, I, H, backward, repeats, warmup, isas):
    """Median seconds of torch.nn and of fastrnn on each ISA capability for one case, runs interleaved:
    {"torch": s, "avx2": s, ...}."""
    torch.manual_seed(0)
    ref_cls, fast_cls = MODULES[cell]
    ref = ref_cls(I, H)
    fast = fast_cls(I, H, backend="cpu")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I, requires_grad=backward)
    runs = [("torch", ref)] + [(isa, fast) for isa in isas]

    def step(name, module):
        if name != "torch":
            native.set_cpu_capability(name)
        if backward:
            module.zero_grad(set_to_none=True)
            x.grad = None
            module(x)[0].sum().backward()
        else:
            with torch.no_grad():
                module(x)

    for _ in range(warmup):
        for name, module in runs:
            step(name, module)
    times = {name: [] for name, _ in runs}
    for _ in range(repeats):
        for name, module in runs:
            t0 = time.perf_counter()
            step(name, module)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def machine():
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if line.startswith("Model name")
        )
    except (OSError, StopIteration):
        model = platform.processor()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    return model, commit


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cells", default="lstm,gru,rnn")
    parser.add_argument("--sizes", help="T,B,I,H;T,B,I,H... (default: issue 3's four)")
    parser.add_argument("--isa", help="comma-separated ISA capabilities of fastrnn to run (default: all built)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    isas = args.isa.split(",") if args.isa else list(native.built_cpu_capabilities())
    sizes = [tuple(int(v) for v in s.split(",")) for s in args.sizes.split(";")] if args.sizes else SIZES
    model, commit = machine()
    start_isa = native.cpu_capability()
    gemm = roofline.best_gemm(torch.device("cpu"), torch.float32)
    peak = roofline.fma_peak(start_isa)
    rate = gemm["best_flops"]
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} commit {commit}, {model}, torch {torch.__version__} "
          f"(torch ISA {torch.backends.cpu.get_cpu_capability()}), fastrnn ISA {','.join(isas)}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}, load average "
          f"{open('/proc/loadavg').read().split()[0]}")
    rates = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in gemm["rates"].items())
    peak_text = f"; FMA peak {peak['flops'] / 1e9:.0f} GFLOP/s ({peak['formula']})" if peak else ""
    print(f"# best fp32 GEMM {rate / 1e9:.0f} GFLOP/s ({gemm['best']}; {rates}){peak_text}")
    cols = " | ".join(f"fastrnn {isa} ms | ratio {isa}" for isa in isas)
    print(f"| cell | T, B, I, H | pass | torch.nn ms | {cols} | roofline ms | best % of roofline |")
    print("|---|---|---|---|" + "---|---|" * len(isas) + "---|---|")
    rows = []
    for cell in args.cells.split(","):
        for T, B, I, H in sizes:
            for backward in (False, True):
                t = run_case(cell, T, B, I, H, backward, args.repeats, args.warmup, isas)
                roof = gemm_flops(cell, T, B, I, H, backward) / rate
                row = dict(cell=cell, T=T, B=B, I=I, H=H, pass_="fwd+bwd" if backward else "fwd",
                           torch_ms=t["torch"] * 1e3, fastrnn_ms={isa: t[isa] * 1e3 for isa in isas},
                           ratio={isa: t["torch"] / t[isa] for isa in isas}, roofline_ms=roof * 1e3)
                rows.append(row)
                best = min(t[isa] for isa in isas)
                cells = " | ".join(f"{t[isa] * 1e3:.2f} | {t['torch'] / t[isa]:.2f}" for isa in isas)
                print(f"| {cell} | {T}, {B}, {I}, {H} | {row['pass_']} | {row['torch_ms']:.2f} | {cells} "
                      f"| {row['roofline_ms']:.2f} | {100 * roof / best:.0f}% |", flush=True)
    native.set_cpu_capability(start_isa)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=model, cpu=bench_machine.cpu_name(), commit=commit, torch=torch.__version__,
                           torch_isa=torch.backends.cpu.get_cpu_capability(), fastrnn_isas=isas,
                           threads=torch.get_num_threads(), gemm=gemm, fma_peak=peak, repeats=args.repeats,
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
