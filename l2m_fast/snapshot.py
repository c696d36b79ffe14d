"""The posterior's copy of theta and v: one flat float32 vector each, in the layout's order.

:func:`take_snapshot` checks the entries (shapes, floating dtypes), keeps a sharded parameter's local
shards with their global flat indices (:mod:`l2m_fast.sharding`), and copies the tensors into two new
flat vectors, so that training on afterwards does not change the posterior.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .layout import FlatLayout
from .sharding import Run, is_dtensor, localize

__all__ = ["Snapshot", "take_snapshot"]


@dataclass(frozen=True)
class Snapshot:
    """theta and v of the covered parameters, flat.

    Attributes:
        layout: the flat layout (local shapes for a sharded model).
        theta: (P,) float32.
        v: (P,) float32.
        runs: ``(local_offset, global_offset, numel)`` runs of consecutive global indices.
        global_numel: P of the whole, unsharded model.
        is_sharded: built from DTensor parameters.
        param_dtypes: name -> the parameter's dtype at construction.
    """

    layout: FlatLayout
    theta: Tensor
    v: Tensor
    runs: tuple[Run, ...]
    global_numel: int
    is_sharded: bool
    param_dtypes: dict[str, torch.dtype]


def take_snapshot(
    entries: Sequence[tuple[str, Tensor, Tensor]], device: torch.device | str | None = None, stacklevel: int = 4
) -> Snapshot:
    """Copies ``(name, param, v)`` entries into a :class:`Snapshot`.

    Args:
        entries: in flat order; ``v`` has the parameter's shape (or is a DTensor laid out like it).
        device: where the snapshot lives (default: the first parameter's device).
        stacklevel: of the float64 warning.

    Raises:
        ValueError: a second moment's shape differs from its parameter's. TypeError: a parameter that is
            not floating-point.
    """
    for name, p, v in entries:
        if tuple(v.shape) != tuple(p.shape):
            raise ValueError(f"parameter {name!r}: second moment shape {tuple(v.shape)} != {tuple(p.shape)}")
        if not p.is_floating_point():
            raise TypeError(f"parameter {name!r} is {p.dtype}: only real floating-point parameters can be sampled")
        if p.device.type == "meta" or v.device.type == "meta":
            raise ValueError(
                f"parameter {name!r} (or its second moment) is on the meta device and holds no values: "
                "materialise the model and optimizer state first (e.g. model.to_empty(device=...) and load_state_dict)"
            )
    wide = [name for name, p, _ in entries if p.dtype == torch.float64]
    if wide:
        warnings.warn(
            f"parameters {wide[:4]} are float64: the sampling contract computes in float32, so the posterior's "
            "mean is theta rounded to float32 and samples written back carry that rounding",
            stacklevel=stacklevel,
        )
    dev = torch.device(device if device is not None else (entries[0][1].device if entries else "cpu"))
    numel = sum(p.numel() for _, p, _ in entries)
    runs: tuple[Run, ...] = ((0, 0, numel),)
    global_numel, sharded = numel, False
    if any(is_dtensor(p) or is_dtensor(v) for _, p, v in entries):
        entries, runs, global_numel, sharded = localize(entries)
    layout = FlatLayout.from_shapes((n, p.shape) for n, p, _ in entries)
    with torch.no_grad():
        theta = layout.flatten({n: p for n, p, _ in entries}).to(dev)
        v = layout.flatten({n: v for n, _, v in entries}).to(dev)
        if layout.numel and theta.data_ptr() == entries[0][1].data_ptr():
            theta = theta.clone()
    return Snapshot(layout, theta, v, runs, global_numel, sharded, {n: p.dtype for n, p, _ in entries})
