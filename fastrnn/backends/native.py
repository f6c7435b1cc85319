"""The compiled extension's recurrence ops, torch.ops.fastrnn.* (backends `cpu` and `cuda`).

csrc/ops.cpp declares the six schemas of docs/contract.md once; csrc/cpu/*.cpp registers the CPU
kernels and csrc/cuda/bindings.cpp the CUDA ones, and the dispatcher picks by the tensors' device.
The fake (meta) kernels are the shared Python ones of schemas.py. Importing this module raises
ImportError when the extension is neither prebuilt nor compiled on first use (fastrnn/_jit.py), or cannot run
here; the registry then warns once and backend="auto" falls back to the reference backend.
"""

import os
import platform

import torch

from .. import _jit
from .schemas import FAKES, register_fakes


def _check_cpu():
    # On x86-64 fastrnn._C is built with AVX2+FMA by default (setup.py, FASTRNN_CPU_CAPABILITY), so that
    # at::vec uses 256-bit registers; loading it on a CPU without them would die of an illegal instruction
    # rather than raise. A portable build (FASTRNN_CPU_CAPABILITY=default) says so with the same variable.
    if platform.machine() not in ("x86_64", "AMD64") or os.environ.get("FASTRNN_CPU_CAPABILITY") == "default":
        return
    if not torch.cpu._is_avx2_supported():
        raise ImportError(
            "fastrnn._C is built for AVX2+FMA CPUs and this CPU has no AVX2; rebuild it with "
            "FASTRNN_CPU_CAPABILITY=default (and set the same variable when running)"
        )


_check_cpu()

# The prebuilt fastrnn._C, else the one compiled on first use (fastrnn/_jit.py); the ops register themselves
# as the library loads. Raises ImportError with the reason and how to get the compiled ops.
EXTENSIONS = _jit.load()

register_fakes("fastrnn")

OPS = {name: getattr(torch.ops.fastrnn, name) for name in FAKES}


def _has_kernel(dispatch_key):
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"fastrnn::{name}", dispatch_key) for name in OPS)


def devices():
    """cpu always; cuda when the extension was built with its CUDA kernels and a GPU is visible."""
    found = ["cpu"]
    if torch.cuda.is_available() and _has_kernel("CUDA"):
        found.append("cuda")
    return tuple(found)
