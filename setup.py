"""Build script: the C++ CPU sampler ``l2m_fast._C`` when torch is importable at build time.

* ``pip install --no-build-isolation -e .`` (torch installed): builds ``l2m_fast._C`` from ``csrc/``.
* ``pip install .`` (build isolation, no torch in the build env): no extension is built; the C++
  sources are shipped as ``l2m_fast/_csrc`` and compiled with ninja on first use (JIT, cached).
* ``L2M_FAST_NO_BUILD=1``: never build the extension (JIT or reference at run time).

No hardware is probed here: the kernels for every instruction set are compiled into one binary and
chosen at run time. Project metadata lives in pyproject.toml.
"""

from __future__ import annotations

import runpy
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
# The package cannot be imported while it is being built: its two settings files are loaded by path.
BUILD = runpy.run_path(str(ROOT / "l2m_fast" / "_build_config.py"))
env_flag = runpy.run_path(str(ROOT / "l2m_fast" / "_env.py"))["env_flag"]


class BuildPyWithSources(build_py):
    """Also copies ``csrc/`` into the package as ``l2m_fast/_csrc`` for the JIT build of installed copies."""

    def run(self) -> None:
        super().run()
        if self.editable_mode or not CSRC.is_dir():
            return  # an editable install finds csrc/ in the source tree
        dest = Path(self.build_lib) / "l2m_fast" / "_csrc"
        dest.mkdir(parents=True, exist_ok=True)
        for pattern in BUILD["SHIPPED_PATTERNS"]:
            for f in CSRC.glob(pattern):
                shutil.copy2(f, dest / f.name)


def _extensions() -> tuple[list, dict]:
    if env_flag("L2M_FAST_NO_BUILD"):
        print("l2m_fast: L2M_FAST_NO_BUILD is set, not building l2m_fast._C (JIT at first use)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("l2m_fast: torch is not importable at build time, not building l2m_fast._C (JIT at first use)")
        return [], {}
    openmp = ["-fopenmp"] if torch._C.has_openmp else []  # at::parallel_for uses OpenMP
    ext = CppExtension(
        "l2m_fast._C",
        sources=[f"csrc/{f}" for f in BUILD["EXTENSION_SOURCES"]],
        extra_compile_args=[*BUILD["CFLAGS"], *openmp],
        extra_link_args=openmp,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
cmdclass["build_py"] = BuildPyWithSources
setup(ext_modules=ext_modules, cmdclass=cmdclass)
