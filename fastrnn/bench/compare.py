"""`bench --base REV`: run another commit's kernels under this commit's benchmark harness.

The base revision is exported with `git archive` into a temporary directory (the checkout, its index
and its branches are left alone), this tree's fastrnn/bench and fastrnn/__main__.py replace the base's
so both runs are timed by the same code, the compiled extension is built there when the base has one,
and a child process runs the same case set and reports its rows back as JSON.
"""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .machine import PACKAGE_DIR, REPO_DIR

# The sources of the compiled extension: when the base has the same ones as this working tree, this
# tree's built extension is copied instead of compiled again (several minutes on 2 cores).
_EXTENSION_SOURCES = ("csrc", "setup.py", "fastrnn/_build.py", "CMakeLists.txt")


def _git(*args):
    return subprocess.run(["git", *args], cwd=REPO_DIR, capture_output=True, check=False)


def child_argv(args, set_name):
    """The bench arguments of this run, for the base run (which neither saves nor plots)."""
    argv = ["bench", "--cases", set_name, "--device", args.device, "--passes", ",".join(args.passes),
            "--no-save", "--no-plot"]
    if args.mode == "full":
        argv.append("--full")
    if args.backends:
        argv += ["--backends", ",".join(args.backends)]
    if args.cells:
        argv += ["--cells", ",".join(args.cells)]
    if args.dtype:
        argv += ["--dtype", args.dtype]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.no_memory:
        argv.append("--no-memory")
    return argv


def _export(revision, directory):
    archive = _git("archive", "--format=tar", revision)
    if archive.returncode != 0:
        sys.exit(f"fastrnn bench --base: git archive {revision} failed: {archive.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        # The "data" filter (Python >= 3.10.12/3.11.4) refuses links and paths that leave `directory`.
        if hasattr(tarfile, "data_filter"):
            tar.extractall(directory, filter="data")
        else:
            tar.extractall(directory)
    base_package = Path(directory) / "fastrnn"
    shutil.rmtree(base_package / "bench", ignore_errors=True)
    shutil.copytree(PACKAGE_DIR / "bench", base_package / "bench", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(PACKAGE_DIR / "__main__.py", base_package / "__main__.py")


# The backends that live in the compiled extension (auto runs it wherever it is built).
_COMPILED_BACKENDS = {"cpu", "cuda", "auto"}


def _extension(revision, directory, backends):
    """Puts the base's compiled extension in place: this tree's when the sources match, else a build
    (skipped when the run asks only for backends outside the extension)."""
    directory = Path(directory)
    if not (directory / "setup.py").exists() or (backends and not _COMPILED_BACKENDS & set(backends)):
        return
    present = [p for p in _EXTENSION_SOURCES if (REPO_DIR / p).exists()]
    same_sources = _git("diff", "--quiet", revision, "--", *present).returncode == 0
    built = sorted(PACKAGE_DIR.glob("_C*.so")) + sorted(PACKAGE_DIR.glob("_C*.pyd"))
    if same_sources and built:
        for library in built:
            shutil.copy2(library, directory / "fastrnn" / library.name)
        print(f"fastrnn bench --base: {revision} has this tree's extension sources; reusing its build",
              file=sys.stderr)
        return
    print(f"fastrnn bench --base: building {revision}'s extension (python setup.py build_ext --inplace)...",
          file=sys.stderr)
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=directory,
                           capture_output=True, text=True)
    if build.returncode != 0:
        log = (build.stdout + build.stderr).splitlines()
        # The compiler's own error lines say why; the Python traceback after them does not.
        reasons = list(dict.fromkeys(line for line in log if "error:" in line.lower()))[:10] or log[-20:]
        print(f"fastrnn bench --base: the build of {revision} failed; its compiled backends will be missing "
              f"from the comparison:\n" + "\n".join(reasons), file=sys.stderr)


# The child's entry point. An editable install (pip install -e, as scripts/env.sh does) adds an import
# finder that maps fastrnn to this working tree; it would supply fastrnn._C to the base whenever the base
# has none of its own, and the base would silently time this tree's kernels. The child drops that
# finder and checks that fastrnn comes from the base directory (its working directory).
_CHILD = (
    "import os, runpy, sys; "
    "sys.meta_path[:] = [f for f in sys.meta_path if '__editable___fastrnn' not in getattr(f, '__module__', '')]; "
    "import fastrnn; "
    "here = os.path.realpath(os.path.dirname(os.path.dirname(fastrnn.__file__))); "
    "assert here == os.path.realpath(os.getcwd()), f'the base run imported fastrnn from {here}'; "
    "runpy.run_module('fastrnn', run_name='__main__', alter_sys=True)"
)


def run_base(revision, args, set_name):
    """The rows of `revision`'s kernels on the same cases, commit set to the revision's hash."""
    if REPO_DIR is None:
        sys.exit("fastrnn bench --base needs a git checkout of fastrnn")
    resolved = _git("rev-parse", "--short=12", "--verify", f"{revision}^{{commit}}")
    if resolved.returncode != 0:
        sys.exit(f"fastrnn bench --base: unknown revision {revision!r}")
    commit = resolved.stdout.decode().strip()
    with tempfile.TemporaryDirectory(prefix="fastrnn-base-") as directory:
        _export(commit, directory)
        _extension(commit, directory, args.backends)
        out = Path(directory) / "base-rows.json"
        argv = child_argv(args, set_name) + ["--label", f"base {commit}", "--json-out", str(out)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [directory, os.environ.get("PYTHONPATH")]))}
        print(f"fastrnn bench --base: running {commit}", file=sys.stderr)
        child = subprocess.run([sys.executable, "-c", _CHILD, *argv], cwd=directory, env=env)
        if child.returncode != 0 or not out.exists():
            sys.exit(f"fastrnn bench --base: the run of {commit} failed (exit status {child.returncode})")
        rows = json.loads(out.read_text())
    for row in rows:
        row["commit"] = commit
    return rows
