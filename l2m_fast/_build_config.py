"""How the C++ CPU kernel is compiled: one source for ``setup.py`` (built at install) and the JIT build.

``setup.py`` loads this file by path (the package is not importable while it is being built), so it
imports nothing.
"""

KERNEL_SOURCES = ("sampler_op.cpp", "sampler_kernels.cpp")
"""The kernel's translation units in ``csrc/``; the installed extension adds ``module.cpp``."""

EXTENSION_SOURCES = (*KERNEL_SOURCES, "module.cpp")

SHIPPED_PATTERNS = ("*.cpp", "*.h", "*.inc")
"""What a non-editable install copies to ``l2m_fast/_csrc`` for the JIT build."""

CFLAGS = ("-O3", "-std=c++17", "-ffp-contract=off", "-fno-math-errno", "-Wno-psabi")
"""``-ffp-contract=off`` keeps every instruction set bit-identical (no fused multiply-adds); never
``-march=native``: the kernels for each instruction set are compiled into one binary, chosen at run time."""
