"""Calibration: the scale of the posterior's variance (and of the logits) fitted on validation data.

The L2M variance has a scale nobody fitted to data: paper mode's is bounded by the weight decay, explicit
mode's is set by a prior precision and a Fisher scale. :func:`calibrate` (``post.calibrated(...)``) keeps
the posterior's shape and fits its scale: a *temperature* tau multiplies every variance, so sample s
becomes ``theta + sqrt(tau) sigma z_s`` with the same ``z_s`` for every tau, and tau is the one that
minimises the validation negative log-likelihood. No pass over the training data.

* **Linearized** (default): the outputs are those of the model linearized at the MAP,
  ``f_s(tau) = f(x) + sqrt(tau) J(x) sigma z_s``, so one pass of jvps over the validation set at tau = 1
  gives every ``J(x) sigma z_s`` and every tau is scored from them without another forward.
* **Sampled** (``linearized=False``): one sampled predictive per tau tried (common random numbers).
* **Search**: log10 tau on a grid over ``search`` (default [-8, 4], step 0.5) plus tau = 0 (the MAP),
  then a golden-section refinement around the best grid point. tau = 0 is chosen, and reported, unless
  some tau > 0 gains more than ``min_gain`` nats: when noise does not help it is not kept.
* **Classification**: a logit temperature T is fitted jointly (for each tau, the T that minimises the
  NLL), as temperature scaling does (Guo et al. 2017): posterior noise can only soften an
  under-confident MAP, so the posterior is scored on top of the standard baseline, not instead of it.
  tau = 0 with its T is the temperature-scaled MAP. The returned posterior keeps T (``logit_temperature``)
  and its classification predictive applies it.
* **Regression**: Gaussian NLL with variance ``tau var_f + noise``, the noise being the Gaussian head's
  predicted variance, ``noise_var`` when given, or else one homoscedastic variance fitted jointly.

The returned posterior is ``post.scaled(tau, T)``: theta and v shared, ``temperature`` and
``logit_temperature`` in its repr and state_dict, the report in ``calibration``
(:class:`CalibrationReport`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .holds import held_parameters
from .ops.sample import int_or_none
from .predictive import predict
from .predictive.plan import as_args
from .predictive.results import LINKS

if TYPE_CHECKING:
    from .posterior import L2MPosterior

__all__ = ["CalibrationReport", "calibrate", "classification_nll", "gaussian_nll"]

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
_LOG_T_RANGE = (-3.0, 3.0)  # natural log of the logit temperature: T in [0.05, 20]


@dataclass
class CalibrationReport:
    """What :func:`calibrate` found.

    Attributes:
        temperature: tau, the variance multiplier chosen (0: the MAP).
        logit_temperature: T chosen jointly (classification; 1 for regression).
        noise_var: the homoscedastic noise variance fitted or given (regression without a Gaussian head).
        nll: the validation NLL at (tau, T).
        map_nll: the validation NLL at tau = 0 with its own best T (the temperature-scaled MAP).
        curve: ``(log10 tau, NLL)`` on the search grid (tau = 0 as ``-inf``).
        linearized, link, num_samples, seed: how the predictive was computed.
        num_val: validation inputs.
        seconds: wall time of the calibration.
    """

    temperature: float
    logit_temperature: float
    noise_var: float | None
    nll: float
    map_nll: float
    curve: list[tuple[float, float]] = field(default_factory=list)
    linearized: bool = True
    link: str = "mc"
    num_samples: int = 0
    seed: int = 0
    num_val: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        how = "linearized" if self.linearized else "sampled"
        noise = f", noise_var {self.noise_var:.4g}" if self.noise_var is not None else ""
        return (
            f"temperature {self.temperature:.4g}, logit temperature {self.logit_temperature:.4g}{noise}: "
            f"validation NLL {self.nll:.4f} (temperature-scaled MAP {self.map_nll:.4f}); {how}, {self.link}, "
            f"S={self.num_samples}, {self.num_val} inputs, {self.seconds:.2f} s"
        )


# ------------------------------------------------------------------------------------------------ scores


def classification_nll(logits: Tensor, labels: Tensor, link: str = "mc") -> float:
    """Mean negative log predictive probability of the labels under S sampled logit vectors.

    Args:
        logits: (S, B, C) sampled logits (already divided by any logit temperature).
        labels: (B,) int64 in [0, C).
        link: ``"mc"`` (the average softmax) or ``"probit"`` (from the logits' mean and variance).
    """
    if link == "probit":
        mu, var = logits.mean(0), logits.var(0, unbiased=False)
        logp = torch.log_softmax(mu / torch.sqrt(1.0 + math.pi / 8.0 * var), dim=-1)
        return float(-logp.gather(-1, labels[:, None]).mean())
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.expand(logits.shape[0], -1)[..., None])[..., 0]
    return float(-(torch.logsumexp(logp, dim=0) - math.log(logits.shape[0])).mean())


def gaussian_nll(mean: Tensor, var: Tensor, targets: Tensor) -> float:
    """Mean Gaussian negative log-likelihood of ``targets`` under ``N(mean, var)`` (elementwise, averaged)."""
    var = var.clamp(min=1e-30)
    return float(0.5 * (torch.log(2 * math.pi * var) + (targets - mean).square() / var).mean())


def _golden_min(fn: Callable[[float], float], lo: float, hi: float, iters: int = 24) -> tuple[float, float]:
    """argmin and min of a function on [lo, hi] by golden-section search (exact for unimodal functions)."""
    a, b = lo, hi
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = fn(c), fn(d)
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = fn(c)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = fn(d)
    return (c, fc) if fc <= fd else (d, fd)


# ------------------------------------------------------------------------------------------- the inputs


def _map_outputs(model: nn.Module, posterior: L2MPosterior, args: tuple[Any, ...], output_fn: Any) -> Any:
    with torch.no_grad(), held_parameters(posterior, model):
        out = model(*args)
        return out if output_fn is None else output_fn(out)


def _check_targets(task: str, f0: Any, targets: Tensor) -> Tensor:
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
    mean = f0[0] if isinstance(f0, (tuple, list)) else f0
    if not isinstance(mean, Tensor):
        raise TypeError(f"the model's output must be a tensor (or a (mean, var) pair), got {type(mean).__name__}")
    b = mean.shape[0]
    if task == "classification":
        if mean.dim() != 2:
            raise ValueError(f"a classifier must return (B, C) logits, got shape {tuple(mean.shape)}")
        if targets.shape != (b,) or targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(
                f"targets must be ({b},) integer class labels for {b} validation inputs, got "
                f"{tuple(targets.shape)} {targets.dtype}"
            )
        c = mean.shape[1]
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= c):
            raise ValueError(
                f"targets must lie in [0, {c}) for a {c}-class model, got [{int(targets.min())}, {int(targets.max())}]"
            )
        return targets.to(torch.int64)
    if targets.shape != mean.shape:
        if mean.shape[-1:] == (1,) and targets.shape == mean.shape[:-1]:
            return targets.unsqueeze(-1).to(mean.dtype)
        raise ValueError(f"targets must have the shape of the model's mean output {tuple(mean.shape)}, got "
                         f"{tuple(targets.shape)}")
    return targets.to(mean.dtype)


# ------------------------------------------------------------------------------------------------ search


def _search(
    score: Callable[[float], float], grid: list[float], min_gain: float
) -> tuple[float, float, float, list[tuple[float, float]]]:
    """Best tau over {0} and 10^grid, refined by golden section; returns (tau, nll, nll at 0, curve).

    tau = 0 (the MAP) wins unless some tau > 0 lowers the NLL by more than ``min_gain``.
    """
    curve = [(-math.inf, score(0.0))]
    curve += [(g, score(10.0**g)) for g in grid]
    map_nll = curve[0][1]
    best_g, best = min(curve[1:], key=lambda gc: gc[1])
    step = grid[1] - grid[0] if len(grid) > 1 else 0.5
    g, val = _golden_min(lambda g: score(10.0**g), best_g - step, best_g + step, iters=16)
    if val < best:
        best_g, best = g, val
    if not best < map_nll - min_gain:
        return 0.0, map_nll, map_nll, curve
    return 10.0**best_g, best, map_nll, curve


def calibrate(
    posterior: L2MPosterior,
    model: nn.Module,
    inputs: Any,
    targets: Tensor,
    *,
    task: str = "classification",
    linearized: bool = True,
    num_samples: int = 32,
    seed: int = 0,
    link: str = "mc",
    fit_logit_temperature: bool = True,
    noise_var: float | None = None,
    search: tuple[float, float] = (-8.0, 4.0),
    step: float = 0.5,
    min_gain: float = 1e-4,
    output_fn: Any = None,
    **predict_kwargs: Any,
) -> L2MPosterior:
    """A new posterior whose variance is scaled by the temperature that minimises the validation NLL.

    See the module docstring for the method. The validation data must not be the test data.

    Args:
        posterior: the posterior to calibrate (its own temperature is the starting scale).
        model: the model it covers.
        inputs: (B, ...) validation inputs, or a tuple of forward arguments.
        targets: (B,) class labels (classification) or (B, *out) targets (regression).
        task: ``"classification"`` (default) or ``"regression"``.
        linearized: score the linearized predictive (default) or the sampled one.
        num_samples: S, samples of the predictive. Default 32.
        seed: sampler seed. Default 0.
        link: classification: ``"mc"`` (default) or ``"probit"``, the predictive the NLL scores.
        fit_logit_temperature: classification: fit T jointly (default True); False keeps the posterior's.
        noise_var: regression without a Gaussian head: the noise variance; None fits one jointly.
        search: log10 tau range of the grid. Default (-8, 4).
        step: grid step in log10 tau. Default 0.5.
        min_gain: the validation NLL (nats per input) a tau > 0 must gain over tau = 0 to be chosen;
            otherwise the MAP (tau = 0) is returned: noise that does not help is not kept. Default 1e-4.
        output_fn: maps the model's output (as in :func:`l2m_fast.predictive.predict`).
        **predict_kwargs: passed to the predictive (``method``, ``max_memory``, ``progress``, ...).

    Returns:
        ``posterior.scaled(tau, T)`` with the :class:`CalibrationReport` in ``calibration``.

    Raises:
        ValueError: an empty validation set, labels out of range, targets of the wrong shape, a bad option.
    """
    t0 = time.perf_counter()
    if task not in ("classification", "regression"):
        raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
    if link not in LINKS or (link != "mc" and task != "classification"):
        raise ValueError(f"link must be one of {LINKS} (probit for classification only), got {link!r}")
    given, num_samples = num_samples, int_or_none(num_samples)
    if num_samples is None or num_samples < 2:
        raise ValueError(f"num_samples must be an int >= 2 (a variance is estimated from them), got {given!r}")
    if not (search[0] < search[1]) or not step > 0:
        raise ValueError(f"search must be (low, high) with low < high and step > 0, got {search}, {step}")
    if noise_var is not None and not (math.isfinite(noise_var) and noise_var > 0):
        raise ValueError(f"noise_var must be a positive finite number, got {noise_var!r}")
    args = as_args(inputs)
    f0 = _map_outputs(model, posterior, args, output_fn)
    mean0 = f0[0] if isinstance(f0, (tuple, list)) else f0
    if not isinstance(mean0, Tensor) or mean0.dim() == 0 or mean0.shape[0] == 0:
        raise ValueError("the validation set is empty: give at least one validation input")
    y = _check_targets(task, f0, targets)
    grid = [search[0] + k * step for k in range(int(round((search[1] - search[0]) / step)) + 1)]
    kw = dict(num_samples=num_samples, seed=seed, task="regression", keep_samples=True, output_fn=output_fn)
    kw.update(predict_kwargs)
    base = posterior.scaled(1.0)
    if linearized:
        pred = predict(base, model, args, linearized=True, **kw)
        lin = pred.samples.float() - mean0.float()  # (S, B, ...): J sigma z_s at tau = 1

        def outputs(tau: float) -> tuple[Tensor, Tensor | None]:
            return mean0.float() + math.sqrt(tau) * lin, None

    else:
        cache: dict[float, tuple[Tensor, Tensor | None]] = {}

        def outputs(tau: float) -> tuple[Tensor, Tensor | None]:
            if tau not in cache:
                if tau == 0:
                    head = f0[1].float().expand(num_samples, *f0[1].shape) if isinstance(f0, (tuple, list)) else None
                    cache[tau] = (mean0.float().expand(num_samples, *mean0.shape), head)
                else:
                    p = predict(base.scaled(tau), model, args, linearized=False, **kw)
                    ale = None if p.aleatoric_samples is None else p.aleatoric_samples.float()
                    cache[tau] = (p.samples.float(), ale)
            return cache[tau]

    head_var = f0[1].float() if isinstance(f0, (tuple, list)) else None
    if task == "classification":
        t_logit = posterior.logit_temperature

        def score_t(tau: float) -> tuple[float, float]:
            logits = outputs(tau)[0]
            if not fit_logit_temperature:
                return classification_nll(logits / t_logit, y, link), t_logit
            lt, val = _golden_min(lambda lt: classification_nll(logits / math.exp(lt), y, link), *_LOG_T_RANGE)
            return val, math.exp(lt)

    else:
        resid = float((y - mean0.float()).square().mean()) or 1.0

        def score_t(tau: float) -> tuple[float, float]:
            means, ales = outputs(tau)
            m, epi = means.mean(0), means.var(0, unbiased=False)
            ale = ales.mean(0) if ales is not None else head_var
            if ale is not None:
                return gaussian_nll(m, epi + ale, y), 1.0
            if noise_var is not None:
                return gaussian_nll(m, epi + noise_var, y), noise_var
            ln, val = _golden_min(lambda ln: gaussian_nll(m, epi + math.exp(ln), y),
                                  math.log(resid) - 14.0, math.log(resid) + 5.0, iters=40)
            return val, math.exp(ln)

    memo: dict[float, tuple[float, float]] = {}

    def score(tau: float) -> float:
        if tau not in memo:
            memo[tau] = score_t(tau)
        return memo[tau][0]

    tau, nll, map_nll, curve = _search(score, grid, min_gain)
    second = memo[tau][1]
    report = CalibrationReport(
        temperature=tau,
        logit_temperature=second if task == "classification" else 1.0,
        noise_var=second if task == "regression" and head_var is None else None,
        nll=nll,
        map_nll=map_nll,
        curve=curve,
        linearized=linearized,
        link=link,
        num_samples=num_samples,
        seed=seed,
        num_val=int(mean0.shape[0]),
        seconds=time.perf_counter() - t0,
    )
    t_new = report.logit_temperature if task == "classification" else None
    return posterior.scaled(tau, t_new, calibration=report)
