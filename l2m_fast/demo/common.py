"""What every method of the demo returns (function samples and costs), and the timer that measures them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..fisher import FisherTracker

__all__ = ["MethodRun", "Timer", "TimedTracker", "stack_predictions"]


@dataclass
class MethodRun:
    """Function samples of one method at the query inputs, and its costs.

    Attributes:
        samples: (S, Q) network outputs at the Q query inputs, one row per posterior sample or member.
        train_s: wall time of training (seconds).
        posthoc_s: wall time after training until the posterior is ready (seconds), prediction excluded.
        predict_s: wall time of the S forward passes over the queries (seconds).
        diagnostics: method-specific numbers (e.g. HMC acceptance rate and ESS).
    """

    samples: Tensor
    train_s: float
    posthoc_s: float
    predict_s: float = 0.0
    diagnostics: dict[str, float] = field(default_factory=dict)


class Timer:
    """``with Timer() as t: ...; t.s`` is the elapsed wall time in seconds."""

    def __enter__(self) -> Timer:
        self._t0 = time.perf_counter()
        self.s = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.s = time.perf_counter() - self._t0


@torch.no_grad()
def stack_predictions(models: list[nn.Module], queries: Tensor) -> Tensor:
    """(M, Q) outputs of M networks at (Q, 1) queries."""
    return torch.stack([m(queries).squeeze(-1) for m in models])


class TimedTracker(FisherTracker):
    """A :class:`~l2m_fast.fisher.FisherTracker` that also counts the seconds its updates take (its training
    overhead, which the demos report apart from the training itself)."""

    seconds = 0.0

    def update(self, outputs: Tensor) -> bool:
        t0 = time.perf_counter()
        try:
            return super().update(outputs)
        finally:
            self.seconds += time.perf_counter() - t0
