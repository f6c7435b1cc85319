"""Loading the compiled ops: the extension built at install time, else one compiled on first use.

The libraries of fastrnn/_build.py's `extensions()` (today one, `_C`; a companion library is loaded by the
library that uses it, not from here) come from the first of these that has them all:
  1. prebuilt   `import fastrnn._C`: built by setup.py when torch was importable at install time
                (`pip install --no-build-isolation .`, `python setup.py build_ext --inplace`);
  2. jit-cached libraries this module compiled before for the same torch, Python, CUDA archs, ISAs and
                sources (one directory per such build plan);
  3. jit-built  compiled now with torch.utils.cpp_extension + ninja into that cache (a few minutes, once),
                with one message on stderr, under a file lock so that concurrent processes build once.
The ops register themselves with the dispatcher as the library loads (torch.ops.fastrnn.*).

FASTRNN_EXTENSION=auto (default) | prebuilt (never compile) | jit (ignore a prebuilt one);
FASTRNN_CACHE_DIR: the cache (default $XDG_CACHE_HOME/fastrnn or ~/.cache/fastrnn).
"""

import contextlib
import dataclasses
import importlib
import os
import shutil
import sys
import time

import torch

from . import _build

MODES = ("auto", "prebuilt", "jit")
# The marker a finished build leaves in its directory; a directory without it is an unfinished build.
_DONE = "fastrnn-build-complete"
# Where torch.utils.cpp_extension keeps its own lock (FileBaton, os.open O_EXCL): a process killed mid-build
# leaves it behind and every later build would wait on it forever. Ours (flock) dies with its process, so
# while we hold ours a leftover of theirs is stale and is removed.
_TORCH_BATON = "lock"


@dataclasses.dataclass
class ExtensionState:
    """How one library of _build.extensions() stands: `how` is prebuilt, jit-cached, jit-built or
    missing; `where` its file or the cache directory; `why` the reason it is missing."""

    name: str
    isa: str
    cuda: bool
    how: str
    where: str = ""
    why: str = ""


def mode():
    value = os.environ.get("FASTRNN_EXTENSION", "auto")
    if value not in MODES:
        raise ImportError(f"fastrnn: FASTRNN_EXTENSION must be one of {list(MODES)}, got {value!r}")
    return value


