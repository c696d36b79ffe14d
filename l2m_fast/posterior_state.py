"""A posterior's saved form: what :meth:`L2MPosterior.state_dict` writes, and the checks a loaded one must pass.

A state is a plain dict of tensors, numbers, strings and lists (``torch.save``-able; the tensors load
with ``weights_only=True``). Everything the sampler trusts is checked on load, so an edited or foreign
state raises a ``ValueError`` naming the key and what is wrong instead of sampling garbage: the layout;
theta and v (float32, one value per element, v finite and non-negative); the segments (finite
coefficients, bounds covering the elements, a positive precision); the runs of global indices (they must
tile the local elements exactly); the per-parameter records (one per covered parameter, no other); the
temperatures (finite, the logit temperature positive).

Versions: 1 (before temperatures; loads with both at 1) and 2.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .layout import FlatLayout
from .ops.sample import check_values

__all__ = ["STATE_VERSION", "PosteriorState", "check_state"]

STATE_VERSION = 2
_FIX = "the state was not written by L2MPosterior.state_dict() of this version, or it was edited"


@dataclass(frozen=True)
class PosteriorState:
    """A checked posterior state (every field as :class:`L2MPosterior` keeps it)."""

    layout: FlatLayout
    theta: Tensor
    v: Tensor
    seg_a: Tensor
    seg_b: Tensor
    seg_bounds: Tensor
    mode: str
    kept_at_map: tuple[tuple[str, str], ...]
    param_dtypes: dict[str, torch.dtype]
    groups: dict[str, int]
    coefficients: dict[str, tuple[float, float]]
    runs: tuple[tuple[int, int, int], ...]
    global_numel: int
    is_sharded: bool
    temperature: float
    logit_temperature: float


def _bad(key: str, what: str) -> ValueError:
    return ValueError(f"posterior state {key!r}: {what}; {_FIX}")


def _get(state: Mapping[str, Any], key: str) -> Any:
    if key not in state:
        raise _bad(key, "missing")
    return state[key]


def _vector(state: Mapping[str, Any], key: str, dtype: torch.dtype, numel: int | None) -> Tensor:
    t = _get(state, key)
    if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype != dtype:
        got = f"{type(t).__name__} {tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
        raise _bad(key, f"must be a 1-D {dtype} tensor, got {got}")
    if numel is not None and t.numel() != numel:
        raise _bad(key, f"must have {numel} elements (one per covered element), got {t.numel()}")
    return t


def _per_name(state: Mapping[str, Any], key: str, names: tuple[str, ...]) -> Mapping[str, Any]:
    d = _get(state, key)
    if not isinstance(d, Mapping) or set(d) != set(names):
        extra = sorted(set(d) - set(names)) if isinstance(d, Mapping) else []
        missing = sorted(set(names) - set(d)) if isinstance(d, Mapping) else list(names)
        raise _bad(key, f"must name each covered parameter once (missing {missing[:3]}, unknown {extra[:3]})")
    return d


def _runs(state: Mapping[str, Any], numel: int) -> tuple[tuple[tuple[int, int, int], ...], int, bool]:
    sharded = bool(state.get("is_sharded", False))
    global_numel = state.get("global_numel", numel)
    raw = state.get("runs", [(0, 0, numel)])
    if isinstance(global_numel, bool) or not isinstance(global_numel, int) or global_numel < numel:
        raise _bad("global_numel", f"must be an int >= P={numel}, got {global_numel!r}")
    try:
        runs = tuple((int(lo), int(go), int(n)) for lo, go, n in raw)
    except (TypeError, ValueError):
        raise _bad("runs", f"must be (local_offset, global_offset, numel) triples, got {raw!r:.80}") from None
    pos = 0
    for lo, go, n in runs:
        if lo != pos or n < 0 or (n == 0 and numel) or go < 0 or go + n > global_numel:
            raise _bad("runs", f"must tile the {numel} local elements in order, within [0, {global_numel}): {runs[:4]}")
        pos += n
    if pos != numel:
        raise _bad("runs", f"cover {pos} of the {numel} local elements: every element must be in one run")
    if not sharded and (global_numel != numel or (numel and runs != ((0, 0, numel),))):
        raise _bad("runs", "an unsharded posterior has the one run (0, 0, P) and global_numel == P")
    return runs, global_numel, sharded


def _temperature(state: Mapping[str, Any], key: str, positive: bool) -> float:
    t = state.get(key, 1.0)
    number = isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)
    ok = number and (t > 0 or (t == 0 and not positive))
    if not ok:
        raise _bad(key, f"must be a finite number {'> 0' if positive else '>= 0'}, got {t!r}")
    return float(t)


def check_state(state: Mapping[str, Any]) -> PosteriorState:
    """Checks a saved posterior state (see the module docstring) and returns its fields.

    Args:
        state: a dict from :meth:`L2MPosterior.state_dict` (possibly through ``torch.save``/``torch.load``).

    Raises:
        ValueError: naming the first key that is missing or wrong.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"a posterior state is a dict from L2MPosterior.state_dict(), got {type(state).__name__}")
    version = state.get("version")
    if version not in (1, STATE_VERSION):
        raise _bad("version", f"unsupported version {version!r} (this l2m_fast reads 1 and {STATE_VERSION})")
    try:
        layout = FlatLayout.from_shapes(_get(state, "layout"))
    except (TypeError, ValueError) as err:
        raise _bad("layout", f"not a list of unique (name, shape) pairs ({err})") from None
    n, names = layout.numel, layout.names
    theta = _vector(state, "theta", torch.float32, n)
    v = _vector(state, "v", torch.float32, n)
    seg_a = _vector(state, "seg_a", torch.float32, None)
    seg_b = _vector(state, "seg_b", torch.float32, seg_a.numel())
    seg_bounds = _vector(state, "seg_bounds", torch.int64, seg_a.numel() + 1)
    if not (theta.device == v.device == seg_a.device == seg_b.device == seg_bounds.device):
        raise _bad("theta", "theta, v and the segments must be on one device")
    try:
        if n:
            check_values(v, seg_a, seg_b, seg_bounds)
    except ValueError as err:
        raise _bad("v", str(err)) from None
    runs, global_numel, sharded = _runs(state, n)
    dtypes = {}
    for name, d in _per_name(state, "param_dtypes", names).items():
        dt = getattr(torch, str(d), None)
        if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
            raise _bad("param_dtypes", f"{name!r} has {d!r}, not a floating-point torch dtype")
        dtypes[name] = dt
    groups = {k: int(g) for k, g in _per_name(state, "groups", names).items()}
    coefficients = {k: (float(c[0]), float(c[1])) for k, c in _per_name(state, "coeffs", names).items()}
    kept = tuple((str(a), str(b)) for a, b in state.get("kept_at_map", ()))
    return PosteriorState(
        layout=layout,
        theta=theta,
        v=v,
        seg_a=seg_a,
        seg_b=seg_b,
        seg_bounds=seg_bounds,
        mode=str(_get(state, "mode")),
        kept_at_map=kept,
        param_dtypes={k: dtypes[k] for k in names},
        groups={k: groups[k] for k in names},
        coefficients={k: coefficients[k] for k in names},
        runs=runs,
        global_numel=global_numel,
        is_sharded=sharded,
        temperature=_temperature(state, "temperature", positive=False),
        logit_temperature=_temperature(state, "logit_temperature", positive=True),
    )
