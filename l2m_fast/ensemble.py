"""Ensembles of L2M posteriors: the mixture predictive over several (model, posterior) pairs.

Each member (say, one of several independently trained networks with its own L2M posterior) is a
Gaussian over its own weights; the ensemble's predictive is the weighted mixture of the members'
Monte-Carlo predictives (the "multi-mode" posterior the L2M paper names as future work, and the
Bayesian reading of deep ensembles). Mixture moments combine exactly from each member's reductions:

* regression: ``mean = sum_k w_k m_k``; ``aleatoric = sum_k w_k a_k``;
  ``var = sum_k w_k (var_k + m_k^2) - mean^2`` and ``epistemic = var - aleatoric`` (spread within
  each member plus spread between members);
* classification: ``probs = sum_k w_k p_k``; ``entropy = H[probs]``; ``expected_entropy =
  sum_k w_k E_k[H]``; ``mutual_info = entropy - expected_entropy``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .posterior import L2MPosterior
from .predictive import ClassificationPrediction, RegressionPrediction, predict

__all__ = ["L2MEnsemble", "member_seed"]

_GOLDEN = 0x9E3779B97F4A7C15
_U64 = 1 << 64


def member_seed(seed: int, k: int) -> int:
    """The seed of member ``k``: distinct per member, so members with one layout draw independent noise."""
    return (seed + k * _GOLDEN) % _U64


@dataclass
class L2MEnsemble:
    """A weighted mixture of L2M posteriors, each over its own model.

    Args:
        members: ``(model, posterior)`` pairs.
        weights: mixture weights, one per member (normalised to sum to 1). Default: uniform.
    """

    members: Sequence[tuple[nn.Module, L2MPosterior]]
    weights: Sequence[float] | None = None

    def __post_init__(self) -> None:
        self.members = list(self.members)
        if not self.members:
            raise ValueError("an ensemble needs at least one (model, posterior) member")
        w = [1.0] * len(self.members) if self.weights is None else [float(x) for x in self.weights]
        if len(w) != len(self.members):
            raise ValueError(f"{len(w)} weights for {len(self.members)} members")
        if any(not (math.isfinite(x) and x >= 0) for x in w) or sum(w) <= 0:
            raise ValueError(f"weights must be finite, non-negative and have a positive sum, got {w}")
        total = sum(w)
        self.weights = [x / total for x in w]

    def __len__(self) -> int:
        return len(self.members)

    def predict(
        self,
        inputs: Tensor | Sequence[Any],
        num_samples: int,
        seed: int = 0,
        *,
        task: str = "regression",
        **kwargs: Any,
    ) -> RegressionPrediction | ClassificationPrediction:
        """The mixture predictive, ``num_samples`` posterior samples per member.

        Args:
            inputs: (B, ...) tensor or tuple of forward arguments, the same for every member.
            num_samples: S, samples per member.
            seed: 64-bit seed; member ``k`` uses :func:`member_seed` ``(seed, k)``.
            task: ``"regression"`` or ``"classification"``.
            **kwargs: passed to :func:`l2m_fast.predictive.predict` (``method``, ``max_memory``,
                ``chunk_size``, ``keep_samples``, ``output_fn``, ``progress``...).

        Returns:
            The mixture's :class:`RegressionPrediction` or :class:`ClassificationPrediction`; with
            ``keep_samples``, ``samples`` is (K * S, B, ...), member after member (weights not applied).
        """
        preds = [
            predict(post, model, inputs, num_samples, member_seed(seed, k), task=task, **kwargs)  # type: ignore[arg-type]
            for k, (model, post) in enumerate(self.members)
        ]
        w = self.weights
        assert w is not None
        if task == "regression":
            return _mix_regression(preds, w)  # type: ignore[arg-type]
        return _mix_classification(preds, w)  # type: ignore[arg-type]


def _cat_or_none(parts: list[Tensor | None]) -> Tensor | None:
    return None if any(p is None for p in parts) else torch.cat(parts)  # type: ignore[arg-type]


def _mix_regression(preds: list[RegressionPrediction], w: Sequence[float]) -> RegressionPrediction:
    dt = preds[0].mean.dtype
    mean = sum(wk * p.mean.double() for wk, p in zip(w, preds))
    second = sum(wk * (p.var.double() + p.mean.double().square()) for wk, p in zip(w, preds))
    var = (second - mean.square()).clamp_(min=0.0)  # type: ignore[union-attr]
    has_ale = [p.aleatoric_var is not None for p in preds]
    if any(has_ale) and not all(has_ale):
        raise ValueError("some members predict an aleatoric variance and others do not")
    ale = sum(wk * p.aleatoric_var.double() for wk, p in zip(w, preds)) if all(has_ale) else None  # type: ignore[union-attr]
    epi = var if ale is None else (var - ale).clamp_(min=0.0)
    return RegressionPrediction(
        mean=mean.to(dt),  # type: ignore[union-attr]
        var=var.to(dt),
        epistemic_var=epi.to(dt),
        aleatoric_var=None if ale is None else ale.to(dt),  # type: ignore[union-attr]
        samples=_cat_or_none([p.samples for p in preds]),
        aleatoric_samples=_cat_or_none([p.aleatoric_samples for p in preds]),
        num_samples=sum(p.num_samples for p in preds),
        method="+".join(sorted({p.method for p in preds})),
        chunk_size=max(p.chunk_size for p in preds),
    )


def _mix_classification(preds: list[ClassificationPrediction], w: Sequence[float]) -> ClassificationPrediction:
    probs = sum(wk * p.probs.double() for wk, p in zip(w, preds))
    entropy = -torch.special.xlogy(probs, probs).sum(-1)  # type: ignore[arg-type]
    expected = sum(wk * p.expected_entropy.double() for wk, p in zip(w, preds))
    mi = (entropy - expected).clamp_(min=0.0)
    return ClassificationPrediction(
        probs=probs.float(),  # type: ignore[union-attr]
        entropy=entropy.float(),
        expected_entropy=expected.float(),  # type: ignore[union-attr]
        mutual_info=mi.float(),
        samples=_cat_or_none([p.samples for p in preds]),
        num_samples=sum(p.num_samples for p in preds),
        method="+".join(sorted({p.method for p in preds})),
        chunk_size=max(p.chunk_size for p in preds),
    )
