"""The environment variables l2m_fast reads, and the one way it reads them.

Every variable is a switch: unset, empty or ``"0"`` means off, anything else on. ``setup.py`` loads this
file by path (the package is not importable while it is being built), so it imports nothing.
"""

from __future__ import annotations

import os

__all__ = ["ENV_VARS", "env_flag"]

ENV_VARS: dict[str, str] = {
    "L2M_FAST_FORCE_REFERENCE": "run the pure-PyTorch reference on the CPU instead of the compiled C++ kernel",
    "L2M_FAST_NO_BUILD": "`pip install` builds no C++ extension (the kernel is JIT-compiled with ninja on first use)",
    "L2M_FAST_REQUIRE_COMPILED": "tests fail unless the C++ kernel built at install time is the one in use (CI)",
    "TRITON_INTERPRET": "Triton's own switch: run Triton kernels on the CPU in its interpreter (how the Triton "
    "kernels are tested without a GPU); must be set before Triton is imported",
}
"""Name -> what switching it on does (the README's table of environment variables)."""


def env_flag(name: str) -> bool:
    """Whether the switch ``name`` (one of :data:`ENV_VARS`) is on: set to anything but ``""`` or ``"0"``."""
    if name not in ENV_VARS:
        raise KeyError(f"{name} is not one of l2m_fast's environment variables {sorted(ENV_VARS)}")
    return os.environ.get(name, "") not in ("", "0")
