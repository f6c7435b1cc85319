"""PNG plots from the benchmark's JSON rows (matplotlib, Agg backend; optional).

One figure per run: for each pass, the speedup of each backend over torch.nn per case (top) and the
fraction of the GEMM roofline that torch.nn and each backend reach (bottom). A run made with --base
also shows the base commit's bars, hatched, beside this commit's.
"""

from pathlib import Path

from .machine import slug

_BASELINE = "torch.nn"


def available():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _ordered(values):
    return list(dict.fromkeys(values))


def draw(rows, out, base_rows=None):
    """Draws the rows of one run (and, with base_rows, those of its base) to the PNG file `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("p50_s") is not None]
    base_rows = [r for r in (base_rows or []) if r.get("p50_s") is not None]
    if not rows:
        raise ValueError("no measured rows to plot")
    series = [("", rows)] + ([(f"base {base_rows[0]['commit']}", base_rows)] if base_rows else [])
    passes = _ordered(r["pass"] for r in rows)
    case_names = _ordered(r["case"] for r in rows)
    backends = _ordered(r["backend"] for r in rows)
    bars = [(label, b, group) for label, group in series for b in backends]

    height = 0.32 * len(case_names) * max(1, len(bars) / 3) + 1.5
    fig, axes = plt.subplots(2, len(passes), figsize=(7 * len(passes), 2 * height), squeeze=False, sharey=True)
    colors = {b: f"C{k}" for k, b in enumerate(backends)}
    for col, pass_name in enumerate(passes):
        for row_index, (metric, title) in enumerate((("speedup", "speedup over torch.nn"),
                                                     ("roofline", "fraction of the GEMM rate"))):
            ax = axes[row_index][col]
            shown = [bar for bar in bars if metric == "roofline" or bar[1] != _BASELINE]
            width = 0.8 / max(len(shown), 1)
            for k, (label, backend, group) in enumerate(shown):
                values = {r["case"]: r[metric] for r in group if r["pass"] == pass_name and r["backend"] == backend}
                positions = [i + (k - (len(shown) - 1) / 2) * width for i, c in enumerate(case_names) if c in values]
                heights = [values[c] * (100 if metric == "roofline" else 1) for c in case_names if c in values]
                ax.barh(positions, heights, height=width, color=colors[backend], hatch="//" if label else None,
                        alpha=0.6 if label else 1.0, label=f"{backend} ({label})" if label else backend)
            if metric == "speedup":
                ax.axvline(1.0, color="black", linewidth=0.8)
                ax.set_xscale("log")
                ax.set_xlabel("torch.nn p50 / backend p50 (log; > 1 is faster than torch.nn)")
            else:
                ax.set_xlabel("% of torch.mm FLOP/s (p50)")
            ax.set_title(f"{pass_name}: {title}")
            ax.set_yticks(range(len(case_names)))
            ax.set_yticklabels(case_names, fontsize=8)
            ax.set_ylim(len(case_names) - 0.5, -0.5)  # first case on top (the axis is shared: no invert)
            ax.grid(axis="x", alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
    first = rows[0]
    fig.suptitle(
        f"fastrnn {first['case_set']} on {first['device']} ({first['threads']} threads), commit {first['commit']}, "
        f"{first['date'][:10]}, torch {first['torch']}",
        fontsize=10,
    )
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def add_arguments(parser):
    parser.description = (
        "Draws PNG plots from the benchmark's JSON rows: by default the latest run of each device "
        "(a run made with --base is drawn with its base)."
    )
    parser.add_argument("paths", nargs="*", help="result .jsonl files or directories (default: bench/results)")
    parser.add_argument("--run", help="the run id to draw (default: the latest of each device)")
    parser.add_argument("--base-run", help="a second run id to draw beside it (e.g. an older commit's)")
    parser.add_argument("--out", help="the PNG path (default: <results>/<device>-<run id>.png)")


def run(args):
    from . import report

    if not available():
        print("matplotlib is not installed: pip install matplotlib")
        return 1
    paths = args.paths or [report.DEFAULT_RESULTS_DIR]
    by_run = report.runs(report.read_rows(paths))
    chosen = [args.run] if args.run else report.latest_runs(by_run)
    if not chosen:
        print(f"no benchmark rows in {', '.join(map(str, paths))}")
        return 1
    for run_id in chosen:
        if run_id not in by_run:
            print(f"no run {run_id!r} in {', '.join(map(str, paths))}")
            return 1
        rows = by_run[run_id]
        base_id = args.base_run or rows[0].get("base_run")
        base_rows = by_run.get(base_id, []) if base_id else []
        out = args.out or Path(paths[0] if Path(paths[0]).is_dir() else Path(paths[0]).parent) / (
            f"{slug(rows[0]['device'])}-{run_id}.png"
        )
        print(f"plot: {draw(rows, out, base_rows=base_rows)}")
    return 0
