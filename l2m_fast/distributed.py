"""Sharded posteriors on ``torch.distributed``: DTensor / FSDP2 parameters, sampled locally.

The sampling contract (:mod:`l2m_fast.ops.reference`) makes each element's sample a function of ``(seed, global
flat index, sample index)`` only. A rank that holds a shard of a parameter therefore draws exactly the
elements one process would draw for the unsharded model, with no communication, if it knows the global
flat index of each of its local elements. This module computes those indices.

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
``(local_offset, global_offset, numel)``, merging runs that continue each other; :func:`sample_runs`
calls the op once per run with ``element_offset`` and the run's own segments ``(a, b)``.

**In place and predictive.** :func:`sampled_sharded` (what ``L2MPosterior.sampled`` does when
``post.is_sharded``) writes a sample into each rank's local shards; the model's own forward then
all-gathers it as FSDP2 always does. A batched predictive (``torch.func.functional_call`` over
``(S, *shape)`` samples) needs whole parameters, which a sharded posterior does not have: ``predict``
must loop over ``sampled`` there, every rank running the same forwards.

**Checkpoints.** :func:`posterior_from_checkpoint` loads a ``torch.distributed.checkpoint`` of model
and optimizer into a sharded model and a fresh optimizer, then builds the posterior. A name-keyed
optimizer state (``get_optimizer_state_dict``), sharded or full, also goes straight to
``L2MPosterior.from_state_dict``: a full moment next to a sharded parameter is sliced locally.

Only ``Shard`` and ``Replicate`` placements are supported (``Partial`` is not a parameter layout;
``_StridedShard``, used when FSDP2 and tensor parallelism shard the same dimension, is refused).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .modes import restrict_segments
from .ops.sample import sample_diag_gaussian

if TYPE_CHECKING:
    from .posterior import L2MPosterior

__all__ = [
    "Run",
    "is_dtensor",
    "local_box",
    "box_runs",
    "localize",
    "sample_runs",
    "reshard_fsdp",
    "sampled_sharded",
    "posterior_from_checkpoint",
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


def _merge(runs: list[Run]) -> list[Run]:
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
    return local_entries, tuple(_merge(runs)), global_pos, sharded


def _run_segments(post: L2MPosterior) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per run, the segments ``(a, b, bounds)`` restricted to it (cached per device)."""
    device = post.theta.device
    cache = getattr(post, "_run_segments_cache", None)
    if cache is not None and cache[0] == device and cache[1] is post.seg_bounds:
        return cache[2]
    bounds = post.seg_bounds.tolist()
    out = [restrict_segments(post.seg_a, post.seg_b, bounds, lo, lo + n) for lo, _, n in post.runs]
    post._run_segments_cache = (device, post.seg_bounds, out)  # type: ignore[attr-defined]
    return out


def sample_runs(post: L2MPosterior, out: Tensor, seed: int, sample_offset: int) -> Tensor:
    """Fills ``out`` with this rank's samples: one op call per run with its global ``element_offset``.

    Args:
        post: a posterior with ``runs``.
        out: (S, P_local) contiguous buffer.
        seed: 64-bit seed.
        sample_offset: index of the first sample.

    Returns:
        out: (S, P_local); column ``lo + j`` of run ``(lo, go, n)`` holds global element ``go + j``.
    """
    s = out.shape[0]
    for (lo, go, n), (a, b, bounds) in zip(post.runs, _run_segments(post)):
        cols = out[:, lo : lo + n]
        target = cols if cols.is_contiguous() else torch.empty(s, n, dtype=out.dtype, device=out.device)
        sample_diag_gaussian(
            post.theta[lo : lo + n],
            post.v[lo : lo + n],
            a=a,
            b=b,
            bounds=bounds,
            seed=seed,
            sample_offset=sample_offset,
            element_offset=go,
            out=target,
            validate=False,
        )
        if target is not cols:
            cols.copy_(target)
    return out


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


@contextmanager
def sampled_sharded(post: L2MPosterior, model: nn.Module, index: int, seed: int) -> Iterator[nn.Module]:
    """``L2MPosterior.sampled`` for a sharded posterior: writes each rank's local shards in place.

    FSDP2 modules are resharded first, so the writes land in the sharded parameters that the next
    forward all-gathers; on exit they are resharded again (dropping unsharded copies of the sample)
    and the local shards restored bit for bit, on exceptions too. No communication happens here; the
    model's own forward communicates as it always does, so every rank must enter and run it.

    Args:
        post: a posterior built on this rank from the same model.
        model: the sharded model.
        index: which sample.
        seed: 64-bit seed.

    Yields:
        The model, holding sample ``index``.
    """
    reshard_fsdp(model)
    named = dict(model.named_parameters())
    locals_: dict[str, Tensor] = {}
    for slot in post.layout:
        p = named.get(slot.name)
        if p is None:
            raise KeyError(f"the model has no parameter {slot.name!r} that this posterior covers")
        local = local_box(slot.name, p)[0]
        if tuple(local.shape) != slot.shape:
            raise ValueError(
                f"parameter {slot.name!r}: local shape {tuple(local.shape)} but the posterior's {slot.shape}; "
                "was the posterior built on this rank from this model?"
            )
        if local.device != post.device:
            raise ValueError(f"parameter {slot.name!r} is on {local.device} but the posterior on {post.device}")
        locals_[slot.name] = local
    backup = {n: t.detach().clone() for n, t in locals_.items()}
    try:
        row = post.sample(1, seed, sample_offset=index).flat[0]
        views = post.layout.views(row)
        with torch.no_grad():
            for n, t in locals_.items():
                t.copy_(views[n])
        del row, views
        yield model
    finally:
        reshard_fsdp(model)
        with torch.no_grad():
            for n, t in locals_.items():
                t.copy_(backup[n])


def posterior_from_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    checkpoint_id: str,
    *,
    model_key: str = "model",
    optimizer_key: str = "optimizer",
    **kwargs: object,
) -> L2MPosterior:
    """Loads a ``torch.distributed.checkpoint`` of model and optimizer into them, then builds the posterior.

    The checkpoint must hold ``{model_key: get_model_state_dict(model), optimizer_key:
    get_optimizer_state_dict(model, optimizer)}`` (the layout ``torch.distributed.checkpoint.state_dict``
    writes). It may have been saved with any world size or sharding: DCP reshards on load, and each
    rank reads only its own shards. Collective: every rank calls it.

    Args:
        model: the model, sharded as it will be sampled (e.g. after ``fully_shard``).
        optimizer: a fresh optimizer of the checkpoint's class over ``model.parameters()`` (same groups).
        checkpoint_id: the checkpoint directory.
        model_key, optimizer_key: the keys the checkpoint was saved under.
        **kwargs: passed to :meth:`L2MPosterior.from_optimizer` (``mode``, ``params``, options).

    Returns:
        The posterior of this rank's shards.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from .posterior import L2MPosterior

    state = {model_key: get_model_state_dict(model), optimizer_key: get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=checkpoint_id)
    set_model_state_dict(model, state[model_key])
    set_optimizer_state_dict(model, optimizer, state[optimizer_key])
    return L2MPosterior.from_optimizer(model, optimizer, **kwargs)  # type: ignore[arg-type]
