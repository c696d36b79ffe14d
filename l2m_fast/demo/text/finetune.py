"""Fine-tuning with AdamW, as transformers are usually fine-tuned.

``torch.optim.AdamW`` (weight decay 0.01 on every parameter, betas (0.9, 0.999), eps 1e-8), the learning
rate warmed up linearly over the first ``warmup`` share of the steps and then decayed linearly to zero,
gradients clipped to norm 1, dropout on, shuffled mini-batches. The returned optimizer holds the second
moment the L2M posterior is built from; a :class:`~l2m_fast.fisher.FisherTracker` can ride along (its
``update`` before every backward, as its contract asks) and its seconds are counted apart, so the
table's training time is that of plain fine-tuning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...fisher import FisherTracker
from ..common import TimedTracker

__all__ = ["FinetuneConfig", "TimedTracker", "finetune", "steps_per_epoch"]


@dataclass
class FinetuneConfig:
    """One fine-tuning run.

    Attributes:
        epochs: passes over the training set.
        batch_size: articles per step.
        lr: peak learning rate.
        weight_decay: AdamW's (decoupled) weight decay.
        warmup: share of the steps with a linearly rising learning rate.
        max_grad_norm: gradient clipping (None: off).
    """

    epochs: int = 3
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = 0.1
    max_grad_norm: float | None = 1.0


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer steps in one epoch over ``n`` examples."""
    return -(-n // batch_size)


def finetune(
    model: nn.Module,
    inputs: Sequence[Tensor],
    labels: Tensor,
    cfg: FinetuneConfig,
    seed: int,
    *,
    tracker: FisherTracker | None = None,
    bar: Any = None,
    batch_fn: Callable[[Tensor], tuple[Tensor, ...]] | None = None,
) -> torch.optim.AdamW:
    """Fine-tunes ``model`` in place (left in eval mode); returns its AdamW optimizer.

    Args:
        model: the classifier; ``model(*inputs[idx])`` gives (b, C) logits.
        inputs: forward arguments, each (N, ...) (e.g. token states and mask).
        labels: (N,) int64 labels.
        cfg: the schedule.
        seed: seed of the mini-batch order and of dropout.
        tracker: optional Fisher tracker, updated with each step's logits before the backward.
        bar: optional tqdm-like bar, advanced by one per step.
        batch_fn: maps a (b,) index tensor to the forward's arguments (default: ``inputs`` indexed).

    Returns:
        The optimizer (its state holds Adam's second moment).
    """
    n = len(labels)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    per_epoch = steps_per_epoch(n, cfg.batch_size)
    total = per_epoch * cfg.epochs
    warm = max(1, int(round(cfg.warmup * total)))

    def schedule(step: int) -> float:
        return (step + 1) / warm if step < warm else max(0.0, (total - step) / max(1, total - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout masks
    model.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            args = batch_fn(idx) if batch_fn is not None else tuple(t[idx] for t in inputs)
            logits = model(*args)
            if tracker is not None:
                tracker.update(logits)
            loss = nn.functional.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            if bar is not None:
                bar.update(1)
    model.eval()
    return opt
