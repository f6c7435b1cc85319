"""pytest-benchmark microbenchmarks of fastrnn (`pytest bench/ --benchmark-only`).

Sizes come from the case registry (fastrnn/bench/cases.py): the "micro" set when timing, the tiny
"smoke" set under `--benchmark-disable`, which runs each benchmark once untimed (the smoke run CI
affords: it checks that every benchmark still runs, in seconds).
"""

import pytest
import torch

from fastrnn.bench import cases, runner

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Calls per benchmark after one warm-up call: the largest micro case (LSTM T100-B32-H256 fwd+bwd on the
# reference backend) takes ~0.2 s a call on 2 cores, so 10 rounds keep each benchmark near 2 s.
ROUNDS = 10


def pytest_configure(config):
    config.addinivalue_line("markers", "with_torch_nn: also benchmark torch.nn itself, as the baseline")
    config.addinivalue_line("markers", "one_layer: only one-layer, one-direction cases without proj_size")
    config.addinivalue_line("markers", "op_tables: only backends with an op table (not auto: a module's choice)")


def pytest_generate_tests(metafunc):
    """Parametrizes (case, backend) with ids such as 'lstm-T50-B1-I64-H128-reference'."""
    if not {"case", "backend"} <= set(metafunc.fixturenames):
        return
    set_name = "smoke" if metafunc.config.getoption("benchmark_disable", False) else "micro"
    selected = cases.case_set(set_name, DEVICE.type).cases
    if metafunc.definition.get_closest_marker("one_layer"):
        selected = [c for c in selected if c.layers == 1 and not c.bidirectional and not c.proj]
    with_torch_nn = metafunc.definition.get_closest_marker("with_torch_nn") is not None
    names = ([runner.TORCH_NN] if with_torch_nn else []) + runner.benchmark_backends(DEVICE.type)
    if metafunc.definition.get_closest_marker("op_tables"):
        names = [n for n in names if n != runner.AUTO]
    metafunc.parametrize(
        "case, backend", [pytest.param(c, n, id=f"{c.name}-{n}") for c in selected for n in names]
    )


def synchronized(fn):
    """fn, followed by a device synchronisation on CUDA, so that wall-clock timing covers the GPU work."""
    if DEVICE.type != "cuda":
        return fn

    def call():
        fn()
        torch.cuda.synchronize(DEVICE)

    return call
