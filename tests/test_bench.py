"""Smoke tests of `python -m fastrnn bench|check|plot` on tiny sizes, and the pieces with exact answers
(FLOP counts, percentiles). A few seconds in all; the timings themselves are not checked."""

import collections
import io
import json

import numpy as np
import pytest
import torch

import fastrnn
from fastrnn.backends import reference
from fastrnn.bench import cases, check, cli, plot, report, roofline, timing


def test_flops_of_the_fastrnns_default_lstm():
    case = cases.Case("lstm", 100, 64, 512, 512)
    # Input GEMM [6400, 512] x [512, 2048] plus 100 hidden GEMMs [64, 512] x [512, 2048]: the same size.
    forward = 2 * 6400 * 512 * 2048 + 2 * 6400 * 512 * 2048
    assert roofline.flops(case, "fwd") == forward
    assert roofline.flops(case, "fwd+bwd") == 3 * forward


def test_flops_count_every_layer_direction_and_the_projection():
    case = cases.Case("lstm", T=2, B=1, I=3, H=4, layers=2, bidirectional=True, proj=2)
    rows, gates = 2, 16  # T*B, G*H
    layer0 = 2 * rows * (3 * gates + 2 * gates + 4 * 2)  # input (I=3), hidden (Hout=2), projection (H x Hout)
    layer1 = 2 * rows * (4 * gates + 2 * gates + 4 * 2)  # layer 1 reads both directions: I = 2 * Hout = 4
    assert roofline.flops(case, "fwd") == 2 * layer0 + 2 * layer1


def test_percentile_matches_numpy():
    values = [0.3, 0.1, 0.7, 0.2, 0.9, 0.4]
    for q in (0, 20, 50, 80, 100):
        assert timing.percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_interleaved_rounds_take_every_order_so_each_call_follows_each_other_equally():
    """measure_interleaved: every fn once a round, the rounds taking every order in turn, so that within the
    rounds each fn comes right after each other one equally often (the call after another pays for the caches
    and memory that one left: timing.py). A rotation alone (abc, bca, cab) had b after a in every round."""
    order = []
    calls = {name: (lambda name=name: order.append(name), None) for name in "abc"}
    times = timing.measure_interleaved(calls, "cpu", timing.Repeats(warmup=0, min_reps=6, max_reps=6, budget_s=0))
    assert {name: len(t) for name, t in times.items()} == {"a": 6, "b": 6, "c": 6}
    rounds = ["".join(order[k : k + 3]) for k in range(0, 18, 3)]
    assert sorted(rounds) == ["abc", "acb", "bac", "bca", "cab", "cba"]
    follows = collections.Counter(r[i : i + 2] for r in rounds for i in range(2))
    assert set(follows) == {x + y for x in "abc" for y in "abc" if x != y}
    assert set(follows.values()) == {2}


def test_cpu_case_set_is_the_twelve_targets_on_two_threads():
    cpu = cases.case_set("cpu", "cpu")
    assert cpu.threads == 2
    assert {(c.cell, c.T, c.B, c.I, c.H) for c in cpu.cases} == {
        (cell, *size) for cell in cases.CELLS for size in cases.CPU_TARGET_SIZES
    }
    for name in cases.SET_NAMES:
        for device_type in ("cpu", "cuda"):
            names = [c.name for c in cases.case_set(name, device_type).cases]
            assert len(names) == len(set(names)), f"{name}/{device_type} has duplicate cases"


def test_progress_without_a_terminal_writes_one_line_per_measurement():
    stream = io.StringIO()
    progress = report.Progress(2, stream=stream)
    progress.start("lstm fwd torch.nn")
    progress.advance()
    progress.start("lstm fwd reference")
    progress.advance()
    progress.finish()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].startswith("[" + "#" * report.Progress.WIDTH + "] 2/2")
    assert lines[1].endswith("lstm fwd reference")


