"""What to compile for fastrnn's C++/CUDA ops, in one place (docs/api.md, "Install and build").

Two builders read this description and nothing else:
  setup.py          at install time, when torch is importable in the build environment
                    (`pip install --no-build-isolation .`, `python setup.py build_ext --inplace`);
  fastrnn/_jit.py   on first use, with torch.utils.cpp_extension + ninja, when no prebuilt extension
                    loads (a plain `pip install .`: pip's isolated build environment has no torch).

`extensions()` returns a list of `ExtensionSpec`: the op library `_C` (the schemas, the CPU dispatcher, the
portable `default` copy of the CPU kernels, and the CUDA kernels when they are built) and, on x86-64, one
companion library per CPU capability, `_C_avx2` and `_C_avx512`: the same kernel sources compiled with that
capability's flags, which `_C` dlopens when the CPU runs them (csrc/cpu/dispatch.cpp; docs/cpu.md, "ISA
dispatch"). Building a capability this machine cannot run is fine: it is only compiled, never run here.

This file must import without torch (setup.py loads it by path in pip's isolated build environment, where
torch is absent) and without the rest of the package (fastrnn/__init__.py imports torch).

Switches (environment), read by both builders:
  FASTRNN_SKIP_CUDA_BUILD=1   CPU kernels only, even with a CUDA torch and nvcc
  FASTRNN_CUDA_ARCHS          CUDA architectures (torch's TORCH_CUDA_ARCH_LIST format); default "8.0;9.0"
                              at install time, the visible GPUs' own on first use
  FASTRNN_CPU_CAPABILITIES    the CPU capabilities to build besides `default` (always built), comma-separated
                              (default on x86-64: "avx2,avx512"; e.g. "avx2" builds faster). Which one runs
                              is chosen at run time (FASTRNN_CPU_CAPABILITY lowers it: docs/api.md).
  MAX_JOBS                    parallel compile jobs (torch's cpp_extension)
"""

import dataclasses
import glob
import hashlib
import os
import platform

# Install-time default of FASTRNN_CUDA_ARCHS: a wheel must serve the GPUs it will meet (A100, H100/H200).
DEFAULT_CUDA_ARCHS = "8.0;9.0"
# The ISAs an ExtensionSpec may name, each running on every CPU that runs the ones after it.
ISA_ORDER = ("default", "avx2", "avx512")
# What ships in the wheel under fastrnn/csrc/ (setup.py) and what the JIT cache key hashes.
SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")

# Flags every C++ file of the extension gets (the op library adds -DFASTRNN_PYTHON_MODULE and CUDA's).
# -Wno-unknown-pragmas: torch's at::vec headers carry `#pragma unroll`, which gcc ignores (hundreds of lines).
# -fopenmp: at::parallel_for is an inline `#pragma omp parallel` in torch's headers (AT_PARALLEL_OPENMP);
# compiled without it, every parallel_for silently runs on one thread. The library then needs libgomp.so.1,
# which torch has already loaded (torch/lib ships it), so there is one OpenMP runtime and one thread pool.
COMMON_CXX_FLAGS = ["-O3", "-Wno-unknown-pragmas", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]
# libstdc++ linked dynamically, whatever the compiler's default: a g++ that links it statically (the H200
# machine's /opt/gcc/bin/g++, 2026-12-04) puts a second copy of its stream and locale code in the library,
# and an integer formatted there into torch's error message stream finds no facet of that copy: the message
# is cut short (gcc 12 with -static-libstdc++) or the process dies (every shape error of an op on the H200).
# Named before the compiler's own libraries, the shared libstdc++ resolves those symbols first.
if platform.system() == "Linux":
    LINK_FLAGS += ["-Wl,--push-state,-Bdynamic,-lstdc++,--pop-state"]

# The op library's own C++ sources (csrc/cuda/bindings.cpp and the .cu files join them when building CUDA).
# -DCPU_CAPABILITY=DEFAULT: the default copy of the kernels and at::vec live in namespaces named DEFAULT.
OP_LIBRARY_SOURCES = [
    "csrc/ops.cpp", "csrc/cpu/dispatch.cpp", "csrc/cpu/kernels_default.cpp",
    "csrc/cpu/linear.cpp",  # fastrnn_cpu::linear / mm through oneDNN's matmul (ISA-neutral: oneDNN JITs)
    "csrc/cpu/output_cache.cpp",  # the blocks the CPU ops' large outputs are made in, one cache per process
    "csrc/cpu/pad.cpp",  # fastrnn_cpu::pad_rows: a PackedSequence's rows padded into that cache
]
OP_LIBRARY_CXX_FLAGS = ["-DCPU_CAPABILITY=DEFAULT"]

