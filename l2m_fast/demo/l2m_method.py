"""L2M on the demo's networks: the posterior from the optimizer, and its Monte-Carlo predictive."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..posterior import L2MPosterior

__all__ = ["build_l2m", "l2m_samples"]


def build_l2m(model: nn.Module, optimizer: torch.optim.Optimizer, mode: str, **options: float | int) -> L2MPosterior:
    """``L2MPosterior.from_optimizer`` in ``mode`` (``"paper"`` or ``"explicit"`` with its options)."""
    return L2MPosterior.from_optimizer(model, optimizer, mode=mode, **options)


@torch.no_grad()
def l2m_samples(
    post: L2MPosterior, model: nn.Module, x: Tensor, num_samples: int, seed: int, linearized: bool = False
) -> Tensor:
    """Network outputs under ``num_samples`` posterior samples: (B, ...) inputs -> (S, B, ...) outputs.

    The one place the regression demo computes the L2M predictive: ``post.predict`` evaluates the model
    on all samples in batched chunks (or a loop where that is faster) and keeps the S outputs;
    ``linearized`` evaluates the model linearized at the MAP instead.
    """
    pred = post.predict(
        model, x, num_samples=num_samples, seed=seed, keep_samples=True, linearized=linearized, progress=False
    )
    return pred.samples
