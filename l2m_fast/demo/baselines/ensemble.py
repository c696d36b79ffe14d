"""Deep ensembles (Lakshminarayanan, Pritzel & Blundell 2017), small version for the toy regression.

M networks from independent random initialisations, each trained on the full data set with the
paper's optimiser; the predictive is the uniform mixture of the members. With the noise known
(``sigma = 3``) each member's Gaussian NLL is the squared error up to constants, so members predict
only the mean; the optional adversarial training of the original is left out.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..common import MethodRun, Timer, stack_predictions
from ..toy import ToyConfig, mlp, train_map

__all__ = ["run_ensemble"]


def run_ensemble(x: Tensor, y: Tensor, queries: Tensor, cfg: ToyConfig, *, progress: object | None = None) -> MethodRun:
    """Trains ``cfg.ensemble_size`` members and predicts at the queries.

    Args:
        x: (N, 1) inputs. y: (N, 1) targets.
        queries: (Q, 1) inputs to predict at.
        cfg: the training budget and ``ensemble_size``.
        progress: optional tqdm bar, advanced once per epoch of each member.

    Returns:
        A :class:`MethodRun` with ``samples`` (M, Q).
    """
    members = []
    with Timer() as t_train:
        for k in range(cfg.ensemble_size):
            torch.manual_seed(cfg.seed + 1000 + k)
            m = mlp(cfg.hidden)
            train_map(m, x, y, cfg, progress=progress)
            members.append(m)
    with Timer() as t_pred:
        samples = stack_predictions(members, queries)
    return MethodRun(samples, train_s=t_train.s, posthoc_s=0.0, predict_s=t_pred.s)
