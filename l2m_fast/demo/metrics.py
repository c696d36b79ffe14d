"""Metrics of the demo: Gaussian predictive scores, interval coverage, classification scores, ESS.

Every function takes plain tensors and returns Python floats, so the tests can check them against
hand-computed values.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "gaussian_nll",
    "coverage",
    "accuracy",
    "categorical_nll",
    "brier_score",
    "expected_calibration_error",
    "auroc",
    "entropy",
    "effective_sample_size",
]


def gaussian_nll(y: Tensor, mean: Tensor, var: Tensor) -> float:
    """Mean negative log density of ``y`` under ``N(mean, var)``.

    Args:
        y, mean, var: (N,) tensors of one shape.
    """
    var = var.double()
    r = y.double() - mean.double()
    return float((0.5 * torch.log(2 * math.pi * var) + 0.5 * r * r / var).mean())


def coverage(y: Tensor, mean: Tensor, std: Tensor, k: float) -> float:
    """Fraction of ``y`` inside ``mean +- k * std``.

    Args:
        y, mean, std: (N,) tensors of one shape.
        k: the half-width in standard deviations.
    """
    return float(((y - mean).abs() <= k * std).double().mean())


def accuracy(probs: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy. ``probs``: (N, C), ``labels``: (N,) int64."""
    return float((probs.argmax(-1) == labels).double().mean())


def categorical_nll(probs: Tensor, labels: Tensor, floor: float = 1e-12) -> float:
    """Mean ``-log p(label)``, probabilities floored at ``floor``. ``probs``: (N, C), ``labels``: (N,)."""
    p = probs.double().gather(1, labels.view(-1, 1)).squeeze(1)
    return float(-torch.log(p.clamp_min(floor)).mean())


def brier_score(probs: Tensor, labels: Tensor) -> float:
    """Mean over points of ``sum_c (p_c - onehot_c)^2``. ``probs``: (N, C), ``labels``: (N,)."""
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).double()
    return float(((probs.double() - onehot) ** 2).sum(1).mean())


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = 15) -> float:
    """ECE with ``bins`` equal-width confidence bins on (0, 1]: ``sum_b |B|/N * |acc_b - conf_b|``.

    Args:
        probs: (N, C) predicted probabilities.
        labels: (N,) int64.
        bins: number of bins. Default 15.
    """
    conf, pred = probs.double().max(1)
    correct = (pred == labels).double()
    # bin b holds confidences in (b/bins, (b+1)/bins]
    idx = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    ece = 0.0
    n = conf.numel()
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += float(m.sum()) / n * abs(float(correct[m].mean()) - float(conf[m].mean()))
    return ece


def auroc(score_in: Tensor, score_out: Tensor) -> float:
    """Area under the ROC curve for telling ``out`` (positive) from ``in`` by a higher score.

    Equal to the probability that a random out-score exceeds a random in-score, ties counting half.

    Args:
        score_in: (N_in,) scores of in-distribution inputs.
        score_out: (N_out,) scores of out-of-distribution inputs.
    """
    a = score_out.double().view(-1, 1)
    b = score_in.double().view(1, -1)
    return float(((a > b).double() + 0.5 * (a == b).double()).mean())


def entropy(probs: Tensor) -> Tensor:
    """Entropy in nats of each row: (N, C) -> (N,)."""
    p = probs.double().clamp_min(1e-30)
    return -(p * p.log()).sum(-1)


def effective_sample_size(chain: Tensor) -> float:
    """ESS of a scalar Markov chain, Geyer's initial monotone sequence estimator.

    ``ESS = n / (1 + 2 sum_t rho_t)``, summing autocorrelations in pairs while the pair sums stay
    positive, made monotone non-increasing.

    Args:
        chain: (n,) draws in chain order.
    """
    x = chain.double() - chain.double().mean()
    n = x.numel()
    if n < 4 or float(x.var()) == 0.0:
        return float(n)
    f = torch.fft.rfft(x, n=2 * n)
    acov = torch.fft.irfft(f * f.conj(), n=2 * n)[:n] / n
    rho = acov / acov[0]
    total = 0.0
    prev = math.inf
    for t in range(0, n - 1, 2):
        pair = float(rho[t] + rho[t + 1])
        if pair <= 0:
            break
        pair = min(pair, prev)
        prev = pair
        total += pair
    # total = rho_0 + 2 * sum_{t>=1} rho_t ... in Geyer's form tau = -1 + 2 * sum of pairs
    tau = max(-1.0 + 2.0 * total, 1.0 / n)
    return float(n / tau)
