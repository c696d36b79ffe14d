"""The prior precision that maximises the Laplace evidence, with no pass over the data.

For a diagonal Laplace posterior with curvature ``h_i`` (explicit mode: ``h = fisher_scale * v_hat``) around
the MAP ``theta`` and an isotropic Gaussian prior ``N(mu0, 1/delta)``, the log evidence as a function of
``delta`` is, up to terms that do not depend on it,

    log Z(delta) = -delta/2 |theta - mu0|^2 + P/2 log delta - 1/2 sum_i log(h_i + delta),

and its stationary point is MacKay's (1992) fixed point

    delta = gamma / |theta - mu0|^2,    gamma = sum_i h_i / (h_i + delta),

``gamma`` being the effective number of parameters the data determine (between 0 and P). Since
``gamma(delta) - delta |theta - mu0|^2`` decreases strictly in ``delta``, the fixed point is unique; it is
found by a safeguarded Newton iteration in ``log delta`` (a few passes over ``h`` even for 10^8
parameters, where MacKay's plain iteration can take hundreds). With one ``delta`` per parameter group the
same holds group by group. Everything it needs, theta, the prior mean and ``h``, is already in hand:
no data pass.

Where the empirical Fisher has vanished (Adam's ``v`` once a network fits its training set), ``gamma``
goes to 0 and ``delta`` with it: a posterior wider than any sensible prior. :func:`fit_prior_precision`
reports ``gamma``; the posterior warns when it is below 1% of P.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .optim import ParamMoment

__all__ = [
    "EvidenceFit",
    "fit_prior_precision",
    "log_evidence",
    "evidence_prior",
    "prior_means",
    "EVIDENCE",
    "LOW_GAMMA_FRACTION",
]

EVIDENCE = ("evidence", "evidence_per_group")
"""The ``prior_precision`` values that ask for the evidence: one precision for all groups, or one per group."""

LOW_GAMMA_FRACTION = 0.01
"""Below this fraction of P effective parameters the posterior warns that the curvature has vanished."""


@dataclass(frozen=True)
class EvidenceFit:
    """The evidence-maximising prior precision.

    Attributes:
        prior_precision: delta, one per group (group index -> value); a single value is under every group.
        gamma: effective number of parameters, per group.
        num_params: P, per group.
        iterations: Newton iterations until ``log delta`` settled.
        converged: whether it did within the iteration budget.
    """

    prior_precision: dict[int, float]
    gamma: dict[int, float]
    num_params: dict[int, int]
    iterations: int
    converged: bool

    @property
    def total_gamma(self) -> float:
        return sum(self.gamma.values())

    @property
    def total_params(self) -> int:
        return sum(self.num_params.values())

    def __str__(self) -> str:
        parts = ", ".join(
            f"group {g}: prior precision {self.prior_precision[g]:.4g}, gamma {self.gamma[g]:.4g} "
            f"of {self.num_params[g]}"
            for g in sorted(self.prior_precision)
        )
        return f"evidence: {parts} ({self.iterations} iterations{'' if self.converged else ', not converged'})"


def _solve(h: Tensor, dev: float, tol: float, max_iter: int) -> tuple[float, int, bool]:
    """The root of ``g(x) = sum h / (h + e^x) - e^x dev`` (decreasing in x): safeguarded Newton on a bracket."""
    lo, hi, x = -700.0, 700.0, 0.0
    for step in range(1, max_iter + 1):
        delta = math.exp(x)
        ratio = h / (h + delta)
        g = float(ratio.sum()) - delta * dev
        if g > 0:
            lo = x
        else:
            hi = x
        slope = -(float((ratio * (1.0 - ratio)).sum()) + delta * dev)  # dg/dx
        new = x - g / slope if slope < 0 else 0.5 * (lo + hi)
        if not lo < new < hi:
            new = 0.5 * (lo + hi)
        if abs(new - x) < tol or hi - lo < tol:
            return math.exp(new), step, True
        x = new
    return math.exp(x), max_iter, False


def fit_prior_precision(
    curvature: Sequence[Tensor],
    deviation_sq: Sequence[Tensor],
    groups: Sequence[int],
    *,
    per_group: bool = False,
    tol: float = 1e-9,
    max_iter: int = 200,
) -> EvidenceFit:
    """Maximises the Laplace evidence over the prior precision by MacKay's fixed point.

    Args:
        curvature: per parameter tensor, ``h >= 0`` elementwise (the data part of the precision).
        deviation_sq: per parameter tensor, ``(theta - mu0)^2`` elementwise.
        groups: the group of each parameter tensor.
        per_group: one precision per group (default False: one for all).
        tol: change of ``log delta`` that stops the iteration.
        max_iter: iteration budget.

    Returns:
        The fit; the same precision under every group when ``per_group`` is False.

    Raises:
        ValueError: theta equals the prior mean everywhere (the evidence has no maximum).
    """
    keys = sorted(set(groups)) if per_group else [None]
    h_by: dict[object, list[Tensor]] = {k: [] for k in keys}
    d_by: dict[object, float] = {k: 0.0 for k in keys}
    for h, d2, g in zip(curvature, deviation_sq, groups, strict=True):
        k = g if per_group else None
        h_by[k].append(h.detach().reshape(-1).double())
        d_by[k] += float(d2.detach().double().sum())
    out_delta: dict[object, float] = {}
    out_gamma: dict[object, float] = {}
    iters, converged = 0, True
    for k in keys:
        h = torch.cat(h_by[k]) if h_by[k] else torch.zeros(0, dtype=torch.float64)
        dev = d_by[k]
        if not dev > 0:
            where = "" if k is None else f" in group {k}"
            raise ValueError(
                f"theta equals the prior mean everywhere{where}: the evidence grows without bound with the prior "
                "precision; pass prior_mean=... that differs from the trained weights, or a prior_precision"
            )
        delta, steps, ok = _solve(h, dev, tol, max_iter)
        iters = max(iters, steps)
        converged = converged and ok
        out_delta[k] = delta
        out_gamma[k] = float((h / (h + delta)).sum())
    group_ids = sorted(set(groups))
    sizes = {g: 0 for g in group_ids}
    for h, g in zip(curvature, groups, strict=True):
        sizes[g] += h.numel()
    if per_group:
        return EvidenceFit({g: out_delta[g] for g in group_ids}, {g: out_gamma[g] for g in group_ids}, sizes, iters,
                           converged)
    # one delta for all: gamma split by group for the report
    delta = out_delta[None]
    gammas = {g: 0.0 for g in group_ids}
    for h, g in zip(curvature, groups, strict=True):
        hd = h.detach().double()
        gammas[g] += float((hd / (hd + delta)).sum())
    return EvidenceFit({g: delta for g in group_ids}, gammas, sizes, iters, converged)


def log_evidence(curvature: Tensor, deviation_sq: Tensor, delta: float) -> float:
    """``-delta/2 |theta - mu0|^2 + P/2 log delta - 1/2 sum log(h + delta)``: the part of log Z that varies with delta.

    Args:
        curvature: (P,) ``h``.
        deviation_sq: (P,) ``(theta - mu0)^2``.
        delta: the prior precision.
    """
    h = curvature.double()
    return float(-0.5 * delta * deviation_sq.double().sum() + 0.5 * h.numel() * math.log(delta)
                 - 0.5 * torch.log(h + delta).sum())


def prior_means(prior_mean: Mapping[str, Tensor] | nn.Module | None, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The prior mean of each parameter: zeros by default, else from a state_dict or a model (its parameters).

    Args:
        prior_mean: None, a mapping name -> tensor (``model.state_dict()``), or a model (e.g. the pretrained
            network before fine-tuning).
        params: name -> the (trained) parameter, for every parameter the posterior covers.

    Raises:
        KeyError: a covered parameter has no prior mean. ValueError: a shape differs.
    """
    if prior_mean is None:
        return {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    source = dict(prior_mean.named_parameters()) if isinstance(prior_mean, nn.Module) else dict(prior_mean)
    out = {}
    for n, p in params.items():
        if n not in source:
            raise KeyError(f"prior_mean has no entry for parameter {n!r}: give one tensor per covered parameter")
        t = source[n]
        if not isinstance(t, Tensor) or tuple(t.shape) != tuple(p.shape):
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"prior_mean[{n!r}] has shape {got}, the parameter {tuple(p.shape)}")
        out[n] = t.detach().to(device=p.device, dtype=torch.float32)
    return out


