"""What the benchmark shows and keeps: the progress line, the tables, and the JSON rows on disk.

Rows are JSON Lines (one JSON object per line), appended to bench/results/<device>.jsonl, so runs on
one device accumulate in one file and every row carries its run id, commit and date.
"""

import json
import sys
import time
from pathlib import Path

from .machine import REPO_DIR, slug

DEFAULT_RESULTS_DIR = (REPO_DIR / "bench" / "results") if REPO_DIR else Path("fastrnn-bench-results")


class Progress:
    """A progress line on stderr: a bar redrawn in place on a terminal, or one line per finished
    measurement otherwise (logs, CI), so the output stays readable either way."""

    WIDTH = 24

    def __init__(self, total, stream=None):
        self.total, self.done = total, 0
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty()
        self.started = time.monotonic()
        self.text = ""

    def _line(self):
        elapsed = time.monotonic() - self.started
        filled = self.WIDTH * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        left = f", ~{_clock(elapsed / self.done * (self.total - self.done))} left" if self.done else ""
        return f"[{bar}] {self.done}/{self.total} {_clock(elapsed)}{left}  {self.text}"

    def start(self, text):
        self.text = text
        if self.interactive:
            self.stream.write("\r\033[K" + self._line())
            self.stream.flush()

    def advance(self, steps=1):
        self.done += steps
        if self.interactive:
            self.stream.write("\r\033[K" + self._line())
        else:
            self.stream.write(self._line() + "\n")
        self.stream.flush()

    def finish(self):
        if self.interactive:
            self.stream.write("\r\033[K")
            self.stream.flush()


def _clock(seconds):
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


def format_seconds(seconds):
    """Milliseconds with 3 significant digits, e.g. 0.000123 -> '0.123', 1.5 -> '1500'."""
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 1000 else f"{ms:.0f}"


def _mib(nbytes):
    return "-" if nbytes is None else f"{nbytes / 2**20:.1f}"


def _ratio(value):
    return "-" if value is None else f"{value:.2f}x"


def _percent(value):
    """'12.3%', or two significant digits below 1% ('0.047%') so tiny cases do not all read 0.0%."""
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if value >= 0.01 else f"{100 * value:.2g}%"


def header(rows):
    """The lines that say where a run was measured."""
    if not rows:
        return []
    first = rows[0]
    lines = [
        f"device: {first['device']} ({first['device_type']}, {first['threads']} threads)   "
        f"commit: {first['commit']}   date: {first['date']}",
        f"torch {first['torch']}   triton {first['triton']}   python {first['python']}   "
        f"case set: {first['case_set']}   run: {first['run_id']}",
    ]
    if first["device_type"] == "cpu" or first.get("fastrnn_isa"):
        lines.append(f"CPU ISA: fastrnn {first.get('fastrnn_isa')}, torch {first.get('torch_isa')}")
    rates = {}
    for row in rows:
        rates.setdefault(row["dtype"], row)
    lines.append(
        "GEMM rate (best path measured in this run, the roofline): "
        + "; ".join(f"{dtype} {r['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s ({_gemm_paths(r)})"
                    for dtype, r in rates.items())
    )
    peak = next((r for r in rows if r.get("fma_peak_flops_per_s")), None)
    if peak:
        lines.append(f"FMA peak, fp32: {peak['fma_peak_flops_per_s'] / 1e9:.0f} GFLOP/s ({_peak_how(peak)})")
    return lines


def _gemm_paths(row):
    """'torch.mm; onednn linear 300, fastrnn linear 350': the best path, then the others' GFLOP/s."""
    best = row.get("gemm_path", "torch.mm")
    others = [f"{path} {rate / 1e9:.0f}" for path, rate in (row.get("gemm_rates") or {}).items() if path != best]
    return "; ".join([best] + ([", ".join(others)] if others else []))


