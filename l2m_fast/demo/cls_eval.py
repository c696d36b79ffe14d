"""Scoring classifiers and their uncertainty the same way in every classification demo (digits, text).

A method is a *predictor*: inputs -> :class:`Predicted` (class probabilities, and the mutual information
between the prediction and the weights when the method has a posterior). :func:`score` turns a
predictor and the data into a table row: accuracy, NLL, ECE (15 bins), Brier on the in-distribution
test set, and for each out-of-distribution set the AUROC of telling it apart from the test set by
predictive entropy, by maximum probability (``1 - max p``) and by mutual information.

The L2M predictors go through :meth:`L2MPosterior.predict` (sampled or linearized, MC or probit), the
calibrated ones through :meth:`L2MPosterior.calibrated`; the temperature-scaled MAP is the calibration of
a zero-temperature posterior (its logit temperature fitted, nothing else).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..posterior import L2MPosterior
from .metrics import accuracy, auroc, brier_score, categorical_nll, entropy, expected_calibration_error

__all__ = [
    "Predicted",
    "Predictor",
    "EvalData",
    "score",
    "map_predictor",
    "members_predictor",
    "mc_dropout_predictor",
    "l2m_predictor",
    "laplace_glm_predictor",
    "mixture_mutual_info",
]


@dataclass
class Predicted:
    """A method's prediction.

    Attributes:
        probs: (B, C) float64 class probabilities.
        mutual_info: (B,) epistemic part of the entropy, or None for a point estimate.
    """

    probs: Tensor
    mutual_info: Tensor | None = None


Predictor = Callable[[Any], Predicted]


@dataclass
class EvalData:
    """What a method is scored on.

    Attributes:
        x_test, y_test: in-distribution test inputs and (B,) labels.
        ood: name -> out-of-distribution inputs.
        x_val, y_val: validation inputs and labels (calibration), carved from the training data.
    """

    x_test: Any
    y_test: Tensor
    ood: dict[str, Any] = field(default_factory=dict)
    x_val: Any = None
    y_val: Tensor | None = None


def _ood_scores(p: Predicted) -> dict[str, Tensor]:
    out = {"entropy": entropy(p.probs), "maxprob": 1.0 - p.probs.double().max(-1).values}
    if p.mutual_info is not None:
        out["mi"] = p.mutual_info.double()
    return out


def score(name: str, predictor: Predictor, data: EvalData, **extra: object) -> dict[str, object]:
    """One table row: the method's scores on ``data`` and the seconds its predictions took.

    Keys: ``method``, ``acc``, ``nll``, ``ece``, ``brier``, ``auroc_<ood>_<score>`` (score: ``entropy``,
    ``maxprob``, ``mi`` where the method has one), ``predict_s``, and ``extra``.
    """
    t0 = time.perf_counter()
    p_in = predictor(data.x_test)
    p_out = {k: predictor(x) for k, x in data.ood.items()}
    t = time.perf_counter() - t0
    y = data.y_test
    row: dict[str, object] = {
        "method": name,
        "acc": accuracy(p_in.probs, y),
        "nll": categorical_nll(p_in.probs, y),
        "ece": expected_calibration_error(p_in.probs, y),
        "brier": brier_score(p_in.probs, y),
    }
    s_in = _ood_scores(p_in)
    for k, p in p_out.items():
        s_out = _ood_scores(p)
        for kind in ("entropy", "maxprob", "mi"):
            row[f"auroc_{k}_{kind}"] = (
                auroc(s_in[kind], s_out[kind]) if kind in s_in and kind in s_out else float("nan")
            )
    row["predict_s"] = t
    row.update(extra)
    return row


def mixture_mutual_info(logits: Tensor) -> Tensor:
    """(M, B, C) logits of M members or samples -> (B,) mutual information of their average softmax."""
    p = torch.softmax(logits.double(), -1)
    expected = entropy(p.reshape(-1, p.shape[-1])).reshape(p.shape[:2]).mean(0)
    return (entropy(p.mean(0)) - expected).clamp(min=0.0)


def _softmax_mixture(logits: Tensor) -> Predicted:
    """(M, B, C) logits of M members or samples -> the average softmax and its mutual information."""
    return Predicted(torch.softmax(logits.double(), -1).mean(0), mixture_mutual_info(logits))


def map_predictor(model: nn.Module, forward: Callable[[nn.Module, Any], Tensor] | None = None) -> Predictor:
    """The network at its trained weights."""
    call = forward or (lambda m, x: m(*x) if isinstance(x, (tuple, list)) else m(x))

    @torch.no_grad()
    def predict(x: Any) -> Predicted:
        return Predicted(torch.softmax(call(model, x).double(), -1))

    return predict


def members_predictor(
    models: Sequence[nn.Module], forward: Callable[[nn.Module, Any], Tensor] | None = None
) -> Predictor:
    """A deep ensemble: the average softmax of the members."""
    call = forward or (lambda m, x: m(*x) if isinstance(x, (tuple, list)) else m(x))

    @torch.no_grad()
    def predict(x: Any) -> Predicted:
        return _softmax_mixture(torch.stack([call(m, x) for m in models]))

    return predict


def mc_dropout_predictor(
    model: nn.Module, samples: int, seed: int, forward: Callable[[nn.Module, Any], Tensor] | None = None
) -> Predictor:
    """MC dropout: ``samples`` forwards with the model's dropout on, averaged."""
    call = forward or (lambda m, x: m(*x) if isinstance(x, (tuple, list)) else m(x))

    @torch.no_grad()
    def predict(x: Any) -> Predicted:
        was = model.training
        model.train()
        torch.manual_seed(seed)
        try:
            return _softmax_mixture(torch.stack([call(model, x) for _ in range(samples)]))
        finally:
            model.train(was)

    return predict