def evidence_prior(
    moments: Sequence[ParamMoment],
    params: Mapping[str, Tensor],
    how: str,
    fisher_scales: Sequence[float],
    prior_mean: Mapping[str, Tensor] | nn.Module | None = None,
) -> EvidenceFit:
    """Explicit mode's evidence-maximising prior precision from the moments (``prior_precision="evidence"``).

    The curvature is explicit mode's ``h = fisher_scale * v_hat`` per element, the deviation
    ``(theta - prior_mean)^2``; warns when fewer than :data:`LOW_GAMMA_FRACTION` of the parameters are
    determined by the data (the empirical Fisher has vanished).

    Args:
        moments: the covered parameters' second moments.
        params: name -> the trained parameter (theta).
        how: ``"evidence"`` (one precision) or ``"evidence_per_group"``.
        prior_mean: see :func:`prior_means`.
        fisher_scales: explicit mode's multiplier of ``v_hat``, one per moment.
    """
    if how not in EVIDENCE:
        raise ValueError(f"prior_precision must be a number, a sequence or mapping by group, or one of {EVIDENCE}")
    if any(hasattr(params[m.name], "device_mesh") for m in moments):
        raise NotImplementedError(
            "the evidence sums over every parameter, and a sharded model holds only this rank's shards: pass a "
            "prior_precision, or build the posterior from a full (unsharded) model and state"
        )
    mu0 = prior_means(prior_mean, {m.name: params[m.name] for m in moments})
    h, d2, groups = [], [], []
    for m, fs in zip(moments, fisher_scales, strict=True):
        v_hat = m.v.detach().double() * m.scale + m.shift
        h.append((fs * v_hat).clamp(min=0.0))
        d2.append((params[m.name].detach().double() - mu0[m.name].double()).square())
        groups.append(m.group)
    fit = fit_prior_precision(h, d2, groups, per_group=how == "evidence_per_group")
    tiny = torch.finfo(torch.float32).tiny
    if min(fit.prior_precision.values()) < tiny:
        raise ValueError(
            f"the evidence has no maximum at a positive prior precision (gamma {fit.total_gamma:.3g} of "
            f"{fit.total_params}): the curvature is zero where it matters. Use a curvature that does not vanish "
            "(l2m_fast.FisherTracker or l2m_fast.fisher_diag), or pass a prior_precision"
        )
    if fit.total_gamma < LOW_GAMMA_FRACTION * fit.total_params:
        warnings.warn(
            f"the evidence finds {fit.total_gamma:.3g} effective parameters of {fit.total_params}: the curvature "
            "(the optimizer's empirical Fisher) has all but vanished, so the prior precision it picks "
            f"({min(fit.prior_precision.values()):.3g}) gives a posterior wider than any sensible prior. Use a "
            "curvature that does not vanish (l2m_fast.FisherTracker during training, or l2m_fast.fisher_diag on a "
            "few batches) or calibrate the temperature on validation data (post.calibrated(...))",
            RuntimeWarning,
            stacklevel=4,
        )
    return fit
