"""Build of fastrnn (docs/api.md, "Install and build"). The metadata lives in pyproject.toml; what to
compile lives in fastrnn/_build.py, shared with the compile-on-first-use builder (fastrnn/_jit.py).

    pip install .                               torch is not importable in pip's isolated build
                                                environment: a pure-Python wheel (carrying csrc/ under
                                                fastrnn/csrc), and fastrnn compiles its ops on first use
                                                against the torch that runs it
    pip install --no-build-isolation -e .       torch importable: fastrnn._C is built now, against it
    python setup.py build_ext --inplace         likewise, in the checkout

torch is deliberately not a build requirement: pip would install one into the isolated environment
(a CUDA build, GBs), and an extension must be built against the torch it runs with anyway.
Build switches: FASTRNN_SKIP_CUDA_BUILD, FASTRNN_CUDA_ARCHS, FASTRNN_CPU_CAPABILITIES, MAX_JOBS (_build.py).
"""

import importlib.util
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))

# By path: importing the package would import torch, which pip's isolated build environment lacks.
_spec = importlib.util.spec_from_file_location("fastrnn_build", os.path.join(ROOT, "fastrnn", "_build.py"))
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)


class BuildPy(build_py):
    """Also copies csrc/ into the wheel as fastrnn/csrc/, so that an installed package can compile its
    ops on first use. An editable install needs no copy: fastrnn/_build.py finds csrc/ beside the package."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for path in _build.source_files(ROOT):
            target = os.path.join(self.build_lib, "fastrnn", path)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(os.path.join(ROOT, path), target)


def _ext_modules():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as e:
        print(
            f"fastrnn: torch is not importable at build time ({e}), so this build compiles no extension; "
            "fastrnn compiles its ops on first use against the torch that runs it (a few minutes, once). "
            "To compile them now: install torch, then pip install --no-build-isolation .",
            file=sys.stderr,
        )
        return [], {}
    with_cuda = _build.cuda_reason(torch.version.cuda, CUDA_HOME) is None
    modules = []
    for spec in _build.extensions(ROOT, with_cuda):
        if spec.cuda:
            os.environ["TORCH_CUDA_ARCH_LIST"] = _build.cuda_archs()
            modules.append(CUDAExtension(
                f"fastrnn.{spec.name}", list(spec.sources),
                extra_compile_args={"cxx": list(spec.cxx_flags), "nvcc": list(spec.nvcc_flags)},
                extra_link_args=list(spec.link_flags),
            ))
        else:
            modules.append(CppExtension(
                f"fastrnn.{spec.name}", list(spec.sources),
                extra_compile_args={"cxx": list(spec.cxx_flags)}, extra_link_args=list(spec.link_flags),
            ))
    return modules, {"build_ext": BuildExtension}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPy, **cmdclass})