def l2m_predictor(
    post: L2MPosterior,
    model: nn.Module,
    samples: int,
    seed: int,
    *,
    linearized: bool = False,
    link: str = "mc",
    **predict_kwargs: Any,
) -> Predictor:
    """``post.predict`` as a predictor (classification; the posterior's logit temperature applies).

    A posterior of temperature 0 (a calibration that switched the noise off) predicts the MAP's
    probabilities and has no mutual information: ``mutual_info`` is None, so its AUROC by MI is NaN rather
    than the ranking of rounding errors.
    """

    def predict(x: Any) -> Predicted:
        pred = post.predict(
            model,
            x,
            samples,
            seed,
            task="classification",
            linearized=linearized,
            link=link,
            progress=False,
            **predict_kwargs,
        )
        return Predicted(pred.probs.double(), None if post.temperature == 0 else pred.mutual_info.double())

    return predict


def laplace_glm_predictor(
    la: Any, samples: int, seed: int, *, transform: Callable[[Any], Any] | None = None, chunk: int | None = None
) -> Predictor:
    """A fitted laplace-torch Laplace's GLM predictive: probit link, mutual information from ``samples`` draws.

    The GLM's latent mean and covariance are computed once per input chunk (laplace-torch forms Jacobians on
    every predictive call): the probit predictive from them, and the mutual information from samples of
    the same Gaussian over the logits.

    Args:
        la: a fitted ``laplace`` Laplace (diagonal, Kronecker, ...).
        samples: draws of the logits' Gaussian for the mutual information.
        seed: seed of those draws.
        transform: maps the inputs to what ``la.model`` takes (e.g. features of a last layer). Default none.
        chunk: inputs per Jacobian call (bounds its (chunk, C, P) memory). Default: all at once.
    """

    @torch.no_grad()
    def predict(x: Any) -> Predicted:
        xs = transform(x) if transform is not None else x
        n = xs.shape[0]
        step = chunk or n
        mus, variances = [], []
        for i in range(0, n, step):
            f_mu, f_var = la._glm_predictive_distribution(xs[i : i + step])
            mus.append(f_mu.double())
            variances.append(f_var.double())
        f_mu, f_var = torch.cat(mus), torch.cat(variances)
        kappa = 1.0 / torch.sqrt(1.0 + math.pi / 8.0 * torch.diagonal(f_var, dim1=-2, dim2=-1))
        probs = torch.softmax(kappa * f_mu, -1)
        eye = torch.eye(f_var.shape[-1], dtype=f_var.dtype)
        chol = torch.linalg.cholesky(f_var + 1e-9 * eye)
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(samples, *f_mu.shape, generator=g, dtype=f_mu.dtype)
        logits = f_mu + torch.einsum("bij,sbj->sbi", chol, z)
        return Predicted(probs, mixture_mutual_info(logits))

    return predict
