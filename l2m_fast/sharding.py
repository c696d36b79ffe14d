"""Sharded parameters (DTensor / FSDP2): which global flat indices a rank holds, and FSDP2's own tensors.

The sampling contract (:mod:`l2m_fast.ops.reference`) makes each element's sample a function of
``(seed, global flat index, sample index)`` only. A rank that holds a shard of a parameter therefore draws
exactly the elements one process would draw for the unsharded model, with no communication, if it
knows the global flat index of each of its local elements. This module computes those indices; the
posterior keeps them and samples each run of consecutive global indices with its ``element_offset``.

**Global flat order.** The covered parameters in ``named_parameters()`` order, each tensor flattened
row-major with its *global* (unsharded) shape. A parameter's global offset is the sum of the global
sizes of the covered parameters before it.

**Local runs.** A rank's local tensor of a DTensor is a box of the global tensor: ``local_shape`` at
``global_offset`` (``torch.distributed.tensor._utils.compute_local_shape_and_global_offset``, which
follows ``torch.chunk``, hence FSDP2's uneven ``Shard(0)``). A box is a set of runs of consecutive
global indices: for ``Shard(0)`` (FSDP2) the local rows ``[r0, r1)`` are one run
``[off + r0 * rowlen, off + r1 * rowlen)``; for ``Replicate`` the whole tensor is one run; for
``Shard(d)`` with ``d > 0`` there is one run per index of the dimensions before the innermost sharded
one. The posterior keeps its local elements back to back and a tuple of runs
``(local_offset, global_offset, numel)``, merging runs that continue each other.

Beside the placement maths, the two things the library needs from FSDP2 itself: resharding a model
(:func:`reshard_fsdp`) and the unsharded parameters a forward ran with (:func:`fsdp2_graph_params`).

Only ``Shard`` and ``Replicate`` placements are supported (``Partial`` is not a parameter layout;
``_StridedShard``, used when FSDP2 and tensor parallelism shard the same dimension, is refused).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "Run",
    "is_dtensor",
    "local_box",
    "box_runs",
    "merge_runs",
    "localize",
    "reshard_fsdp",
    "has_fsdp2",
    "fsdp2_graph_params",
]

Run = tuple[int, int, int]
"""``(local_offset, global_offset, numel)``: local elements ``[lo, lo + n)`` have global indices
``[go, go + n)``."""


def is_dtensor(t: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (without importing torch.distributed eagerly)."""
    if not isinstance(t, Tensor) or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _check_placements(name: str, t: Tensor) -> None:
    from torch.distributed.tensor import Replicate, Shard

    for pl in t.placements:  # type: ignore[attr-defined]
        if type(pl) not in (Shard, Replicate):
            raise NotImplementedError(
                f"parameter {name!r} has placement {pl}: a sharded posterior supports Shard(d) and Replicate "
                "only (FSDP2's fully_shard gives Shard(0)); redistribute it or leave it out with params=..."
            )


def local_box(name: str, t: Tensor) -> tuple[Tensor, tuple[int, ...], tuple[int, ...]]:
    """This rank's part of a (D)Tensor as a box of the global tensor.

    Args:
        name: the parameter's name, for errors.
        t: a DTensor (Shard / Replicate placements) or a plain tensor (held whole by every rank).

    Returns:
        ``(local, local_shape, offset)``: the local tensor (a view, not a copy), its shape and the global
        index of its first element along each dimension.
    """
    if not is_dtensor(t):
        return t, tuple(t.shape), (0,) * t.dim()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _check_placements(name, t)
    with torch.no_grad():
        local = t.to_local()  # type: ignore[attr-defined]
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)  # type: ignore[attr-defined]
    shape = tuple(int(d) for d in shape)
    if tuple(local.shape) != shape:
        raise ValueError(
            f"parameter {name!r}: local shard has shape {tuple(local.shape)} but its placements give {shape}; "
            "the DTensor's local tensor is not the standard torch.chunk shard"
        )
    return local, shape, tuple(int(o) for o in offset)


def box_runs(global_shape: Sequence[int], local_shape: Sequence[int], offset: Sequence[int]) -> list[Run]:
    """Runs of consecutive global indices covered by a box, in row-major order of the box.

    Args:
        global_shape: the whole tensor's shape.
        local_shape: the box's shape.
        offset: the box's first index along each dimension.

    Returns:
        ``(local_offset, global_offset, numel)`` relative to the tensor's first element; empty for an
        empty box.
    """
    g, loc, off = list(global_shape), list(local_shape), list(offset)
    numel = 1
    for d in loc:
        numel *= d
    if numel == 0:
        return []
    if not g:
        return [(0, 0, 1)]
    # k: the outermost dimension from which the box is contiguous in the global order.
    k = len(g) - 1
    while k > 0 and loc[k] == g[k]:
        k -= 1
    run = 1
    for d in loc[k:]:
        run *= d
    strides = [1] * len(g)
    for i in range(len(g) - 2, -1, -1):
        strides[i] = strides[i + 1] * g[i + 1]
    runs: list[Run] = []
    for j, idx in enumerate(itertools.product(*(range(n) for n in loc[:k]))):
        start = sum((o + i) * st for o, i, st in zip(off[:k], idx, strides[:k])) + off[k] * strides[k]
        runs.append((j * run, start, run))
    return runs