def _peak_how(row):
    """How the row's FMA peak was found: measured (and the clock it implies) or the nominal clock's formula;
    rows from before the measured peak carry neither field."""
    isa, threads, clock = row.get("fastrnn_isa"), row["threads"], row.get("fma_clock_hz")
    if row.get("fma_peak_source") == "measured":
        return f"measured: {isa} FMA loop on {threads} threads, {clock / 1e9:.2f} GHz at 2 FMA units"
    if row.get("fma_peak_source") == "nominal clock":
        return f"{isa} lanes x 2 FMA units x {threads} threads x nominal clock {clock / 1e9:.2f} GHz, not measured"
    return "ISA lanes x 2 FMA units x threads x nominal clock"


def backend_label(row):
    """The backend column: the backend, and for backend="auto" what it ran in that case and pass, e.g.
    'auto (torch.nn)' or 'auto (cpu)'."""
    resolved = row.get("resolved_backend")
    return f"{row['backend']} ({resolved})" if resolved and resolved != row["backend"] else row["backend"]


def table(rows, markdown=False):
    """The results as an aligned text (or Markdown) table, one line per case, pass and backend."""
    columns = ["case", "pass", "backend", "p50 ms", "p20-p80 ms", "peak MiB", "vs torch.nn", "roofline"]
    lines = []
    previous = (None, None)
    for row in rows:
        # The case and pass are written once, on the first line of their group.
        case = row["case"] if row["case"] != previous[0] else ""
        pass_name = row["pass"] if (row["case"], row["pass"]) != previous else ""
        previous = (row["case"], row["pass"])
        if "error" in row:
            lines.append([case, pass_name, backend_label(row), "ERROR", row["error"][:60], "", "", ""])
            continue
        lines.append([
            case, pass_name, backend_label(row), format_seconds(row["p50_s"]),
            f"{format_seconds(row['p20_s'])}-{format_seconds(row['p80_s'])}", _mib(row["peak_bytes"]),
            _ratio(row["speedup"]), _percent(row["roofline"]),
        ])
    return _align([columns] + lines, markdown)


def targets(rows):
    """Issue 11's targets (torch.nn / backend="auto", cases.target_speedup) against the `auto` rows of a run that
    has them: one summary line and a line per missed row; [] when the run has no auto row at a target size."""
    from .cases import Case, target_speedup

    checked = []
    for row in rows:
        if row["backend"] != "auto" or row.get("speedup") is None or row["device_type"] != "cpu":
            continue
        case = Case(**{f: row[f] for f in Case.__dataclass_fields__})
        target = target_speedup(case)
        if target is not None:
            checked.append((row, target))
    if not checked:
        return []
    missed = [(row, target) for row, target in checked if row["speedup"] < target]
    lines = [f"issue 11 targets (torch.nn / auto, {checked[0][0]['threads']} threads): "
             f"{len(checked) - len(missed)} of {len(checked)} met"]
    lines += [f"  missed: {row['case']} {row['pass']} {_ratio(row['speedup'])} < {target:.1f}x "
              f"(auto ran {row.get('resolved_backend')}){_needed_rate(row, target)}" for row, target in missed]
    # Where auto ran torch.nn itself, the ratio is 1.00 but for the noise (and a few us of auto's own checks):
    # the spread of those lines says how far this run's ratios can be trusted.
    same = [row["speedup"] for row, _ in checked if row.get("resolved_backend") == "torch.nn"]
    if same:
        lines.append(f"noise: on the {len(same)} line(s) where auto ran torch.nn itself the ratio spans "
                     f"{_ratio(min(same))}-{_ratio(max(same))} (1.00x on a quiet machine)")
    return lines


def _needed_rate(row, target):
    """What a missed target asks of the machine: the layer's FLOPs (only the products, roofline.py) in torch.nn's
    time divided by the target, as GFLOP/s and as a share of the best GEMM path measured in the same run and of the
    FMA peak. A share near or past 100% of the best GEMM says the target is out of reach for the whole layer,
    sequential steps and all, on this machine; '' where the row lacks the numbers."""
    flops, torch_s = row.get("flops"), row.get("torch_p50_s")
    if not flops or not torch_s:
        return ""
    needed = flops * target / torch_s
    peaks = (("gemm_flops_per_s", "best GEMM"), ("fma_peak_flops_per_s", "FMA peak"))
    shares = [f"{100 * needed / row[key]:.0f}% of the {name}" for key, name in peaks if row.get(key)]
    return f": needs {needed / 1e9:.0f} GFLOP/s" + (f" ({', '.join(shares)})" if shares else "")


