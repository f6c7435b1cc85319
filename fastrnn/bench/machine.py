"""What a result row says about where it was measured: device name, commit, versions, threads."""

import os
import platform
import re
import subprocess
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent.parent
# The checkout the package runs from, if it is one (bench/ sits beside fastrnn/).
REPO_DIR = PACKAGE_DIR.parent if (PACKAGE_DIR.parent / "bench").is_dir() else None


def cpu_name():
    """The CPU model, from /proc/cpuinfo (Linux), else whatever platform reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def slug(text):
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (for file names)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)


def commit(repo_dir=None):
    """The short commit hash of the checkout, with '-dirty' when tracked files differ from it, or
    'unknown' outside a git checkout (an installed package)."""
    repo_dir = repo_dir or REPO_DIR or PACKAGE_DIR
    try:
        head = _git("rev-parse", "--short=12", "HEAD", cwd=repo_dir)
        if head.returncode != 0:
            return "unknown"
        dirty = _git("status", "--porcelain", "--untracked-files=no", cwd=repo_dir)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def versions():
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
    }


def cpu_isa():
    """{fastrnn_isa: the instruction set fastrnn's CPU kernels run (None without the extension),
    torch_isa: torch's own (torch.backends.cpu.get_cpu_capability(): what oneDNN/torch.nn use)}."""
    try:
        from ..backends import native

        ours = native.cpu_capability()
    except ImportError:
        ours = None
    return {"fastrnn_isa": ours, "torch_isa": torch.backends.cpu.get_cpu_capability()}


def environment(device):
    """The fields every row of one run shares (the CPU's ISA paths also on CUDA rows: the host runs the
    reference parts and the benchmark's own loop there)."""
    device = torch.device(device)
    return {
        "device": device_name(device),
        "device_type": device.type,
        "cpu": cpu_name(),
        **cpu_isa(),
        "commit": commit(),
        **versions(),
        "threads": torch.get_num_threads(),
        "host_cpus": os.cpu_count(),
    }
