"""Installing fastrnn like any package (docs/api.md, "Install and build").

The `install` test puts a copy of this checkout into a fresh virtualenv with a plain `pip install <dir>`
(pip's isolated build has no torch: a pure-Python wheel carrying csrc/), so the first use compiles the ops
with torch.utils.cpp_extension + ninja; two processes start at once and one compiles while the other waits
on the lock. It takes minutes (venv + torch + a 4-file compile on 2 cores), so it is deselected by default
(pyproject.toml) and .ci/run runs it once: pytest tests/test_install.py -m install.
The other tests here run in the main suite; one compiles a one-file extension twice (the libstdc++ link).
"""

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import fastrnn
from parity import FP64_TOL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**changes):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(changes)
    return env


NO_COMPILER = textwrap.dedent(
    """
    import warnings, torch, fastrnn
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = fastrnn.GRU(4, 5)  # a GRU: auto may hand an LSTM to torch.nn, which resolves no backend
        m(torch.randn(3, 2, 4))
        m(torch.randn(3, 2, 4))
    assert fastrnn.backends.resolve("auto", "cpu") == "reference"
    assert "cpu" not in fastrnn.available_backends("cpu")
    messages = [str(w.message) for w in caught if "compiled ops" in str(w.message)]
    assert len(messages) == 1, messages
    print(messages[0])
    """
)