# name -> (the one source of that copy, its flags). CPU_CAPABILITY_<X> selects at::vec's implementation (as in
# ATen's build); -fvisibility=hidden keeps every symbol of the copy but its table entry out of the dynamic
# symbol table, so nothing compiled with these flags can be bound to from outside (csrc/cpu/kernels.h).
_AVX2 = ["-mavx2", "-mfma", "-mf16c"]
X86_CAPABILITIES = {
    "avx2": ("csrc/cpu/kernels_avx2.cpp", _AVX2 + ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]),
    "avx512": (
        "csrc/cpu/kernels_avx512.cpp",
        _AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-DCPU_CAPABILITY=AVX512",
                 "-DCPU_CAPABILITY_AVX512"],
    ),
}
CAPABILITY_CXX_FLAGS = ["-fvisibility=hidden", "-fvisibility-inlines-hidden"]


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


def is_x86_64(machine=None):
    return (machine or platform.machine()) in ("x86_64", "AMD64")


def capability_libraries(machine=None, only=None):
    """[(module name, [sources], [cxx flags])] of the capability libraries to build besides fastrnn._C.

    only: None for FASTRNN_CPU_CAPABILITIES (all when unset), or an iterable of capability names."""
    if not is_x86_64(machine):
        return []
    if only is None:
        env = os.environ.get("FASTRNN_CPU_CAPABILITIES", "").strip()
        only = [c.strip() for c in env.split(",") if c.strip()] if env else list(X86_CAPABILITIES)
    only = [c for c in only if c != "default"]
    unknown = sorted(set(only) - set(X86_CAPABILITIES))
    if unknown:
        raise RuntimeError(f"fastrnn: FASTRNN_CPU_CAPABILITIES has unknown capabilities {unknown}; "
                           f"known: default, {', '.join(X86_CAPABILITIES)}")
    return [
        (f"fastrnn._C_{name}", [source], COMMON_CXX_FLAGS + CAPABILITY_CXX_FLAGS + flags)
        for name, (source, flags) in X86_CAPABILITIES.items() if name in only
    ]


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
    """The libraries to build from the sources under `root`: the capability companions first, then `_C`;
    `with_cuda`: also the CUDA kernels, inside `_C` (the names must not depend on it: fastrnn/_jit.py looks
    the prebuilt ones up by name)."""
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"), root_dir=root))
    bindings = os.path.join("csrc", "cuda", "bindings.cpp")
    with_cuda = with_cuda and bool(cuda_sources) and os.path.isfile(os.path.join(root, bindings))
    specs = [
        ExtensionSpec(name=module.split(".")[-1], sources=tuple(sources), cxx_flags=tuple(flags),
                      link_flags=tuple(LINK_FLAGS), isa=module.split("_C_")[-1], companion=True)
        for module, sources, flags in capability_libraries()
    ]
    # FASTRNN_PYTHON_MODULE: ops.cpp then defines PyInit__C, so that `import fastrnn._C` loads the library.
    cxx = COMMON_CXX_FLAGS + OP_LIBRARY_CXX_FLAGS + ["-DFASTRNN_PYTHON_MODULE"]
    if with_cuda:
        specs.append(ExtensionSpec(
            name="_C",
            sources=tuple(OP_LIBRARY_SOURCES + cuda_sources + [bindings]),
            cxx_flags=tuple(cxx + ["-DFASTRNN_WITH_CUDA"]),
            nvcc_flags=("-O3", "-DFASTRNN_WITH_CUDA"),
            link_flags=tuple(LINK_FLAGS),
            cuda=True,
        ))
    else:
        specs.append(ExtensionSpec(name="_C", sources=tuple(OP_LIBRARY_SOURCES), cxx_flags=tuple(cxx),
                                   link_flags=tuple(LINK_FLAGS)))
    return specs


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
