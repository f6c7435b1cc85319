"""What the CPU part of the compiled extension is built from: sources and flags per ISA capability.

Read by setup.py (and meant for any other build of the extension, e.g. a JIT build on first use), without
importing torch or fastrnn: this file only describes, it builds nothing. docs/cpu.md, "ISA dispatch".

The op library fastrnn._C holds the schemas, the dispatcher (csrc/cpu/dispatch.cpp) and the portable
`default` copy of the CPU kernels, all compiled with no ISA flag. Every other capability is a shared library
of its own next to it, fastrnn._C_<name>, holding one more copy of the same kernel sources compiled with
that capability's flags; dispatch.cpp dlopens the best one the CPU supports. Building a capability this
machine cannot run is fine (it is only compiled, never executed here).

Build switch (environment): FASTRNN_CPU_CAPABILITIES, a comma-separated subset of the capabilities to
build besides `default` (always built), e.g. "avx2" for a faster build; default: all of this architecture's.
"""

import os
import platform

# Flags every C++ file of the extension gets (setup.py adds its own on top: -DFASTRNN_PYTHON_MODULE, CUDA).
# -Wno-unknown-pragmas: torch's at::vec headers carry `#pragma unroll`, which gcc ignores (hundreds of lines).
# -fopenmp: at::parallel_for is an inline `#pragma omp parallel` in torch's headers (AT_PARALLEL_OPENMP);
# compiled without it, every parallel_for silently runs on one thread. The library then needs libgomp.so.1,
# which torch has already loaded (torch/lib ships it), so there is one OpenMP runtime and one thread pool.
COMMON_CXX_FLAGS = ["-O3", "-Wno-unknown-pragmas", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]

# The op library's own C++ sources (csrc/cuda/bindings.cpp is added by setup.py when building CUDA).
# -DCPU_CAPABILITY=DEFAULT: the default copy of the kernels and at::vec live in namespaces named DEFAULT.
OP_LIBRARY_SOURCES = [
    "csrc/ops.cpp", "csrc/cpu/dispatch.cpp", "csrc/cpu/kernels_default.cpp",
    "csrc/cpu/linear.cpp",  # fastrnn_cpu::linear / mm through oneDNN's brgemm (ISA-neutral: oneDNN JITs)
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
