"""Flat layout of a posterior's parameters: name -> (offset, shape), and views between the two.

The posterior covers some of a model's parameters in one global flat order (the sampling contract of
:mod:`l2m_fast.ops.reference`): the model's ``named_parameters()`` order, each tensor flattened
row-major. A batch of S samples is one ``(S, P)`` tensor; each parameter's samples are zero-copy
``(S, *shape)`` views into it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ParamSlot", "FlatLayout"]


@dataclass(frozen=True)
class ParamSlot:
    """Where one parameter lives in the flat vector.

    Attributes:
        name: the parameter's name in ``model.named_parameters()``.
        offset: index of its first element in the flat vector.
        shape: the parameter's shape.
    """

    name: str
    offset: int
    shape: tuple[int, ...]

    @functools.cached_property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @functools.cached_property
    def stop(self) -> int:
        return self.offset + self.numel


class FlatLayout:
    """An ordered set of named parameter slots packed back to back.

    Args:
        slots: the slots, in flat order, each starting where the previous one stops.
    """

    def __init__(self, slots: Iterable[ParamSlot]) -> None:
        self.slots: tuple[ParamSlot, ...] = tuple(slots)
        pos = 0
        for slot in self.slots:
            if slot.offset != pos:
                raise ValueError(f"slot {slot.name!r} starts at {slot.offset}, expected {pos}")
            pos = slot.stop
        self.numel: int = pos
        self._by_name = {s.name: s for s in self.slots}
        if len(self._by_name) != len(self.slots):
            raise ValueError("parameter names in a layout must be unique")

    @classmethod
    def from_shapes(cls, named_shapes: Iterable[tuple[str, tuple[int, ...] | torch.Size]]) -> FlatLayout:
        """Packs ``(name, shape)`` pairs in the order given."""
        slots, pos = [], 0
        for name, shape in named_shapes:
            slot = ParamSlot(name, pos, tuple(int(d) for d in shape))
            slots.append(slot)
            pos = slot.stop
        return cls(slots)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.slots)

    def __len__(self) -> int:
        return len(self.slots)

    def __iter__(self) -> Iterator[ParamSlot]:
        return iter(self.slots)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> ParamSlot:
        return self._by_name[name]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FlatLayout) and self.slots == other.slots

    def __hash__(self) -> int:
        return hash(self.slots)

    def to_spec(self) -> list[tuple[str, tuple[int, ...]]]:
        """A plain, picklable description: ``[(name, shape), ...]``."""
        return [(s.name, s.shape) for s in self.slots]

    def flatten(self, tensors: Mapping[str, Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
        """Packs one tensor per slot into a new flat vector.

        Args:
            tensors: name -> tensor of the slot's shape.
            dtype: dtype of the result.

        Returns:
            (P,) tensor.
        """
        if not self.slots:
            return torch.empty(0, dtype=dtype)
        parts = []
        for slot in self.slots:
            t = tensors[slot.name]
            if tuple(t.shape) != slot.shape:
                raise ValueError(f"{slot.name}: expected shape {slot.shape}, got {tuple(t.shape)}")
            parts.append(t.detach().reshape(-1).to(dtype))
        return torch.cat(parts)

    def views(self, flat: Tensor) -> dict[str, Tensor]:
        """Zero-copy views of a flat batch, one per slot.

        Args:
            flat: (P,) or (S, P).

        Returns:
            name -> (*shape) or (S, *shape) view into ``flat``.
        """
        if flat.shape[-1] != self.numel:
            raise ValueError(f"last dimension must be P={self.numel}, got {flat.shape[-1]}")
        lead = tuple(flat.shape[:-1])
        return {s.name: flat[..., s.offset : s.stop].view(*lead, *s.shape) for s in self.slots}