def merge_runs(runs: list[Run]) -> list[Run]:
    """Merges runs that continue each other in both the local and the global order."""
    out: list[Run] = []
    for lo, go, n in runs:
        if out and out[-1][0] + out[-1][2] == lo and out[-1][1] + out[-1][2] == go:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + n)
        else:
            out.append((lo, go, n))
    return out


def localize(
    entries: Sequence[tuple[str, Tensor, Tensor]],
) -> tuple[list[tuple[str, Tensor, Tensor]], tuple[Run, ...], int, bool]:
    """Replaces DTensor parameters and moments by this rank's local tensors and computes the runs.

    A parameter may be a DTensor while its moment is a plain tensor of the global shape (a full,
    unsharded optimizer state): each rank then slices its own box out of it. A plain parameter is
    held whole by every rank.

    Args:
        entries: ``(name, param, v)`` in the global flat order; param and v have the same global shape.

    Returns:
        ``(local_entries, runs, global_numel, sharded)``: entries holding local views, the merged runs
        over the local flat vector, the global P, and whether any parameter was a DTensor.
    """
    local_entries, runs = [], []
    local_pos = global_pos = 0
    sharded = False
    for name, p, v in entries:
        if is_dtensor(v) and not is_dtensor(p):
            raise TypeError(f"parameter {name!r} is a plain tensor but its second moment a DTensor")
        p_local, shape, offset = local_box(name, p)
        if is_dtensor(p):
            sharded = True
            if is_dtensor(v):
                if v.placements != p.placements or v.device_mesh != p.device_mesh:  # type: ignore[attr-defined]
                    raise ValueError(
                        f"parameter {name!r}: its second moment is laid out as {v.placements} on "  # type: ignore[attr-defined]
                        f"{v.device_mesh}, the parameter as {p.placements} on {p.device_mesh}; they must match"  # type: ignore[attr-defined]
                    )
                v_local = local_box(name, v)[0]
            else:
                v_local = v[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
        else:
            v_local = v
        for lo, go, n in box_runs(p.shape, shape, offset):
            runs.append((local_pos + lo, global_pos + go, n))
        local_entries.append((name, p_local, v_local))
        local_pos += p_local.numel()
        global_pos += p.numel()
    return local_entries, tuple(merge_runs(runs)), global_pos, sharded


def reshard_fsdp(model: nn.Module) -> None:
    """Reshards every FSDP2 module of ``model`` (frees unsharded parameters; no communication).

    After a forward under ``no_grad`` FSDP2 leaves the root module unsharded (its
    ``reshard_after_forward`` defaults to False), with plain unsharded tensors registered as its
    parameters. Resharding registers the sharded DTensor parameters again, and the next forward
    all-gathers them afresh.
    """
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def has_fsdp2(model: nn.Module) -> bool:
    """Whether any module of ``model`` is an FSDP2 (``fully_shard``) module."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def fsdp2_graph_params(model: nn.Module) -> dict[int, Tensor]:
    """``id(sharded parameter) -> the unsharded parameter`` that FSDP2 ran its last forward with.

    FSDP2 all-gathers each sharded DTensor parameter into an unsharded one before a module's forward;
    that unsharded tensor, not the sharded parameter, is the leaf of the autograd graph (the sharded
    gradient arrives later, through FSDP2's reduce-scatter). Differentiating a loss with respect to it
    gives the whole parameter's gradient from this rank's inputs, and writes no ``.grad``. Parameters of
    modules that have not run a forward yet are absent.

    Raises:
        NotImplementedError: this torch's FSDP2 does not keep its parameters where this reads them.
    """
    from torch.distributed.fsdp import FSDPModule

    found: dict[int, Tensor] = {}
    for m in model.modules():
        if not isinstance(m, FSDPModule):
            continue
        try:
            state = m._get_fsdp_state()
            if hasattr(state, "_fsdp_param_groups"):
                groups = state._fsdp_param_groups
            else:  # earlier FSDP2: one group per module, or none
                groups = [g for g in (state._fsdp_param_group,) if g is not None]
            for group in groups:
                for fp in group.fsdp_params:
                    if hasattr(fp, "_unsharded_param"):
                        found[id(fp.sharded_param)] = fp._unsharded_param
        except AttributeError as err:
            raise NotImplementedError(
                f"this torch ({torch.__version__}) keeps FSDP2's unsharded parameters elsewhere ({err}): track the "
                "Fisher on an unsharded copy of the model, or with fisher_diag on one after training"
            ) from err
    return found