def test_without_a_compiler_the_reference_runs_and_the_message_says_how(tmp_path):
    env = _env(FASTRNN_EXTENSION="jit", CXX=str(tmp_path / "no-such-c++"), FASTRNN_CACHE_DIR=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", NO_COMPILER], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "no C++ compiler found" in run.stdout, run.stdout
    assert "pip install --no-build-isolation ." in run.stdout, run.stdout
    assert not any(tmp_path.iterdir()), "nothing is compiled, so nothing is cached"


def test_info_reports_versions_extension_and_backends():
    run = subprocess.run([sys.executable, "-m", "fastrnn", "info"], capture_output=True, text=True, env=_env())
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert f"fastrnn {fastrnn.__version__} " in out and f"torch {torch.__version__}," in out, out
    assert f"torch's CPU capability {torch.backends.cpu.get_cpu_capability()}" in out, out
    # This suite runs with the extension built (scripts/env.sh), so info must find it and list `cpu`.
    assert re.search(r"fastrnn\._C \(\w+, CPU[^)]*\): (prebuilt|jit-cached)", out), out
    assert f"backends: cpu {fastrnn.available_backends('cpu')}" in out, out


def test_ninja_wheel_is_found_without_ninja_on_path(tmp_path, monkeypatch):
    # torch.utils.cpp_extension runs `ninja` from PATH; the ninja wheel's lies in the venv's bin/, which is
    # not on PATH unless the venv is activated.
    import ninja  # a dependency of fastrnn (pyproject.toml) and of the tests (requirements.txt)

    from fastrnn import _jit

    monkeypatch.setenv("PATH", str(tmp_path))
    assert shutil.which("ninja") is None
    with _jit._ninja_on_path():
        assert shutil.which("ninja") == os.path.join(ninja.BIN_DIR, "ninja")
    assert os.environ["PATH"] == str(tmp_path)


def test_first_use_plan_puts_companions_this_cpu_runs_first_in_one_directory(monkeypatch):
    # The shape of a per-ISA build (one library per CPU capability, loaded by the op library from its own
    # directory): the plan keeps the companions this CPU runs, before the op library, all in one directory.
    from fastrnn import _build, _jit

    spec = _build.ExtensionSpec
    specs = [spec("_C", ("csrc/ops.cpp",), ()), spec("_C_avx2", ("a.cpp",), (), isa="avx2", companion=True),
             spec("_C_avx512", ("b.cpp",), (), isa="avx512", companion=True)]
    monkeypatch.setattr(_build, "extensions", lambda root, with_cuda: specs)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    plan = _jit.plan()
    assert [s.name for s in plan.specs] == ["_C_avx2", "_C"], plan.specs
    assert plan.directory.endswith(f"-avx2_default-{plan.fingerprint[:12]}"), plan.directory
    assert [s.name for s in _jit._library_specs()] == ["_C"]  # the ones Python loads itself
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert [s.name for s in _jit.plan().specs] == ["_C_avx2", "_C_avx512", "_C"]
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert [s.name for s in _jit.plan().specs] == ["_C"]


def _copy_checkout(dest):
    """The checkout's tracked files as they are now (what a clone of this commit holds, plus local edits)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    for path in filter(None, files.stdout.split("\0")):
        if os.path.isfile(os.path.join(ROOT, path)):
            os.makedirs(os.path.join(dest, os.path.dirname(path)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, path), os.path.join(dest, path))


FIRST_USE = textwrap.dedent(
    f"""
    TOL = {FP64_TOL!r}
    import sys, torch, fastrnn
    from fastrnn import _jit
    assert fastrnn.__file__.startswith(sys.prefix), fastrnn.__file__  # the installed package, not the checkout
    torch.manual_seed(0)
    ref = torch.nn.LSTM(5, 7, num_layers=2, bidirectional=True, dtype=torch.float64)
    fast = fastrnn.LSTM(5, 7, num_layers=2, bidirectional=True, dtype=torch.float64, backend="cpu")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(9, 3, 5, dtype=torch.float64, requires_grad=True)
    (y_ref, _), (y, _) = ref(x), fast(x)
    (g_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    torch.testing.assert_close(y, y_ref, **TOL)  # fp64 against fp64: tests/parity.py's FP64_TOL
    torch.testing.assert_close(g, g_ref, **TOL)
    print("state", [s.how for s in _jit.load()])
    """
)


def _states(printed):
    """The distinct states FIRST_USE printed, one per library (_C and the CPU-capability companions this CPU
    runs, fastrnn/_build.py): ("jit-built",) when every library was compiled by that process."""
    return tuple(sorted(set(printed.strip().removeprefix("state ")[1:-1].replace("'", "").split(", "))))


@pytest.mark.install
@pytest.mark.slow
def test_plain_pip_install_into_a_fresh_venv_compiles_on_first_use(tmp_path):
    source, venv, cache, work = tmp_path / "fastrnn-src", tmp_path / "venv", tmp_path / "cache", tmp_path / "work"
    work.mkdir()
    _copy_checkout(source)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FASTRNN_EXTENSION", "VIRTUAL_ENV")}
    # PATH without other virtualenvs' bin/ (this one's is not on it either, as when a venv's python is run
    # without activating it): the ninja is the system's or the ninja wheel's (test_ninja_wheel_is_found).
    path = [d for d in env.get("PATH", "").split(os.pathsep)
            if d and not os.path.isfile(os.path.join(os.path.dirname(d), "pyvenv.cfg"))]
    env.update(FASTRNN_CACHE_DIR=str(cache), MAX_JOBS=os.environ.get("MAX_JOBS", "2"), PATH=os.pathsep.join(path))

    def pip(*args):
        run = subprocess.run([python, "-m", "pip", *args], capture_output=True, text=True, env=env, cwd=work)
        assert run.returncode == 0, f"pip {' '.join(args)}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"

    # The very torch running this test (the CPU wheel on this machine's disk): an unpinned one would be a
    # multi-GB CUDA build from the index. Then the package, with no flag at all.
    pip("install", "-q", f"torch=={torch.__version__}")
    pip("install", "-q", str(source))
    where = ("import fastrnn, os, importlib.metadata as m; "
             "print(os.path.dirname(fastrnn.__file__), fastrnn.__version__, m.version('fastrnn'))")
    installed, version, metadata_version = subprocess.run(
        [python, "-c", where], capture_output=True, text=True, env=env, cwd=work, check=True).stdout.split()
    assert version == metadata_version, (version, metadata_version)
    assert os.path.isfile(os.path.join(installed, "csrc", "ops.cpp")), "the wheel must carry the sources"
    assert not [f for f in os.listdir(installed) if f.startswith("_C")], "no torch at build time: no prebuilt _C"

    # Two first uses at once: one compiles, the other waits on the lock, then loads the same library.
    start = time.monotonic()
    procs = [subprocess.Popen([python, "-c", FIRST_USE], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env, cwd=work) for _ in range(2)]
    outputs = [p.communicate() for p in procs]
    results = [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]
    compile_s = time.monotonic() - start
    for rc, out, err in results:
        assert rc == 0, out + err
    # One state per library: _C and the CPU-capability companions this CPU runs (fastrnn/_build.py).
    states = sorted(_states(out) for _, out, _ in results)
    assert states == [("jit-built",), ("jit-cached",)], [out for _, out, _ in results]
    errs = "".join(err for _, _, err in results)
    assert errs.count("compiling the C++ kernels") == 1, errs
    assert errs.count("waiting for another process") == 1, errs

    # A later process loads the cached library: no message, no compile.
    again = subprocess.run([python, "-c", FIRST_USE], capture_output=True, text=True, env=env, cwd=work)
    assert again.returncode == 0 and _states(again.stdout) == ("jit-cached",), again.stdout + again.stderr
    assert "compiling" not in again.stderr, again.stderr
    info = subprocess.run([python, "-m", "fastrnn", "info"], capture_output=True, text=True, env=env, cwd=work)
    assert info.returncode == 0 and ": jit-cached, " in info.stdout, info.stdout + info.stderr
    print(f"first use (compile, 2 processes) {compile_s:.0f} s")


# libstdc++'s own stream and locale code, which a library defines only when libstdc++ was linked into it.
_LIBSTDCXX_OWN = re.compile(r"_ZNSo9_M_insert|codecvt")
needs_nm = pytest.mark.skipif(shutil.which("nm") is None or sys.platform != "linux",
                              reason="needs nm (binutils) on Linux")


def _own_libstdcxx_symbols(path):
    out = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if _LIBSTDCXX_OWN.search(line)]


@needs_nm
def test_the_libraries_use_the_shared_libstdcxx():
    """No library of the extension (the op library and the capability copies next to it) carries a copy of
    libstdc++'s stream code: the H200 machine's g++ linked one in, and formatting an op's error crashed there
    (fastrnn/_build.py, LINK_FLAGS)."""
    from fastrnn import _jit

    where = _jit.load()[0].where  # the prebuilt library's file, or the first-use build's directory
    directory = where if os.path.isdir(where) else os.path.dirname(where)
    libraries = [os.path.join(directory, f) for f in os.listdir(directory) if f.startswith("_C") and f.endswith(".so")]
    assert len(libraries) >= 2 or not fastrnn._build.is_x86_64(), libraries
    for path in libraries:
        assert _own_libstdcxx_symbols(path) == [], path


@pytest.mark.slow
@needs_nm
def test_link_flags_override_a_static_libstdcxx_default(tmp_path):
    """A compiler that links libstdc++ statically (forced here with -static-libstdc++) gives the library its own
    stream code, and an integer formatted into a torch error message from it is lost (cut short here, a
    segfault on the H200); _build.LINK_FLAGS's shared libstdc++ keeps the message whole."""
    from torch.utils import cpp_extension

    source = tmp_path / "check.cpp"
    source.write_text(textwrap.dedent("""
        #include <torch/extension.h>
        void check(const at::Tensor& t) { TORCH_CHECK(t.dim() == 5, "shape ", t.sizes(), ", got ", t.dim(), " dims"); }
        PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("check", &check); }
    """))
    messages = {}
    for name, flags in (("static_only", ["-static-libstdc++"]),
                        ("with_link_flags", ["-static-libstdc++", *fastrnn._build.LINK_FLAGS])):
        build = tmp_path / name
        build.mkdir()
        try:
            module = cpp_extension.load(name=f"fastrnn_link_{name}", sources=[str(source)], extra_ldflags=flags,
                                        build_directory=str(build))
        except (RuntimeError, subprocess.CalledProcessError) as e:  # no libstdc++.a to link statically
            pytest.skip(f"cannot link libstdc++ statically here: {str(e).splitlines()[0]}")
        with pytest.raises(RuntimeError) as raised:
            module.check(torch.zeros(2, 3))
        messages[name] = (str(raised.value).splitlines()[0], _own_libstdcxx_symbols(module.__file__))
    text, own = messages["static_only"]
    assert own and "shape [2, 3], got 2 dims" not in text, messages  # the failure this guards against
    text, own = messages["with_link_flags"]
    assert own == [] and text.startswith("shape [2, 3], got 2 dims"), messages