def cache_root():
    root = os.environ.get("FASTRNN_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "fastrnn")
    return root


def _cuda_home():
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME


def _visible_archs():
    """The visible GPUs' archs ("9.0"): a first-use build compiles for the machine it runs on."""
    if not torch.cuda.is_available():
        return None
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{major}.{minor}" for major, minor in caps)


def _cpu_runs(isa):
    """Whether this CPU runs code compiled for `isa` (one of _build.ISA_ORDER), as torch judges it."""
    torch_isa = torch.backends.cpu.get_cpu_capability().lower()  # "avx512", "avx2", "default", "vsx", ...
    if isa == "default":
        return True
    if torch_isa not in _build.ISA_ORDER:
        return False
    return _build.ISA_ORDER.index(isa) <= _build.ISA_ORDER.index(torch_isa)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What a first-use build compiles here: the specs (companions this CPU cannot run left out, the
    companions first), from which sources, into which cache directory (one for all of them, so that a
    library finds its companions next to itself)."""

    root: str
    specs: tuple
    cuda_archs: str
    fingerprint: str
    why_no_cuda: str

    @property
    def directory(self):
        cuda = f"cu{torch.version.cuda}-sm{self.cuda_archs.replace(';', '_')}" if self.cuda_archs else "cpu"
        isas = "+".join(dict.fromkeys(spec.isa for spec in self.specs))
        key = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{cuda}-{isas}"
        return os.path.join(cache_root(), key.replace("+", "_") + "-" + self.fingerprint[:12])

    def library(self, spec):
        """The file of `spec` in the cache, or None while the build is not complete."""
        path = os.path.join(self.directory, f"{spec.name}.so")
        return path if os.path.isfile(os.path.join(self.directory, _DONE)) and os.path.isfile(path) else None


def plan():
    """The first-use build of this machine, or a string saying why there is none (no sources)."""
    root = _build.source_root()
    if root is None:
        return "this install carries no csrc/ sources to compile"
    # CUDA_HOME costs an import of torch.utils.cpp_extension (0.2 s): only a CUDA torch needs it.
    why_no_cuda = _build.cuda_reason(torch.version.cuda, _cuda_home() if torch.version.cuda else None)
    specs = [s for s in _build.extensions(root, with_cuda=why_no_cuda is None) if not s.companion or _cpu_runs(s.isa)]
    specs = tuple(sorted(specs, key=lambda s: not s.companion))  # stable: companions first, order kept
    archs = _build.cuda_archs(_visible_archs() or _build.DEFAULT_CUDA_ARCHS) if why_no_cuda is None else ""
    return _Plan(root, specs, archs, _build.fingerprint(root, specs), why_no_cuda or "")


def _prebuilt(spec):
    """(state, None) when fastrnn.<name> imports, else (None, why not)."""
    try:
        module = importlib.import_module(f"fastrnn.{spec.name}")
    except ImportError as e:  # not built (ModuleNotFoundError), or built against another torch
        return None, f"prebuilt fastrnn.{spec.name}: {e}"
    # Whether it holds the CUDA kernels is what it registered, not what a build here would do.
    cuda = torch._C._dispatch_has_kernel_for_dispatch_key("fastrnn::lstm_fwd", "CUDA")
    return ExtensionState(spec.name, spec.isa, cuda, "prebuilt", module.__file__), None


@contextlib.contextmanager
def _file_lock(path, on_wait):
    """An exclusive lock on `path` (created if need be), held until the block ends or the process dies."""
    try:
        import fcntl
    except ImportError:  # Windows: torch's own FileBaton still serialises the build itself
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _say(message):
    print(f"fastrnn: {message}", file=sys.stderr, flush=True)


def _how_to_get_them(why):
    return (
        f"the compiled ops are not available: {why}. The reference and triton backends work without them. "
        "To get the compiled ones (backends cpu, "
        "cuda): install a C++ compiler (e.g. g++; set CXX for another) and ninja (pip install ninja), and they "
        "compile on the next first use; or build them at install time against your torch: "
        "pip install --no-build-isolation ."
    )


@contextlib.contextmanager
def _ninja_on_path():
    """torch.utils.cpp_extension runs `ninja` from PATH; the ninja wheel (a dependency of fastrnn) puts it in
    the environment's bin/, which is not on PATH when a venv's python is run without activating the venv."""
    saved = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:
        with contextlib.suppress(ImportError):
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + saved
    try:
        yield
    finally:
        os.environ["PATH"] = saved


def _check_toolchain():
    """Raises ImportError before anything is written when the first-use build cannot run here."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise ImportError(f"compile on first use: no C++ compiler found ({compiler!r} is not on PATH)")
    if shutil.which("ninja") is None:
        raise ImportError("compile on first use: ninja is not installed")


def _compile(plan_):
    """Builds every library of the plan into its directory with torch.utils.cpp_extension + ninja, loading
    each as it is built (companions first: they are what the others load)."""
    from torch.utils import cpp_extension

    directory = plan_.directory
    what = ", ".join(f"{s.name} ({s.isa})" for s in plan_.specs) + (
        f"; CUDA sm {plan_.cuda_archs}" if plan_.cuda_archs else "; CPU only")
    _say(
        f"compiling the C++ kernels [{what}] for torch {torch.__version__} into {directory}. This takes a few "
        "minutes, once per torch version; later runs load them from there (FASTRNN_EXTENSION=prebuilt skips it)."
    )
    start = time.monotonic()
    os.makedirs(directory, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(directory, _TORCH_BATON))
    saved_archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    try:
        for spec in plan_.specs:
            if spec.cuda:
                os.environ["TORCH_CUDA_ARCH_LIST"] = plan_.cuda_archs
            # One directory for all: torch names each library's objects after its sources and each build
            # rewrites build.ninja, so libraries built one after the other there do not mix.
            cpp_extension.load(
                name=spec.name,
                sources=[os.path.join(plan_.root, s) for s in spec.sources],
                extra_cflags=list(spec.cxx_flags),
                extra_cuda_cflags=list(spec.nvcc_flags),
                extra_ldflags=list(spec.link_flags),
                build_directory=directory,
                with_cuda=spec.cuda,
                is_python_module=False,  # torch.ops.load_library: the ops register as the library loads
            )
    except Exception as e:  # a compiler error, a missing header, a linker error: all say the same to the user
        log = os.path.join(directory, "error.log")
        with open(log, "w") as f:
            f.write(str(e))
        tail = "\n".join(str(e).strip().splitlines()[-12:])
        raise ImportError(f"compiling [{what}] failed (full output: {log}):\n{tail}\n") from e
    finally:
        if saved_archs is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved_archs
    with open(os.path.join(directory, _DONE), "w") as f:
        f.write(plan_.fingerprint + "\n")
    _say(f"compiled [{what}] in {time.monotonic() - start:.0f} s")


def _states_of(plan_, how):
    return [ExtensionState(s.name, s.isa, s.cuda, how, plan_.library(s)) for s in plan_.specs]


def _load_cached(plan_):
    """Loads the plan's libraries from a complete cache directory (the companions are loaded by the
    libraries that use them); None when it is not complete."""
    loaded = [s for s in plan_.specs if not s.companion]
    if any(plan_.library(s) is None for s in plan_.specs):
        return None
    for spec in loaded:
        torch.ops.load_library(plan_.library(spec))
    return _states_of(plan_, "jit-cached")


def _from_cache(plan_, build):
    """(states, None) from the JIT cache, compiling into it first when `build`; else (None, why not)."""
    states = _load_cached(plan_)
    if states is not None:
        return states, None
    if not build:
        return None, f"not compiled yet for this torch/ISA/sources (it compiles on first use into {plan_.directory})"
    with _ninja_on_path():
        _check_toolchain()
    os.makedirs(cache_root(), exist_ok=True)
    on_wait = lambda: _say(f"waiting for another process compiling into {plan_.directory}")  # noqa: E731
    with _file_lock(plan_.directory + ".lock", on_wait):
        states = _load_cached(plan_)  # the process we waited for built it
        if states is not None:
            return states, None
        with _ninja_on_path():
            _compile(plan_)
    return _states_of(plan_, "jit-built"), None


_states = None
_compile_allowed = True


@contextlib.contextmanager
def no_compile():
    """Within the block, load() compiles nothing (`python -m fastrnn info` lists the backends this way)."""
    global _compile_allowed
    saved, _compile_allowed = _compile_allowed, False
    try:
        yield
    finally:
        _compile_allowed = saved


def _library_specs():
    """The libraries Python loads, by name. The names do not depend on CUDA (its kernels join the same
    libraries), so the prebuilt ones are tried without the cost of a plan (importing
    torch.utils.cpp_extension to find nvcc: 0.2-0.7 s)."""
    root = _build.source_root() or os.path.dirname(__file__)
    return [s for s in _build.extensions(root, with_cuda=False) if not s.companion]


def load(build=None):
    """Loads the extension's libraries (once per process) and returns their ExtensionStates; raises
    ImportError saying why and how to get them when they cannot be loaded. `build=False` never compiles;
    None: unless inside no_compile()."""
    global _states
    if _states is not None:
        return _states
    build = _compile_allowed if build is None else build
    how = mode()
    reasons = []
    states = None
    if how != "jit":
        # All prebuilt or none: a mix of prebuilt and first-use libraries is not one build.
        prebuilt = [_prebuilt(spec) for spec in _library_specs()]
        if all(state is not None for state, _ in prebuilt):
            states = [state for state, _ in prebuilt]
        reasons += [why for _, why in prebuilt if why]
    if states is None and how != "prebuilt":
        plan_ = plan()
        if isinstance(plan_, str):
            reasons.append(f"compile on first use: {plan_}")
        else:
            try:
                states, why = _from_cache(plan_, build)
            except ImportError as e:  # no compiler, no ninja, a failed compile
                why = str(e)
            reasons.append(why)
    if states is None:
        reasons = [r for r in reasons if r]
        if how == "prebuilt":
            reasons.append("FASTRNN_EXTENSION=prebuilt: no compile on first use")
        # The how-to only when compiling was tried: under no_compile() "not compiled yet" is all there is.
        raise ImportError(_how_to_get_them("; ".join(reasons)) if build or how == "prebuilt" else "; ".join(reasons))
    _states = states
    return states


def describe():
    """The states without compiling anything, a missing one with its reason (for `python -m fastrnn info`)."""
    try:
        return load(build=False)
    except ImportError as e:
        return [ExtensionState(s.name, s.isa, s.cuda, "missing", why=str(e)) for s in _library_specs()]
