"""What to compile for fastrnn's C++/CUDA ops, in one place (docs/api.md, "Install and build").

Two builders read this description and nothing else:
  setup.py          at install time, when torch is importable in the build environment
                    (`pip install --no-build-isolation .`, `python setup.py build_ext --inplace`);
  fastrnn/_jit.py   on first use, with torch.utils.cpp_extension + ninja, when no prebuilt extension
                    loads (a plain `pip install .`: pip's isolated build environment has no torch).

`extensions()` returns a list of `ExtensionSpec`: today one library, `_C` (csrc/ops.cpp + csrc/cpu/*.cpp,
and the CUDA kernels when they are built). Several specs (e.g. the same CPU kernels compiled once per ISA
with different flags) are built and loaded the same way, each under its own name.

This file must import without torch (setup.py loads it by path in pip's isolated build environment, where
torch is absent) and without the rest of the package (fastrnn/__init__.py imports torch).

Switches (environment), read by both builders:
  FASTRNN_SKIP_CUDA_BUILD=1   CPU kernels only, even with a CUDA torch and nvcc
  FASTRNN_CUDA_ARCHS          CUDA architectures (torch's TORCH_CUDA_ARCH_LIST format); default "8.0;9.0"
                              at install time, the visible GPUs' own on first use
  FASTRNN_CPU_CAPABILITY      "avx2" (default on x86-64: AVX2+FMA+F16C, at::vec on 256-bit registers) or
                              "default" (portable; at::vec falls back to plain loops, ~3x slower gates)
  MAX_JOBS                    parallel compile jobs (torch's cpp_extension)
"""

import dataclasses
import glob
import hashlib
import os
import platform

# Install-time default of FASTRNN_CUDA_ARCHS: a wheel must serve the GPUs it will meet (A100, H100/H200).
DEFAULT_CUDA_ARCHS = "8.0;9.0"
CPU_CAPABILITIES = ("avx2", "default")
# The ISAs an ExtensionSpec may name, each running on every CPU that runs the ones after it.
ISA_ORDER = ("default", "avx2", "avx512")
# What ships in the wheel under fastrnn/csrc/ (setup.py) and what the JIT cache key hashes.
SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")


@dataclasses.dataclass(frozen=True)
class ExtensionSpec:
    """One shared library of ops. `name` is its module name inside the package ("_C" -> fastrnn._C);
    `sources` are relative to the source root (the directory holding csrc/)."""

    name: str
    sources: tuple
    cxx_flags: tuple
    link_flags: tuple = ()
    cuda: bool = False
    nvcc_flags: tuple = ()
    # The CPU instruction set the kernels are compiled for, as `python -m fastrnn info` and the JIT cache
    # key name it (one of ISA_ORDER).
    isa: str = "default"
    # A companion is never imported from Python: another library of the list finds it in its own directory
    # and loads it itself (e.g. one copy of the CPU kernels per ISA, picked at run time). Both builders put
    # it next to the others; a first-use build compiles only the companions whose ISA this CPU runs, and
    # before the libraries that load them.
    companion: bool = False


def source_root(package_dir=None):
    """The directory holding csrc/: the installed package itself in a wheel install (setup.py copies csrc/
    into fastrnn/), the repository root in a checkout or an editable install (fastrnn/..). The package's own
    copy first: a wheel's parent is site-packages, where a csrc/ would be someone else's."""
    package_dir = os.path.abspath(package_dir or os.path.dirname(__file__))
    for root in (package_dir, os.path.dirname(package_dir)):
        if os.path.isfile(os.path.join(root, "csrc", "ops.cpp")):
            return root
    return None


def source_files(root):
    """Every file of csrc/ a build reads (sources and headers), relative to `root`, sorted."""
    found = []
    for suffix in SOURCE_SUFFIXES:
        found += glob.glob(os.path.join(root, "csrc", "**", f"*{suffix}"), recursive=True)
    return sorted(os.path.relpath(p, root) for p in found)


def cpu_capability():
    default = "avx2" if platform.machine() in ("x86_64", "AMD64") else "default"
    capability = os.environ.get("FASTRNN_CPU_CAPABILITY", default)
    if capability not in CPU_CAPABILITIES:
        raise RuntimeError(
            f"fastrnn: FASTRNN_CPU_CAPABILITY must be one of {list(CPU_CAPABILITIES)}, got {capability!r}"
        )
    return capability


def cpu_flags(capability):
    if capability == "avx2":
        # ATen's at::vec picks its 256-bit implementation from CPU_CAPABILITY_AVX2, as torch's own
        # kernels do; the library then needs an AVX2+FMA CPU (fastrnn/backends/native.py checks).
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


def cuda_reason(torch_cuda_version, cuda_home):
    """None when the CUDA kernels are to be built, else why not (for `python -m fastrnn info`)."""
    if torch_cuda_version is None:
        return "torch is a CPU build"
    if os.environ.get("FASTRNN_SKIP_CUDA_BUILD"):
        return "FASTRNN_SKIP_CUDA_BUILD is set"
    if cuda_home is None:
        return "no CUDA toolkit (nvcc) found: set CUDA_HOME"
    return None


def cuda_archs(default=DEFAULT_CUDA_ARCHS):
    return os.environ.get("FASTRNN_CUDA_ARCHS") or default


def extensions(root, with_cuda):
    """The libraries to build from the sources under `root`; `with_cuda`: also the CUDA kernels, inside the
    same libraries (their names must not depend on it: fastrnn/_jit.py looks the prebuilt ones up by name)."""
    cpu = [os.path.join("csrc", "ops.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp"), root_dir=root))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"), root_dir=root))
    bindings = os.path.join("csrc", "cuda", "bindings.cpp")
    with_cuda = with_cuda and bool(cuda_sources) and os.path.isfile(os.path.join(root, bindings))
    capability = cpu_capability()
    # -Wno-unknown-pragmas: torch's at::vec headers carry `#pragma unroll`, which gcc ignores (hundreds of lines).
    # -fopenmp: at::parallel_for is an inline `#pragma omp parallel` in torch's headers (AT_PARALLEL_OPENMP);
    # compiled without it, every parallel_for silently runs on one thread. The library then needs libgomp.so.1,
    # which torch has already loaded (torch/lib ships it), so there is one OpenMP runtime and one thread pool.
    # FASTRNN_PYTHON_MODULE: ops.cpp then defines PyInit__C, so that `import fastrnn._C` loads the library.
    cxx = ["-O3", "-Wno-unknown-pragmas", "-fopenmp", "-DFASTRNN_PYTHON_MODULE"] + cpu_flags(capability)
    if with_cuda:
        return [ExtensionSpec(
            name="_C",
            sources=tuple(cpu + cuda_sources + [bindings]),
            cxx_flags=tuple(cxx + ["-DFASTRNN_WITH_CUDA"]),
            nvcc_flags=("-O3", "-DFASTRNN_WITH_CUDA"),
            link_flags=("-fopenmp",),
            cuda=True,
            isa=capability,
        )]
    return [ExtensionSpec(
        name="_C", sources=tuple(cpu), cxx_flags=tuple(cxx), link_flags=("-fopenmp",), isa=capability,
    )]


def fingerprint(root, specs):
    """A hash of every csrc/ file and of the specs (names, sources, flags): the JIT cache rebuilds when
    either changes."""
    digest = hashlib.sha256()
    for path in source_files(root):
        digest.update(path.encode() + b"\0")
        with open(os.path.join(root, path), "rb") as f:
            digest.update(f.read())
    digest.update(repr(list(specs)).encode())
    return digest.hexdigest()
