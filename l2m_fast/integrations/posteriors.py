"""Diagonal Gaussian states of the ``posteriors`` package, sampled by the fused sampler.

``posteriors`` keeps its states as tensor trees keyed like ``dict(model.named_parameters())``:
``laplace.diag_fisher``, ``laplace.diag_ggn`` and ``ekf.diag_fisher`` states hold ``params`` (the mean)
and ``prec_diag`` (the diagonal precision); ``vi.diag`` states hold ``params`` and ``log_sd_diag``
(the log standard deviation, so precision ``exp(-2 log_sd)``). The L2M posterior built here is
``N(params, diag(precision)^-1)`` with ``v = precision, a = 1, b = 0``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..posterior import L2MPosterior
from ._common import require

__all__ = ["from_posteriors_state"]


def _as_dict(tree: Any, what: str) -> dict[str, Tensor]:
    if isinstance(tree, Tensor):
        raise TypeError(f"state.{what} is a single tensor: give the state of a model's parameter dict")
    if hasattr(tree, "flatten_keys"):  # a TensorDict
        tree = tree.flatten_keys(".").to_dict()
    if not isinstance(tree, Mapping):
        raise TypeError(f"state.{what} must be a mapping name -> tensor, got {type(tree).__name__}")
    return {str(k): v for k, v in tree.items()}


def from_posteriors_state(state: Any, model: nn.Module | None = None) -> L2MPosterior:
    """The :class:`~l2m_fast.L2MPosterior` of a diagonal ``posteriors`` state.

    Args:
        state: a state with ``params`` and ``prec_diag`` (diagonal Laplace, diagonal EKF) or
            ``params`` and ``log_sd_diag`` (diagonal VI), keyed by parameter name.
        model: when given, the flat order follows ``model.named_parameters()`` (required for
            :meth:`~l2m_fast.L2MPosterior.predict` on that model when the state's order differs);
            parameters absent from the state stay at their values. Default: the state's order.

    Returns:
        The posterior.
    """
    require("posteriors", "posteriors")
    mean = _as_dict(state.params, "params")
    if hasattr(state, "prec_diag"):
        prec = _as_dict(state.prec_diag, "prec_diag")
    elif hasattr(state, "log_sd_diag"):
        prec = {n: torch.exp(-2.0 * t.detach().float()) for n, t in _as_dict(state.log_sd_diag, "log_sd_diag").items()}
    else:
        raise TypeError(f"{type(state).__name__} has neither prec_diag nor log_sd_diag: not a diagonal Gaussian")
    if model is not None:
        order = [n for n, _ in model.named_parameters() if n in mean]
        unknown = sorted(set(mean) - set(order))
        if unknown:
            raise KeyError(f"the state has parameters the model does not: {unknown[:5]}")
        mean = {n: mean[n] for n in order}
    return L2MPosterior(mean, prec, a=1.0, b=0.0, mode="posteriors")
