"""The command line: `python -m fastrnn bench` (timings), `check` (parity), `plot` (PNG from the rows),
`report` (a run's table again, as text or Markdown), `info` (fastrnn/info.py)."""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from . import cases, timing

REPEATS = {"quick": timing.QUICK, "full": timing.FULL, "smoke": timing.SMOKE}


def _default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _names(text):
    return [name.strip() for name in text.split(",") if name.strip()]


def bench_parser(parser):
    parser.description = (
        "Times forward and forward+backward of torch.nn and of each available fastrnn backend on the cases "
        "of a set, prints a table and appends JSON rows to the results directory."
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="the quick set, few repeats (default; about 3 minutes on 2 quiet CPU cores)")
    size.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="the full set, many repeats")
    parser.set_defaults(mode="quick")
    parser.add_argument("--cases", choices=cases.SET_NAMES,
                        help="a named case set instead of the mode's own (e.g. 'cpu': the CPU kernel's 12 targets)")
    parser.add_argument("--device", default=_default_device(), help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--backends", type=_names, help="comma-separated backends (default: all available)")
    parser.add_argument("--cells", type=_names, help=f"comma-separated subset of {','.join(cases.CELLS)}")
    parser.add_argument("--dtype", choices=list(cases.DTYPES),
                        help="run every case of the set in this dtype (default: each case's own, mostly float32)")
    parser.add_argument("--passes", type=_names, default=list(cases.PASSES),
                        help="comma-separated subset of fwd,fwd+bwd")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for CPU runs (default: the set's)")
    parser.add_argument("--results", default=None, help="directory of the JSON rows (default: bench/results)")
    parser.add_argument("--no-save", action="store_true", help="do not append the rows to the results")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the PNG plot")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory call of each measurement")
    parser.add_argument("--base", metavar="REV", help="also run git revision REV's kernels and compare")
    parser.add_argument("--label", default="", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)


def run_bench(args):
    from . import report, runner

    device = torch.device(args.device)
    set_name = args.cases or args.mode
    case_set = cases.case_set(set_name, device.type)
    for kind, wanted, known in (("cell", args.cells or [], cases.CELLS), ("pass", args.passes, cases.PASSES)):
        unknown = sorted(set(wanted) - set(known))
        if unknown:
            sys.exit(f"fastrnn bench: unknown {kind}(s) {unknown}; expected some of {list(known)}")
    selected = [dataclasses.replace(c, dtype=args.dtype or c.dtype) for c in case_set.cases
                if args.cells is None or c.cell in args.cells]
    if not selected or not args.passes:
        sys.exit(f"fastrnn bench: the {case_set.name!r} set has no case for cells {args.cells}")
    case_set = cases.CaseSet(case_set.name, tuple(selected), case_set.threads, case_set.help)
    threads = args.threads or case_set.threads
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)
    try:
        backends = runner.benchmark_backends(device.type, args.backends)
    except ValueError as e:
        sys.exit(f"fastrnn bench: {e}")
    repeats = REPEATS.get(set_name, REPEATS[args.mode])
    results_dir = args.results or report.DEFAULT_RESULTS_DIR

    base_rows = []
    if args.base:
        from . import compare

        base_rows = compare.run_base(args.base, args, set_name)

    total = len(case_set.cases) * len(args.passes) * (1 + len(backends))
    print(f"fastrnn bench: {len(case_set.cases)} cases ({case_set.name}: {case_set.help}) x {args.passes} x "
          f"torch.nn + {backends} on {device}, {torch.get_num_threads()} threads", file=sys.stderr)
    progress = report.Progress(total)
    rows = runner.run(case_set, device, backends, args.passes, repeats, progress,
                      measure_memory=not args.no_memory, label=args.label)
    progress.finish()
    for row in rows:
        row["base_run"] = base_rows[0]["run_id"] if base_rows else None

    if args.json_out:
        # A --base child process: the parent reports and saves.
        with open(args.json_out, "w") as f:
            json.dump(rows, f)
        return 0
    for line in report.header(rows) + [""] + report.table(rows) + [""] + report.targets(rows):
        print(line)
    if base_rows:
        print(f"\nagainst {args.base} (p50; base/this > 1: this commit is faster; torch.nn's own ratio is the noise):")
        for line in report.comparison(base_rows, rows):
            print(line)
    if not args.no_save:
        for path in report.append_rows(base_rows + rows, results_dir):
            print(f"\nrows appended to {path}")
    if not args.no_plot:
        _plot(rows, base_rows, results_dir)
    errors = [r for r in rows if "error" in r]
    for r in errors:
        print(f"ERROR {r['case']} {r['pass']} {r['backend']}: {r['error']}", file=sys.stderr)
    return 1 if errors else 0


def _plot(rows, base_rows, results_dir):
    from . import plot, report
    from .machine import slug

    if not plot.available():
        print("matplotlib is not installed: no plot (pip install matplotlib, then python bench/plot.py)")
        return
    out = Path(results_dir) / f"{slug(rows[0]['device'])}-{rows[0]['run_id']}.png"
    plot.draw(rows, out, base_rows=base_rows)
    print(f"plot: {out}")


def check_parser(parser):
    parser.description = (
        "Parity of every available backend against torch.nn on this machine: outputs and gradients of small "
        "LSTM/GRU/RNN modules in fp32 and fp64 against torch.nn in fp64 on the CPU. Exit status 1 on any FAIL."
    )
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        help="check one device only (default: the CPU, and CUDA when present)")
    parser.add_argument("--backends", type=_names, help="comma-separated backends (default: all available)")


def run_check(args):
    from . import check

    return check.main([args.device] if args.device else None, args.backends)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastrnn", description="fastrnn's benchmark and checks")
    commands = parser.add_subparsers(dest="command", required=True)
    bench_parser(commands.add_parser("bench", help="time every backend against torch.nn"))
    check_parser(commands.add_parser("check", help="parity of every backend against torch.nn"))
    from . import plot, report

    plot.add_arguments(commands.add_parser("plot", help="draw PNG plots from the JSON rows"))
    report.add_arguments(commands.add_parser("report", help="print a run's table again from the JSON rows"))
    commands.add_parser("info", help="versions, the compiled extension's state, CPU/ISA, GPUs and backends")
    args = parser.parse_args(argv)
    if args.command == "bench":
        return run_bench(args)
    if args.command == "check":
        return run_check(args)
    if args.command == "info":
        from .. import info

        return info.main()
    return plot.run(args) if args.command == "plot" else report.run(args)
