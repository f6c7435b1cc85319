"""Build of fastrnn and its compiled extension fastrnn._C (docs/cpu.md, "Build").

    pip install --no-build-isolation -e .

builds fastrnn._C against the torch already installed: a CppExtension (csrc/ops.cpp + csrc/cpu/*.cpp)
on a CPU torch; a CUDAExtension that adds csrc/cuda/*.cu and csrc/cuda/bindings.cpp when torch has CUDA,
nvcc is found and FASTRNN_SKIP_CUDA_BUILD is not set.

Switches (environment):
  FASTRNN_SKIP_CUDA_BUILD=1   CPU kernels only, even with a CUDA torch and nvcc
  FASTRNN_CUDA_ARCHS          CUDA architectures, default "8.0;9.0" (torch's TORCH_CUDA_ARCH_LIST format)
  FASTRNN_CPU_CAPABILITY      "avx2" (default on x86-64: AVX2+FMA+F16C, at::vec on 256-bit registers) or
                              "default" (portable; at::vec falls back to plain loops, ~3x slower gates)
  MAX_JOBS                    parallel compile jobs (torch's cpp_extension)
"""

import glob
import os
import platform

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


def _cpu_flags():
    default = "avx2" if platform.machine() in ("x86_64", "AMD64") else "default"
    capability = os.environ.get("FASTRNN_CPU_CAPABILITY", default)
    if capability == "avx2":
        # ATen's at::vec picks its 256-bit implementation from CPU_CAPABILITY_AVX2, as torch's own
        # kernels do; the library then needs an AVX2+FMA CPU (fastrnn/backends/native.py checks).
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    if capability == "default":
        return []
    raise RuntimeError(f"fastrnn: FASTRNN_CPU_CAPABILITY must be 'avx2' or 'default', got {capability!r}")


def _extension():
    sources = _rel([os.path.join(ROOT, "csrc", "ops.cpp")] + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    bindings = os.path.join("csrc", "cuda", "bindings.cpp")
    # -Wno-unknown-pragmas: torch's at::vec headers carry `#pragma unroll`, which gcc ignores (hundreds of lines).
    # -fopenmp: at::parallel_for is an inline `#pragma omp parallel` in torch's headers (AT_PARALLEL_OPENMP);
    # compiled without it, every parallel_for silently runs on one thread. The library then needs libgomp.so.1,
    # which torch has already loaded (torch/lib ships it), so there is one OpenMP runtime and one thread pool.
    cxx = ["-O3", "-Wno-unknown-pragmas", "-fopenmp", "-DFASTRNN_PYTHON_MODULE"] + _cpu_flags()
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and not os.environ.get("FASTRNN_SKIP_CUDA_BUILD")
        and bool(cuda_sources)
        and os.path.exists(os.path.join(ROOT, bindings))
    )
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("FASTRNN_CUDA_ARCHS", "8.0;9.0")
        return CUDAExtension(
            "fastrnn._C",
            sources + cuda_sources + [bindings],
            extra_compile_args={"cxx": cxx + ["-DFASTRNN_WITH_CUDA"], "nvcc": ["-O3", "-DFASTRNN_WITH_CUDA"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension("fastrnn._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


setup(
    name="fastrnn",
    version="0.1.0",
    description="Fused Triton and C++/CUDA kernels for drop-in PyTorch LSTM/GRU/RNN",
    packages=find_packages(include=["fastrnn", "fastrnn.*"]),
    python_requires=">=3.10",
    # No upper bound and no pin: a pin could make pip replace the torch the extension was built against.
    install_requires=["torch>=2.4"],
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
