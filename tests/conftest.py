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


def device_backends():
    """(device, backend) pairs to run the parity suite on: every backend available on each device."""
    pairs = [("cpu", b) for b in fastrnn.available_backends("cpu")]
    if torch.cuda.is_available():
        pairs += [("cuda", b) for b in fastrnn.available_backends("cuda")]
    return pairs


def backend_params():
    return [
        pytest.param(d, b, id=f"{b}-{d}", marks=[pytest.mark.gpu] if d == "cuda" else [])
        for d, b in device_backends()
    ]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
