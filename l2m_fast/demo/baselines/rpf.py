"""Randomized prior functions (Osband, Aslanides & Cassirer 2018), small version for the toy regression.

Each of M members is ``f_k(x) + beta * p_k(x)`` where ``p_k`` is a fixed, randomly initialised network
of the same architecture (never trained) and ``f_k`` is trained, with the paper's optimiser, on a
bootstrap resample of the data. The prior network carries the uncertainty where there are no data;
``beta`` sets its scale (here matched to the spread of the targets).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..common import MethodRun, Timer
from ..toy import ToyConfig, mlp, train_map

__all__ = ["run_rpf"]


def run_rpf(
    x: Tensor,
    y: Tensor,
    queries: Tensor,
    cfg: ToyConfig,
    *,
    beta: float | None = None,
    bootstrap: bool = True,
    progress: object | None = None,
) -> MethodRun:
    """Trains ``cfg.ensemble_size`` prior-augmented members and predicts at the queries.

    Args:
        x: (N, 1) inputs. y: (N, 1) targets.
        queries: (Q, 1) inputs to predict at.
        cfg: the training budget and ``ensemble_size``.
        beta: prior scale; default: the targets' standard deviation divided by the prior networks'
            output standard deviation on the data (so the prior's spread is that of the data).
        bootstrap: train each member on a bootstrap resample. Default True.
        progress: optional tqdm bar, advanced once per epoch of each member.

    Returns:
        A :class:`MethodRun` with ``samples`` (M, Q) and diagnostic ``beta``.
    """
    n = x.shape[0]
    outs = []
    betas = []
    with Timer() as t_train:
        for k in range(cfg.ensemble_size):
            torch.manual_seed(cfg.seed + 2000 + k)
            prior, model = mlp(cfg.hidden), mlp(cfg.hidden)
            prior.requires_grad_(False)
            with torch.no_grad():
                b = beta if beta is not None else float(y.std() / prior(x).std().clamp_min(1e-6))
            betas.append(b)
            idx = torch.randint(0, n, (n,)) if bootstrap else torch.arange(n)
            xb, yb = x[idx], y[idx]
            train_map(model, xb, yb, cfg, prior=prior, prior_scale=b, progress=progress)
            outs.append((model, prior, b))
    with Timer() as t_pred, torch.no_grad():
        samples = torch.stack([(m(queries) + b * p(queries)).squeeze(-1) for m, p, b in outs])
    diag = {"beta": sum(betas) / len(betas)}
    return MethodRun(samples, train_s=t_train.s, posthoc_s=0.0, predict_s=t_pred.s, diagnostics=diag)
