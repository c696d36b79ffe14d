"""Where a posterior keeps theta and v: a snapshot (two flat float32 vectors), or the live tensors themselves.

* **Snapshot** (default, :class:`FlatStore`): :func:`take_snapshot` copies each parameter and its second
  moment into two new flat vectors in the layout's order, so training on afterwards does not change the
  posterior. One pass per tensor (``l2m_fast.ops.copy_checked_``): the moment is validated (finite,
  non-negative) as it is copied, no temporaries, and the fresh vectors are backed by huge pages where
  Linux allows, so a build costs about two copies. Extra memory: two copies of the covered parameters.
* **Live** (``snapshot=False``, :class:`LiveStore`): the posterior keeps references to the tensors the
  parameters and the optimizer state held at construction and samples straight from them, one sampler
  call per tensor. No copy at all, so the memory-bound can afford a posterior; but training on (an
  optimizer step writes those tensors in place) changes it, and the posterior says so in its repr. The
  in-place contexts still restore exactly: they rebind a parameter's ``.data`` and never write the
  tensor the posterior reads. Requires float32, contiguous, unsharded parameters and moments.

Either store hands the sampler *pieces*: runs of consecutive local elements with their theta, v and the
global flat index of their first element.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .layout import FlatLayout
from .ops import BadValueError, copy_checked_
from .ops.cpu import advise_huge_pages
from .sharding import Run, is_dtensor, localize

__all__ = ["Piece", "FlatStore", "LiveStore", "Store", "Snapshot", "take_snapshot"]

Piece = tuple[int, int, Tensor, Tensor, int]
"""``(first, last, theta, v, element_offset)``: local elements ``[first, last)``, their theta and v (1-D
float32), and the global flat index of element ``first``."""


@dataclass(frozen=True)
class FlatStore:
    """theta and v copied into two flat float32 vectors, with the runs of global indices they hold."""

    theta: Tensor
    v: Tensor
    runs: tuple[Run, ...]
    live = False

    def pieces(self, start: int, stop: int) -> Iterator[Piece]:
        """The runs overlapping local elements ``[start, stop)``."""
        for lo, go, n in self.runs:
            first, last = max(lo, start), min(lo + n, stop)
            if first < last:
                yield first, last, self.theta[first:last], self.v[first:last], go + (first - lo)

    def flat_theta(self) -> Tensor:
        return self.theta

    def flat_v(self) -> Tensor:
        return self.v

    def to(self, device: torch.device | str) -> FlatStore:
        return FlatStore(self.theta.to(device), self.v.to(device), self.runs)


@dataclass(frozen=True)
class LiveStore:
    """The live tensors of each covered parameter and its moment (1-D float32 views), and their offsets."""

    thetas: tuple[Tensor, ...]
    vs: tuple[Tensor, ...]
    offsets: tuple[int, ...]
    live = True

    def pieces(self, start: int, stop: int) -> Iterator[Piece]:
        """One piece per tensor overlapping local elements ``[start, stop)``."""
        for theta, v, off in zip(self.thetas, self.vs, self.offsets):
            first, last = max(off, start), min(off + theta.numel(), stop)
            if first < last:
                yield first, last, theta[first - off : last - off], v[first - off : last - off], first

    def flat_theta(self) -> Tensor:
        """A flat copy of the live weights (what the posterior reads now)."""
        return torch.cat(self.thetas) if self.thetas else torch.empty(0)

    def flat_v(self) -> Tensor:
        """A flat copy of the live second moments."""
        return torch.cat(self.vs) if self.vs else torch.empty(0)

    def to(self, device: torch.device | str) -> LiveStore:
        raise ValueError(
            "a posterior built with snapshot=False reads the live tensors where they are: move the model (and "
            "optimizer) and build it again, or build it with snapshot=True to get a copy that can move"
        )


Store = FlatStore | LiveStore


@dataclass(frozen=True)
class Snapshot:
    """What a posterior keeps of its parameters.

    Attributes:
        layout: the flat layout (local shapes for a sharded model).
        store: where theta and v are (:class:`FlatStore` or :class:`LiveStore`).
        runs: ``(local_offset, global_offset, numel)`` runs of consecutive global indices.
        global_numel: P of the whole, unsharded model.
        is_sharded: built from DTensor parameters.
        param_dtypes: name -> the parameter's dtype at construction.
        device: where theta and v are.
    """

    layout: FlatLayout
    store: Store
    runs: tuple[Run, ...]
    global_numel: int
    is_sharded: bool
    param_dtypes: dict[str, torch.dtype]
    device: torch.device


def _check_entries(entries: Sequence[tuple[str, Tensor, Tensor]], stacklevel: int) -> None:
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


def _live(entries: Sequence[tuple[str, Tensor, Tensor]], layout: FlatLayout) -> LiveStore:
    thetas, vs = [], []
    for name, p, v in entries:
        for what, t in (("parameter", p), ("second moment", v)):
            if t.dtype != torch.float32 or not t.is_contiguous():
                raise ValueError(
                    f"snapshot=False reads the live tensors, but the {what} of {name!r} is {t.dtype}"
                    f"{'' if t.is_contiguous() else ', non-contiguous'}: the sampler reads contiguous float32 "
                    "only; build the posterior with snapshot=True (the default)"
                )
        if v.device != p.device:
            raise ValueError(f"parameter {name!r} is on {p.device} but its second moment on {v.device}")
        thetas.append(p.detach().view(-1))
        vs.append(v.detach().view(-1))
    return LiveStore(tuple(thetas), tuple(vs), tuple(s.offset for s in layout))


def take_snapshot(
    entries: Sequence[tuple[str, Tensor, Tensor]],
    device: torch.device | str | None = None,
    *,
    snapshot: bool = True,
    stacklevel: int = 4,
) -> Snapshot:
    """Keeps ``(name, param, v)`` entries: copied into flat vectors, or (``snapshot=False``) by reference.

    Args:
        entries: in flat order; ``v`` has the parameter's shape (or is a DTensor laid out like it).
        device: where a snapshot lives (default: the first parameter's device).
        snapshot: copy (default) or read the live tensors (see the module docstring).
        stacklevel: of the float64 warning.

    Raises:
        ValueError: a second moment's shape differs from its parameter's; a live tensor the sampler cannot
            read. TypeError: a parameter that is not real floating-point.
    """
    _check_entries(entries, stacklevel)
    dev = torch.device(device if device is not None else (entries[0][1].device if entries else "cpu"))
    numel = sum(p.numel() for _, p, _ in entries)
    runs: tuple[Run, ...] = ((0, 0, numel),)
    global_numel, sharded = numel, False
    if any(is_dtensor(p) or is_dtensor(v) for _, p, v in entries):
        if not snapshot:
            raise ValueError(
                "snapshot=False reads whole live tensors; a sharded (DTensor / FSDP2) model keeps shards: "
                "build the posterior with snapshot=True (the default)"
            )
        entries, runs, global_numel, sharded = localize(entries)
    layout = FlatLayout.from_shapes((n, p.shape) for n, p, _ in entries)
    dtypes = {n: p.dtype for n, p, _ in entries}
    if not snapshot:
        store: Store = _live(entries, layout)
        return Snapshot(layout, store, runs, global_numel, sharded, dtypes, entries[0][1].device if entries else dev)
    theta, v = _flat_copies(entries, layout, dev)
    return Snapshot(layout, FlatStore(theta, v, runs), runs, global_numel, sharded, dtypes, dev)


def _flat_copies(
    entries: Sequence[tuple[str, Tensor, Tensor]], layout: FlatLayout, device: torch.device
) -> tuple[Tensor, Tensor]:
    """theta and v copied into two fresh flat vectors, one checked pass per tensor (the moments validated)."""
    theta = torch.empty(layout.numel, dtype=torch.float32, device=device)
    v = torch.empty(layout.numel, dtype=torch.float32, device=device)
    advise_huge_pages(theta)  # once for the whole vector: the per-tensor slices may be too small to advise
    advise_huge_pages(v)
    with torch.no_grad():
        for (name, p, m), slot in zip(entries, layout):
            p, m = p.detach(), m.detach()
            if p.device != device:
                p, m = p.to(device), m.to(device)
            copy_checked_(theta[slot.offset : slot.stop], p, check_moment=False)
            try:
                copy_checked_(v[slot.offset : slot.stop], m, check_moment=True)
            except BadValueError as err:
                raise ValueError(
                    f"parameter {name!r}: its second moment has a {err.reason} value ({err.value}) at element "
                    f"{err.index} (did training diverge?); fix the optimizer state, or leave the parameter out "
                    "with params=..."
                ) from None
    return theta, v
