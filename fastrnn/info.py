"""`python -m fastrnn info`: what this install is and what it can run, for bug reports and set-up checks.

It compiles nothing: a compiled extension not built yet is reported as missing, with the reason and where
the first use will compile it.
"""

import os
import platform
import sys

import torch

from . import __version__, _build, _jit
from .bench.machine import cpu_name


def _triton_version():
    try:
        import triton
    except ImportError as e:
        return f"not installed ({e})"
    return triton.__version__


def _gpus():
    if not torch.cuda.is_available():
        return ["none visible" + ("" if torch.version.cuda else " (torch is a CPU build)")]
    lines = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        lines.append(f"{i}: {p.name}, sm {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    return lines


def _extension_lines():
    lines = []
    for s in _jit.describe():
        what = f"fastrnn.{s.name} ({s.isa}, {'CPU+CUDA' if s.cuda else 'CPU only'})"
        lines.append(f"{what}: {s.how}" + (f", {s.where}" if s.where else "") + (f"\n    {s.why}" if s.why else ""))
    plan = _jit.plan()
    if isinstance(plan, str):
        lines.append(f"compile on first use: no ({plan})")
    else:
        cuda = f", CUDA archs {plan.cuda_archs}" if plan.cuda_archs else f"; no CUDA kernels: {plan.why_no_cuda}"
        sources = os.path.join(plan.root, "csrc")
        lines.append(f"compile on first use: sources {sources}, cache {_jit.cache_root()}{cuda}")
        for spec in plan.specs:
            lines.append(f"  {spec.name} flags: {' '.join(spec.cxx_flags)}")
    lines.append(f"FASTRNN_EXTENSION={os.environ.get('FASTRNN_EXTENSION', 'auto')}")
    return lines


def _kernel_isa(cpu_backends):
    """The instruction set the CPU kernels run (csrc/cpu/dispatch.cpp chose it when the extension loaded)."""
    if "cpu" not in cpu_backends:
        return "nothing (the compiled extension is not loaded)"
    from .backends import native

    return f"{native.cpu_capability()} (built and runnable here: {', '.join(native.built_cpu_capabilities())})"


def lines():
    from .backends import available_backends

    capability = torch.backends.cpu.get_cpu_capability()
    with _jit.no_compile():
        backends = {device: available_backends(device) for device in ("cpu", "cuda")}
    out = [
        f"fastrnn {__version__} ({os.path.dirname(os.path.abspath(__file__))})",
        f"python {platform.python_version()} ({sys.executable})",
        f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none (CPU build)'}, triton {_triton_version()}",
        f"CPU: {cpu_name()} ({platform.machine()}), {os.cpu_count()} logical cores, torch's CPU capability "
        f"{capability}; fastrnn's CPU kernels run {_kernel_isa(backends['cpu'])}",
        "compiled extension:",
        *("  " + line for line in _extension_lines()),
        "GPUs:",
        *("  " + line for line in _gpus()),
        f"backends: cpu {backends['cpu']}, cuda {backends['cuda'] if torch.cuda.is_available() else '(no GPU)'}",
    ]
    return out


def main():
    print("\n".join(lines()))
    return 0
