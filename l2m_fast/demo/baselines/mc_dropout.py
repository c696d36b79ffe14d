"""MC dropout (Gal & Ghahramani 2016), small version for the toy regression.

The same MLP with dropout after each hidden layer, trained with the paper's optimiser (its weight
decay plays the role of the L2 term of the variational objective); at test time dropout stays on
and each forward pass with a fresh mask is one sample of the approximate posterior predictive.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..common import MethodRun, Timer
from ..toy import ToyConfig, mlp, train_map

__all__ = ["run_mc_dropout"]


def run_mc_dropout(
    x: Tensor, y: Tensor, queries: Tensor, cfg: ToyConfig, *, p: float = 0.1, progress: object | None = None
) -> MethodRun:
    """Trains a dropout network and draws ``cfg.samples`` stochastic forward passes.

    Args:
        x: (N, 1) inputs. y: (N, 1) targets.
        queries: (Q, 1) inputs to predict at.
        cfg: the training budget and ``samples``.
        p: dropout probability. Default 0.1.
        progress: optional tqdm bar, advanced once per epoch.

    Returns:
        A :class:`MethodRun` with ``samples`` (cfg.samples, Q).
    """
    torch.manual_seed(cfg.seed + 3000)
    model = mlp(cfg.hidden, dropout=p)
    with Timer() as t_train:
        train_map(model, x, y, cfg, progress=progress)
    model.train()  # dropout on at prediction time
    torch.manual_seed(cfg.seed + 3001)
    with Timer() as t_pred, torch.no_grad():
        # one pass per sample; nn.Dropout draws its mask per query row, so rows are independent draws
        # of the per-point predictive (the marginals the bands and scores use), not coherent functions
        samples = torch.stack([model(queries).squeeze(-1) for _ in range(cfg.samples)])
    model.eval()
    return MethodRun(samples, train_s=t_train.s, posthoc_s=0.0, predict_s=t_pred.s, diagnostics={"p": p})
