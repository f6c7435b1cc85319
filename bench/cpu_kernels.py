"""The CPU kernels (backend="cpu") against torch.nn in the same process, at the sizes of issue 3.

    python bench/cpu_kernels.py [--repeats 15] [--cells lstm,gru,rnn] [--json out.json]

For each cell and (T, B, I, H): forward under no_grad and forward+backward (loss = output.sum(), with
x and every parameter requiring grad), for torch.nn and for fastrnn with the same state_dict, on
torch.get_num_threads() threads (2 by default here, --threads). Runs alternate torch.nn / fastrnn so
that load from other processes on the machine falls on both; each number is the median of --repeats
runs after warm-up. The roofline is the case's GEMM FLOPs over this machine's measured GEMM rate
(one large fp32 at::mm, fastest of the repeats), i.e. the time if every FLOP ran at that speed and the
gates were free.

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


def measured_gemm_rate(repeats):
    """FLOP/s of one large fp32 GEMM, [6400, 512] x [512, 2048] (the input GEMM of the largest case), from
    its fastest run: the machine's capability, which load from other processes can only lower."""
    a, w = torch.randn(6400, 512), torch.randn(2048, 512)
    out = torch.empty(6400, 2048)
    torch.mm(a, w.t(), out=out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, w.t(), out=out)
        times.append(time.perf_counter() - t0)
    return 2 * 6400 * 512 * 2048 / min(times)


def run_pair(cell, T, B, I, H, backward, repeats, warmup):
    """Median seconds of (torch.nn, fastrnn) for one case, runs interleaved."""
    torch.manual_seed(0)
    ref_cls, fast_cls = MODULES[cell]
    ref = ref_cls(I, H)
    fast = fast_cls(I, H, backend="cpu")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I, requires_grad=backward)

    def step(module):
        if backward:
            module.zero_grad(set_to_none=True)
            x.grad = None
            module(x)[0].sum().backward()
        else:
            with torch.no_grad():
                module(x)

    for _ in range(warmup):
        step(ref)
        step(fast)
    times = {ref: [], fast: []}
    for _ in range(repeats):
        for module in (ref, fast):
            t0 = time.perf_counter()
            step(module)
            times[module].append(time.perf_counter() - t0)
    return statistics.median(times[ref]), statistics.median(times[fast])


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
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, commit = machine()
    rate = measured_gemm_rate(args.repeats)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} commit {commit}, {model}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, GEMM {rate / 1e9:.0f} GFLOP/s (fp32 6400x512x2048), "
          f"median of {args.repeats}, load average {open('/proc/loadavg').read().split()[0]}")
    print("| cell | T, B, I, H | pass | torch.nn ms | fastrnn ms | ratio | roofline ms | fastrnn % of roofline |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for cell in args.cells.split(","):
        for T, B, I, H in SIZES:
            for backward in (False, True):
                t_ref, t_fast = run_pair(cell, T, B, I, H, backward, args.repeats, args.warmup)
                roof = gemm_flops(cell, T, B, I, H, backward) / rate
                row = dict(cell=cell, T=T, B=B, I=I, H=H, pass_="fwd+bwd" if backward else "fwd",
                           torch_ms=t_ref * 1e3, fastrnn_ms=t_fast * 1e3, ratio=t_ref / t_fast,
                           roofline_ms=roof * 1e3)
                rows.append(row)
                print(f"| {cell} | {T}, {B}, {I}, {H} | {row['pass_']} | {row['torch_ms']:.2f} "
                      f"| {row['fastrnn_ms']:.2f} | {row['ratio']:.2f} | {row['roofline_ms']:.2f} "
                      f"| {100 * roof / t_fast:.0f}% |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=model, commit=commit, torch=torch.__version__, threads=torch.get_num_threads(),
                           gemm_flops=rate, repeats=args.repeats, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
