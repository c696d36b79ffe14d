"""Sharded training (FSDP2 / DTensor) end to end: a posterior from a ``torch.distributed.checkpoint``.

A posterior of a sharded model is built on every rank exactly as on one device
(``L2MPosterior.from_optimizer`` or ``from_state_dict``): each rank keeps its own shards of theta and
of the second moment and samples them with their global flat indices (:mod:`l2m_fast.sharding`), so the
gathered shards equal, bit for bit, one process's draw of the unsharded model. ``post.sampled`` and
``post.iter_sampled`` write each rank's local shards in place (:mod:`l2m_fast.inplace`); the model's own
forward then all-gathers them as FSDP2 always does, so every rank must run the same forwards. The batched
predictive needs whole parameters, so ``post.predict`` loops over in-place samples on a sharded posterior.

This module adds the checkpoint path: :func:`posterior_from_checkpoint` loads a DCP checkpoint of model
and optimizer into a sharded model and a fresh optimizer, then builds the posterior. A name-keyed
optimizer state (``get_optimizer_state_dict``), sharded or full, also goes straight to
``L2MPosterior.from_state_dict``: a full moment next to a sharded parameter is sliced locally.
"""

from __future__ import annotations

import torch
from torch import nn

from .posterior import L2MPosterior

__all__ = ["posterior_from_checkpoint"]


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

    state = {model_key: get_model_state_dict(model), optimizer_key: get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=checkpoint_id)
    set_model_state_dict(model, state[model_key])
    set_optimizer_state_dict(model, optimizer, state[optimizer_key])
    return L2MPosterior.from_optimizer(model, optimizer, **kwargs)  # type: ignore[arg-type]
