"""Timing and peak memory of one call, on the CPU (wall clock) or a CUDA device (CUDA events).

Every measurement in the benchmark goes through `measure` and `peak_memory`, so torch.nn and every
backend are timed by the same code.
"""

import contextlib
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Repeats:
    """How many times to call: `warmup` untimed calls, then timed ones until `budget_s` seconds of timed
    calls have passed, but at least `min_reps` and at most `max_reps`."""

    warmup: int
    min_reps: int
    max_reps: int
    budget_s: float


# The runner makes one untimed call of each module before these (it also finds a backend that cannot
# run), so --quick warms up with 2 calls. --quick: about half a second per module and pass keeps the 72
# measurements of the CPU set near 75 s on 2 quiet cores (the largest, LSTM T100-B64 fwd+bwd, takes
# ~0.75 s a call there, so it gets the minimum of 3); --full: 5 s per module and pass, at least 10 calls.
QUICK = Repeats(warmup=1, min_reps=3, max_reps=50, budget_s=0.5)
FULL = Repeats(warmup=3, min_reps=10, max_reps=500, budget_s=5.0)
SMOKE = Repeats(warmup=1, min_reps=2, max_reps=2, budget_s=0.0)


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_once(fn, reset=None):
    if reset is not None:
        reset()
    fn()


def _timed_call(fn, reset, device):
    if reset is not None:
        reset()
    if device.type == "cuda":
        # Events time the GPU work alone; synchronising after each call keeps the host from running
        # ahead, so the next call's events do not also time launch queueing.
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_interleaved(calls, device, repeats):
    """{name: seconds of each timed call} for several {name: (fn, reset)}, timed round-robin: each round
    calls every fn once, so a change in machine speed during the measurement (on a shared 2-core VM two
    back-to-back runs differed by up to 1.8x in p50 when each module was timed in a block of its own)
    slows all of them alike and their ratios, the speedups, stay fair. The rounds take the orders of the fns
    in turn (every permutation, then again), so each fn follows each other one equally often: the call right
    after another pays for what that one left behind (on a VM that hands freed memory back to its host, the
    call right after torch.nn's large frees took 2-4x: docs/cpu.md, "Memory"; at (50,1,64,128) the LSTM module
    right after torch.nn's took ~35 us more than right after fastrnn's, the caches torch.nn's call had filled
    (Intel Xeon with AMX, 2026-12-04). A rotation alone kept one cyclic order: with [torch.nn, auto, cpu], auto
    followed torch.nn in 2 rounds of 3.)
    `reset()` runs before each call, untimed (e.g. dropping .grad so that backward does not time an
    accumulation). Rounds go on until there are min_reps, then until max_reps or budget_s per fn of timed
    calls in all."""
    device = torch.device(device)
    for fn, reset in calls.values():
        for _ in range(repeats.warmup):
            call_once(fn, reset)
    _synchronize(device)
    times = {name: [] for name in calls}
    budget = repeats.budget_s * len(calls)
    rounds, spent = 0, 0.0
    orders = itertools.cycle(itertools.permutations(calls))
    while rounds < repeats.min_reps or (rounds < repeats.max_reps and spent < budget):
        for name in next(orders):
            fn, reset = calls[name]
            seconds = _timed_call(fn, reset, device)
            times[name].append(seconds)
            spent += seconds
        rounds += 1
    return times


def measure(fn, device, repeats, reset=None):
    """Seconds of each timed call of `fn()` alone (see measure_interleaved)."""
    return measure_interleaved({"": (fn, reset)}, device, repeats)[""]


def percentile(values, q):
    """The q-th percentile (0..100) with linear interpolation between the sorted values (numpy's default)."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def peak_memory(fn, device, reset=None):
    """The most bytes allocated at once during one call of `fn()`, above what was allocated before it
    (so weights and inputs are not counted; activations, saved tensors, outputs and gradients are).

    CUDA: the caching allocator's peak statistic. CPU: torch has no CPU allocator statistics, so the
    profiler records every allocation and free of the call and we replay them in time order.
    """
    device = torch.device(device)
    if reset is not None:
        reset()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    # The autograd profiler, not torch.profiler.profile: the latter imports torch._inductor when it
    # starts (3 s here), the former records the same allocation events in 1 ms.
    from torch.autograd.profiler import profile

    prof = profile(profile_memory=True)
    with _stderr_silenced():
        prof.__enter__()
    try:
        fn()
    finally:
        with _stderr_silenced():
            prof.__exit__(None, None, None)
    # Memory events carry +bytes for an allocation and -bytes for a free.
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _stderr_silenced():
    """Kineto writes a 'profiler_start'/'profiler_stop' line to file descriptor 2 from C++ on every
    profile, which would cut through the progress bar; no setting turns it off (KINETO_LOG_LEVEL and
    TORCH_CPP_LOG_LEVEL do not), so the descriptor points to /dev/null while the profiler starts and stops."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
