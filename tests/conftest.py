"""Test set-up: the Triton interpreter when there is no GPU, the `gpu` marker, and what runs where.

TRITON_INTERPRET must be set before triton is first imported (fastrnn imports it lazily, with the triton
backend), so it is set here, at collection time, and only when no CUDA device exists: on a GPU the very
same kernels are compiled for real.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastrnn  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (the parity suite on CUDA tensors)")
    config.addinivalue_line("markers", "slow: compiles something (CMake, nvcc); deselect with -m 'not slow'")
    config.addinivalue_line("markers", "install: pip-installs into a fresh venv (minutes); deselected unless -m install")


def device_backends():
    """(device, backend) pairs to run the parity suite on: every backend available on each device."""
    pairs = [("cpu", b) for b in fastrnn.available_backends("cpu")]
    if torch.cuda.is_available():
        pairs += [("cuda", b) for b in fastrnn.available_backends("cuda")]
    return pairs


def _marks(device):
    return [pytest.mark.gpu] if device == "cuda" else []


def backend_params():
    return [pytest.param(d, b, id=f"{b}-{d}", marks=_marks(d)) for d, b in device_backends()]


def interpreted(device, backend):
    """Triton kernels on CPU tensors run in Triton's interpreter (numpy per program instance, ~1000x slower
    than the reference backend: 20+ minutes for the whole suite on these 2 cores). They get the small cases
    (T <= 7, H <= 8: every form and feature, every cell) and not the long or wide ones; on a GPU the very
    same kernels run every case."""
    return backend == "triton" and device == "cpu"


def case_params(cases, interpreter_cases=None):
    """pytest params (case, device, backend): every case on every backend; an interpreted backend gets
    `interpreter_cases` (default: the cases with T <= 7 and H <= 8)."""
    if interpreter_cases is None:
        interpreter_cases = [c for c in cases if c.T <= 7 and c.H <= 8]
    return [
        pytest.param(c, d, b, id=f"{c.id}-{b}-{d}", marks=_marks(d))
        for d, b in device_backends()
        for c in (interpreter_cases if interpreted(d, b) else cases)
    ]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """FASTRNN_TEST_SHARD=i/n keeps every n-th selected test from the i-th: scripts/gpu.sh runs n pytest
    processes at once on a GPU machine, so that triton compiles kernels on all its cores."""
    shard = os.environ.get("FASTRNN_TEST_SHARD")
    if not shard:
        return
    i, n = (int(v) for v in shard.split("/"))
    keep = [item for k, item in enumerate(items) if k % n == i]
    config.hook.pytest_deselected(items=[item for k, item in enumerate(items) if k % n != i])
    items[:] = keep


def pytest_runtest_logreport(report):
    """FASTRNN_TEST_FAILURE_LOG=path: each failure's report is appended there as it happens. scripts/gpu.sh
    kills a pytest that runs past its time limit, and pytest prints failure details only at the end."""
    path = os.environ.get("FASTRNN_TEST_FAILURE_LOG")
    if path and report.failed:
        with open(path, "a") as f:
            f.write(f"FAILED {report.nodeid} ({report.when}, {report.duration:.1f}s)\n{report.longreprtext}\n\n")