@pytest.fixture(scope="module")
def smoke_rows(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    status = cli.main(["bench", "--cases", "smoke", "--device", "cpu", "--backends", "auto,reference",
                       "--results", str(results), "--no-plot"])
    assert status == 0
    (path,) = results.glob("*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()], results


def test_bench_writes_a_row_per_case_pass_and_backend(smoke_rows):
    rows, _ = smoke_rows
    smoke = cases.case_set("smoke", "cpu").cases
    assert len(rows) == len(smoke) * len(cases.PASSES) * 3  # torch.nn, auto and reference
    assert {(r["case"], r["pass"], r["backend"]) for r in rows} == {
        (c.name, p, b) for c in smoke for p in cases.PASSES for b in ("torch.nn", "auto", "reference")
    }
    for r in rows:
        assert r["device"] and r["commit"] and r["torch"] == torch.__version__ and r["threads"] >= 1
        assert 0 < r["p20_s"] <= r["p50_s"] <= r["p80_s"]
        assert r["speedup"] == pytest.approx(r["torch_p50_s"] / r["p50_s"])
        assert r["roofline"] == pytest.approx(r["flops"] / r["p50_s"] / r["gemm_flops_per_s"])
        # The roofline reference is the best GEMM path measured in the run; the row names the CPU and ISAs.
        assert r["gemm_flops_per_s"] == max(r["gemm_rates"].values()) and r["gemm_path"] in r["gemm_rates"]
        assert r["cpu"] and r["torch_isa"] == torch.backends.cpu.get_cpu_capability()
        assert r["fastrnn_isa"] in ("default", "avx2", "avx512")
        if r["pass"] == "fwd+bwd":
            assert r["peak_bytes"] > 0, "forward+backward allocates at least the gradients"
        # What each module ran: auto names torch.nn or a concrete backend, the others themselves.
        if r["backend"] == "auto":
            assert r["resolved_backend"] in ["torch.nn"] + fastrnn.available_backends("cpu")
        else:
            assert r["resolved_backend"] == r["backend"]
        # The FMA peak is measured by the extension's loop, or without it taken from the nominal clock.
        assert r["fma_peak_source"] in ("measured", "nominal clock", None)
        if r["fma_peak_source"]:
            assert r["fma_peak_flops_per_s"] > 0 and r["fma_clock_hz"] > 0
    assert all(r["speedup"] == 1.0 for r in rows if r["backend"] == "torch.nn")


def test_the_table_says_what_auto_ran(smoke_rows, capsys):
    rows, results = smoke_rows
    assert cli.main(["report", str(results)]) == 0
    out = capsys.readouterr().out
    for r in rows:
        if r["backend"] == "auto":
            assert f"auto ({r['resolved_backend']})" in out
    assert "FMA peak, fp32:" in out or all(r["fma_peak_source"] is None for r in rows)


def _count_paths(monkeypatch):
    """Counts the calls of torch.nn's own recurrent forwards and of fastrnn's layers (functional.stacked)."""
    from fastrnn import functional

    counts = {"torch.nn": 0, "fastrnn": 0}
    for cls in (torch.nn.LSTM, torch.nn.GRU, torch.nn.RNN):
        original = cls.forward

        def counted(self, *args, _original=original, **kwargs):
            counts["torch.nn"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", counted)
    stacked = functional.stacked

    def counted_stacked(*args, **kwargs):
        counts["fastrnn"] += 1
        return stacked(*args, **kwargs)

    monkeypatch.setattr(functional, "stacked", counted_stacked)
    return counts


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("pass_name", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resolved_backend_is_what_the_forward_runs(monkeypatch, cell, batch, pass_name, dtype):
    # The benchmark's "auto (...)" label comes from resolved_backend; whatever auto's rule is, the label
    # must name the path the forward then takes.
    from fastrnn.bench import runner

    module = getattr(fastrnn, cell)(6, 5).to(dtype)
    x = torch.randn(4, batch, 6, dtype=dtype)
    label = runner.resolved_backend("auto", module, x, pass_name, {})
    counts = _count_paths(monkeypatch)
    call, reset = runner.calls(module, x, torch.randn(4, batch, 5, dtype=dtype), pass_name)
    timing.call_once(call, reset)
    ran = "torch.nn" if counts["torch.nn"] else "fastrnn"
    assert counts[ran] == 1 and counts["torch.nn"] + counts["fastrnn"] == 1
    assert (label == "torch.nn") == (ran == "torch.nn"), (label, counts)
    if ran == "fastrnn":
        assert label == fastrnn.backends.resolve("auto", "cpu")


def test_fma_peak_measured_on_every_capability_and_the_nominal_fallback(monkeypatch):
    try:
        from fastrnn.backends import native
    except ImportError:
        pytest.skip("the extension is not built: only the nominal-clock fallback exists")
    threads = torch.get_num_threads()
    current = native.cpu_capability()
    try:
        for isa in native.built_cpu_capabilities():
            native.set_cpu_capability(isa)
            peak = roofline.fma_peak(isa)
            # Not a timed test: only that each copy's loop runs and the arithmetic of the implied clock holds.
            assert peak["source"] == "measured" and peak["flops"] > 0, isa
            assert peak["clock_hz"] == pytest.approx(peak["flops"] / (roofline.FLOPS_PER_CYCLE[isa] * threads))
    finally:
        native.set_cpu_capability(current)
    monkeypatch.setattr(roofline, "cpu_clock_hz", lambda: 2.5e9)
    nominal = roofline.fma_peak("avx512", threads=2, measure=False)
    assert nominal["source"] == "nominal clock" and nominal["flops"] == 64 * 2 * 2.5e9


def test_each_dtype_has_its_own_roofline_reference(monkeypatch, tmp_path):
    # bf16 runs on other units than fp32 (avx512_bf16, AMX): a bf16 case's reference is the bf16 GEMM rate,
    # measured before and after the cases, each path's best of the two.
    measured = []

    def fake_best_gemm(device, dtype):
        measured.append(dtype)
        rate = {torch.float32: 1e9, torch.bfloat16: 8e9}[dtype]
        # The second measurement finds torch.mm slower (a neighbour's job), oneDNN faster.
        rates = {"torch.mm": rate, "onednn linear": rate / 2} if len(measured) % 2 else {"torch.mm": rate / 3,
                                                                                         "onednn linear": rate / 1.5}
        best = max(rates, key=rates.get)
        return {"rates": rates, "best": best, "best_flops": rates[best]}

    monkeypatch.setattr(roofline, "best_gemm", fake_best_gemm)
    for dtype in ("float32", "bfloat16"):
        status = cli.main(["bench", "--cases", "smoke", "--cells", "rnn", "--dtype", dtype, "--device", "cpu",
                           "--backends", "reference", "--passes", "fwd", "--results", str(tmp_path), "--no-plot",
                           "--no-memory"])
        assert status == 0
    rows = [json.loads(line) for line in next(tmp_path.glob("*.jsonl")).read_text().splitlines()]
    assert measured == [torch.float32] * 2 + [torch.bfloat16] * 2
    assert {r["dtype"]: r["gemm_flops_per_s"] for r in rows} == {"float32": 1e9, "bfloat16": 8e9}
    for r in rows:
        assert r["gemm_path"] == "torch.mm" and r["gemm_rates"]["onednn linear"] == r["gemm_flops_per_s"] / 1.5
        assert r["roofline"] == pytest.approx(r["flops"] / r["p50_s"] / r["gemm_flops_per_s"])
    assert all(r["case"].endswith("-bf16") == (r["dtype"] == "bfloat16") for r in rows)


@pytest.mark.skipif(not plot.available(), reason="matplotlib is not installed")
def test_plot_draws_the_latest_run(smoke_rows, tmp_path):
    _, results = smoke_rows
    out = tmp_path / "plot.png"
    assert cli.main(["plot", str(results), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_check_command_passes_for_the_reference_backend(monkeypatch, capsys):
    # Two of the five variants keep this a smoke test; tests/test_parity.py is the full suite.
    monkeypatch.setattr(check, "VARIANTS", tuple(v for v in check.VARIANTS if v.name in ("lstm-proj", "rnn-relu")))
    assert cli.main(["check", "--device", "cpu", "--backends", "reference"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "4/4 PASS" in out


def test_check_fails_when_a_gradient_is_off_by_one_in_a_thousand(monkeypatch):
    correct = reference.OPS["rnn_bwd"]

    def off_by_a_little(*args):
        dgx, dh0 = correct(*args)
        return dgx * 1.001, dh0

    monkeypatch.setitem(reference.OPS, "rnn_bwd", off_by_a_little)
    variants = [v for v in check.VARIANTS if v.name in ("rnn-tanh", "gru")]
    outcomes = {(o.variant, o.dtype): o for o in check.run_checks("cpu", ["reference"], variants)}
    assert outcomes["rnn-tanh", "fp32"].failed and outcomes["rnn-tanh", "fp64"].failed
    assert not outcomes["gru", "fp32"].failed, "only the RNN backward was broken"


def test_check_fails_when_a_backend_raises(monkeypatch):
    def broken(*args):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(reference.OPS, "gru_fwd", broken)
    variants = [v for v in check.VARIANTS if v.name == "gru"]
    (outcome, _) = check.run_checks("cpu", ["reference"], variants)
    assert outcome.failed and "kernel exploded" in outcome.where


def test_bench_times_auto_on_the_cpu_and_skips_the_triton_interpreter():
    from fastrnn.bench import runner

    names = runner.benchmark_backends("cpu")
    assert "triton" not in names and names[0] == "auto"
    assert set(names) - {"auto"} <= set(fastrnn.available_backends("cpu"))
    assert runner.benchmark_backends("cpu", ["reference", "auto"]) == ["auto", "reference"]


def test_base_run_repeats_this_runs_arguments():
    import argparse

    from fastrnn.bench import compare

    def parse(argv):
        parser = argparse.ArgumentParser()
        cli.bench_parser(parser)
        return parser.parse_args(argv)

    args = parse(["--full", "--cases", "cpu", "--device", "cpu", "--backends", "reference", "--cells", "gru,rnn",
                  "--dtype", "bfloat16",
                  "--passes", "fwd", "--threads", "1", "--no-memory", "--base", "HEAD~1"])
    child = parse(compare.child_argv(args, "cpu")[1:])
    for field in ("mode", "cases", "device", "backends", "cells", "dtype", "passes", "threads", "no_memory"):
        assert getattr(child, field) == getattr(args, field), field
    assert child.base is None and child.no_save and child.no_plot


def test_report_reprints_the_latest_run_as_markdown(smoke_rows, capsys):
    rows, results = smoke_rows
    assert cli.main(["report", str(results), "--markdown"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows)  # header, alignment rule, one line per row
    assert table[1].startswith("| ---") and table[1].rstrip(" |").endswith(":")


def test_a_backend_that_raises_becomes_an_error_row_and_fails_the_run(monkeypatch, tmp_path):
    def broken(*args):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(reference.OPS, "gru_fwd", broken)
    status = cli.main(["bench", "--cases", "smoke", "--cells", "gru", "--device", "cpu", "--backends", "reference",
                       "--passes", "fwd", "--results", str(tmp_path), "--no-plot", "--no-memory"])
    assert status == 1
    (path,) = tmp_path.glob("*.jsonl")
    rows = {r["backend"]: r for r in map(json.loads, path.read_text().splitlines())}
    assert "kernel exploded" in rows["reference"]["error"] and rows["reference"].get("p50_s") is None
    assert rows["torch.nn"]["p50_s"] > 0, "torch.nn is still measured"


def test_issue_11_targets_are_checked_on_the_auto_rows():
    targets = {c.name: cases.target_speedup(c) for c in cases.case_set("cpu", "cpu").cases}
    assert targets["lstm-T100-B64-I512-H512"] == 1.1 and targets["lstm-T200-B8-I128-H128"] == 2.0
    assert targets["gru-T100-B32-I256-H256"] == 1.5 and targets["rnn-T50-B1-I64-H128"] == 3.0
    assert cases.target_speedup(cases.Case("lstm", 100, 64, 512, 512, dtype="bfloat16")) is None
    assert cases.target_speedup(cases.Case("gru", 100, 64, 512, 512, layers=2)) is None

    def row(case, backend, speedup, resolved):
        return {**case.fields(), "case": case.name, "pass": "fwd", "backend": backend, "speedup": speedup,
                "resolved_backend": resolved, "device_type": "cpu", "threads": 2}

    lstm, gru = cases.Case("lstm", 100, 64, 512, 512), cases.Case("gru", 50, 1, 64, 128)
    rows = [row(lstm, "auto", 1.2, "torch.nn"), row(gru, "auto", 2.5, "cpu"), row(gru, "cpu", 0.1, "cpu")]
    lines = report.targets(rows)
    assert lines[0] == "issue 11 targets (torch.nn / auto, 2 threads): 1 of 2 met"
    assert lines[1:] == ["  missed: gru-T50-B1-I64-H128 fwd 2.50x < 3.0x (auto ran cpu)",
                         "noise: on the 1 line(s) where auto ran torch.nn itself the ratio spans 1.20x-1.20x "
                         "(1.00x on a quiet machine)"]
    assert report.targets([row(gru, "cpu", 0.1, "cpu")]) == []
    # With the run's numbers the line says what the target asks: FLOPs x target / torch.nn's time, against the
    # best GEMM measured in the run and the FMA peak (2 GFLOP in 10 ms at 3x: 600 GFLOP/s).
    rates = {"flops": 2e9, "torch_p50_s": 0.01, "gemm_flops_per_s": 400e9, "fma_peak_flops_per_s": 500e9}
    line = report.targets([{**row(gru, "auto", 2.5, "cpu"), **rates}])[1]
    assert line == ("  missed: gru-T50-B1-I64-H128 fwd 2.50x < 3.0x (auto ran cpu): needs 600 GFLOP/s "
                    "(150% of the best GEMM, 120% of the FMA peak)")
