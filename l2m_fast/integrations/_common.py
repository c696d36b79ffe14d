"""Shared helper of the integrations: a guarded import that names the distribution to install."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, dist: str) -> ModuleType:
    """Imports ``module`` or raises an ImportError that says which distribution to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"this integration needs {dist!r} ({err}): pip install {dist}, or pip install 'l2m_fast[peers]'"
        ) from err