def _align(lines, markdown=False):
    """Text columns (the first three) flush left, numbers flush right; Markdown says the same with its
    alignment row."""
    widths = [max(len(line[k]) for line in lines) for k in range(len(lines[0]))]
    left = {0, 1, 2}
    out = []
    for line in lines:
        cells = [c.ljust(w) if k in left else c.rjust(w) for k, (c, w) in enumerate(zip(line, widths))]
        out.append("| " + " | ".join(cells) + " |" if markdown else "  ".join(cells).rstrip())
    if markdown:
        rule = ["-" * w if k in left else "-" * (w - 1) + ":" for k, w in enumerate(widths)]
        out.insert(1, "| " + " | ".join(rule) + " |")
    return out


def comparison(base_rows, rows):
    """p50 of the base commit against this one, for every (case, pass, backend) both measured."""
    base = {(r["case"], r["pass"], r["backend"]): r for r in base_rows if r.get("p50_s") is not None}
    lines = [["case", "pass", "backend", "base ms", "this ms", "base/this"]]
    for row in rows:
        old = base.get((row["case"], row["pass"], row["backend"]))
        if old is None or row.get("p50_s") is None:
            continue
        lines.append([
            row["case"], row["pass"], backend_label(row), format_seconds(old["p50_s"]), format_seconds(row["p50_s"]),
            _ratio(old["p50_s"] / row["p50_s"]),
        ])
    if len(lines) == 1:
        return ["(no measurement in common with the base run)"]
    return _align(lines)


def results_path(results_dir, device):
    return Path(results_dir) / f"{slug(device)}.jsonl"


def append_rows(rows, results_dir):
    """Appends rows to <results_dir>/<device>.jsonl; returns the paths written."""
    paths = {}
    for row in rows:
        paths.setdefault(results_path(results_dir, row["device"]), []).append(row)
    for path, group in paths.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            for row in group:
                f.write(json.dumps(row, sort_keys=True) + "\n")
    return list(paths)


def runs(rows):
    """{run_id: rows}, in the order the runs were made."""
    by_run = {}
    for row in sorted(rows, key=lambda r: (r["date"], r["run_id"])):
        by_run.setdefault(row["run_id"], []).append(row)
    return by_run


def latest_runs(by_run):
    """The id of the latest run on each device (not counting the rows of --base revisions)."""
    latest = {}
    for run_id, group in by_run.items():
        if not group[0]["label"]:
            latest[group[0]["device"]] = run_id
    return list(latest.values())


def add_arguments(parser):
    parser.description = "Prints the table of a benchmark run again from its JSON rows (the latest by default)."
    parser.add_argument("paths", nargs="*", help="result .jsonl files or directories (default: bench/results)")
    parser.add_argument("--run", help="the run id (default: the latest of each device)")
    parser.add_argument("--markdown", action="store_true", help="a Markdown table (for docs/benchmarks.md)")


def run(args):
    paths = args.paths or [DEFAULT_RESULTS_DIR]
    by_run = runs(read_rows(paths))
    chosen = [args.run] if args.run else latest_runs(by_run)
    missing = [r for r in chosen if r not in by_run]
    if not chosen or missing:
        print(f"no run {missing or ''} in {', '.join(map(str, paths))}")
        return 1
    for run_id in chosen:
        group = by_run[run_id]
        for line in header(group) + [""] + table(group, markdown=args.markdown) + [""] + targets(group):
            print(line)
    return 0


def read_rows(paths):
    """Every row of the given .jsonl files (or of every .jsonl file in the given directories)."""
    rows = []
    for path in map(Path, paths):
        files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        for file in files:
            with open(file) as f:
                rows.extend(json.loads(line) for line in f if line.strip())
    return rows
