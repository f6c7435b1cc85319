"""Build of fastrnn and its compiled extension fastrnn._C (docs/cpu.md, "Build").

    pip install --no-build-isolation -e .

builds fastrnn._C against the torch already installed: a CppExtension (csrc/ops.cpp, the CPU dispatcher and
the portable copy of the CPU kernels) on a CPU torch; a CUDAExtension that adds csrc/cuda/*.cu and
csrc/cuda/bindings.cpp when torch has CUDA, nvcc is found and FASTRNN_SKIP_CUDA_BUILD is not set. On x86-64
also fastrnn._C_avx2 and fastrnn._C_avx512: the same CPU kernels compiled for those instruction sets, one of
which fastrnn._C loads at run time when the CPU has it (fastrnn/_build_cpu.py, docs/cpu.md "ISA dispatch").

Switches (environment):
  FASTRNN_SKIP_CUDA_BUILD=1   CPU kernels only, even with a CUDA torch and nvcc
  FASTRNN_CUDA_ARCHS          CUDA architectures, default "8.0;9.0" (torch's TORCH_CUDA_ARCH_LIST format)
  FASTRNN_CPU_CAPABILITIES    the CPU capabilities to build besides the portable one, comma-separated
                              (default on x86-64: "avx2,avx512"; "" is the same; e.g. "avx2" builds faster).
                              Which one runs is chosen at run time (FASTRNN_CPU_CAPABILITY lowers it).
  MAX_JOBS                    parallel compile jobs (torch's cpp_extension)
"""

import glob
import importlib.util
import os

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as e:
    # pip's default build isolation would build in a fresh environment, where a torch from the index
    # (a CUDA build, GBs) would have to be installed to compile against. fastrnn._C must be built against
    # the torch it will run with, so the build insists on the one already installed.
    raise RuntimeError(
        "fastrnn: building the extension needs the torch you will run it with, importable at build time "
        f"({e}). Install torch first, then build without isolation: pip install --no-build-isolation -e ."
    ) from e

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _load_build_cpu():
    # fastrnn/_build_cpu.py by path: importing the fastrnn package here would import the half-built extension.
    spec = importlib.util.spec_from_file_location("_fastrnn_build_cpu", os.path.join(ROOT, "fastrnn", "_build_cpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD_CPU = _load_build_cpu()


def _extensions():
    sources = list(BUILD_CPU.OP_LIBRARY_SOURCES)
    cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    bindings = os.path.join("csrc", "cuda", "bindings.cpp")
    # The flags' reasons are in fastrnn/_build_cpu.py.
    cxx = BUILD_CPU.COMMON_CXX_FLAGS + BUILD_CPU.OP_LIBRARY_CXX_FLAGS + ["-DFASTRNN_PYTHON_MODULE"]
    # The capability libraries come after fastrnn._C: dispatch.cpp finds them next to it at run time.
    capabilities = [
        CppExtension(name, srcs, extra_compile_args={"cxx": flags}, extra_link_args=BUILD_CPU.LINK_FLAGS)
        for name, srcs, flags in BUILD_CPU.capability_libraries()
    ]
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and not os.environ.get("FASTRNN_SKIP_CUDA_BUILD")
        and bool(cuda_sources)
        and os.path.exists(os.path.join(ROOT, bindings))
    )
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("FASTRNN_CUDA_ARCHS", "8.0;9.0")
        return [CUDAExtension(
            "fastrnn._C",
            sources + cuda_sources + [bindings],
            extra_compile_args={"cxx": cxx + ["-DFASTRNN_WITH_CUDA"], "nvcc": ["-O3", "-DFASTRNN_WITH_CUDA"]},
            extra_link_args=BUILD_CPU.LINK_FLAGS,
        )] + capabilities
    return [CppExtension("fastrnn._C", sources, extra_compile_args={"cxx": cxx},
                         extra_link_args=BUILD_CPU.LINK_FLAGS)] + capabilities


setup(
    name="fastrnn",
    version="0.1.0",
    description="Fused Triton and C++/CUDA kernels for drop-in PyTorch LSTM/GRU/RNN",
    packages=find_packages(include=["fastrnn", "fastrnn.*"]),
    python_requires=">=3.10",
    # No upper bound and no pin: a pin could make pip replace the torch the extension was built against.
    install_requires=["torch>=2.4"],
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
