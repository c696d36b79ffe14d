"""Shared helpers of the integrations: a guarded import and a flat-vector splitter."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType

from torch import Tensor

__all__ = ["require", "split_flat"]


def require(module: str, dist: str) -> ModuleType:
    """Imports ``module`` or raises an ImportError that says which distribution to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"this integration needs {dist!r} ({err}): pip install {dist}, or pip install 'l2m_fast[peers]'"
        ) from err


def split_flat(flat: Tensor, names: Sequence[str], shapes: Sequence[tuple[int, ...]]) -> dict[str, Tensor]:
    """Splits a (P,) vector into name -> (*shape) views, in order."""
    flat = flat.detach().reshape(-1)
    total = sum(_numel(s) for s in shapes)
    if flat.numel() != total:
        raise ValueError(f"a flat vector of {flat.numel()} elements cannot hold parameters of {total} elements")
    out, pos = {}, 0
    for n, s in zip(names, shapes):
        k = _numel(s)
        out[n] = flat[pos : pos + k].view(s)
        pos += k
    return out


def _numel(shape: Sequence[int]) -> int:
    k = 1
    for d in shape:
        k *= int(d)
    return k
