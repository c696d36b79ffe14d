"""Variance modes: per-parameter ``(a, b)`` of the precision ``a * v + b``.

``v`` is the second moment as the optimizer stores it; ``v_hat = scale * v + shift`` corrects it
(:mod:`l2m_fast.optim`), and the correction is folded into ``(a, b)`` so the kernel stays one formula.

* **paper** (eq. 6 and the paper's pseudo-code): ``precision = v_hat + 1/lambda + eps`` with the
  group's ``weight_decay`` as lambda and its ``eps``. Note that the paper adds ``1/lambda``, the prior
  *variance*, to the Fisher diagonal: a larger weight decay gives a *wider* posterior. We keep the paper's
  formula in this mode; the explicit mode is the principled alternative.
* **explicit**: ``precision = fisher_scale * v_hat + prior_precision``, the variance multiplied by
  ``temperature``. Adam's ``v`` is the second moment of *mini-batch mean* gradients; near the optimum
  the empirical Fisher of the summed loss over N points is about ``N * B * v`` for batch size B, and an
  L2 penalty ``(lambda / 2) |theta|^2`` added to a mean loss is a Gaussian prior of precision
  ``N * lambda`` on that scale (AdamW's decoupled decay only approximately so). Given ``num_data`` and
  ``batch_size`` these are the defaults: ``fisher_scale = N * B`` and ``prior_precision = N * lambda``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .evidence import EvidenceFit, evidence_prior
from .layout import FlatLayout
from .optim import ParamMoment

__all__ = [
    "PerGroup",
    "per_group",
    "paper_coefficients",
    "explicit_coefficients",
    "explicit_fisher_scale",
    "segments",
    "restrict_segments",
    "coefficients",
    "MODES",
]

MODES = ("paper", "explicit")

PerGroup = float | Sequence[float] | Mapping[int, float] | None


def per_group(value: PerGroup, group: int, what: str) -> float | None:
    """The value for one parameter group: a scalar applies to all, a sequence or mapping by group index.

    Raises:
        ValueError: the value for the group is not a finite number (naming ``what`` and the group).
    """
    if value is None:
        return None
    if isinstance(value, Mapping):
        v = value.get(group)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        if group >= len(value):
            raise ValueError(f"{what} gives {len(value)} values but the optimizer has a group {group}")
        v = value[group]
    else:
        v = value
    if v is None:
        return None
    try:
        number = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(v, bool) or not math.isfinite(number):
        raise ValueError(
            f"{what} for group {group} must be a finite number (a float, a sequence by group or a mapping "
            f"{{group: value}}), got {v!r}"
        )
    return number


def _group_error(m: ParamMoment, what: str, fix: str) -> ValueError:
    return ValueError(f"param group {m.group} (parameter {m.name!r}): {what}; {fix}")


def paper_coefficients(
    m: ParamMoment, weight_decay: PerGroup = None, eps: PerGroup = None
) -> tuple[float, float]:
    """``(a, b)`` of paper mode: ``precision = v_hat + 1 / weight_decay + eps``.

    Args:
        m: the parameter's moment and its group's hyperparameters.
        weight_decay: override of the group's weight decay (lambda).
        eps: override of the group's eps.
    """
    wd = per_group(weight_decay, m.group, "weight_decay")
    if wd is None:
        wd = float(m.hyper.get("weight_decay", 0.0))  # type: ignore[arg-type]
    e = per_group(eps, m.group, "eps")
    if e is None:
        e = float(m.hyper.get("eps", 0.0))  # type: ignore[arg-type]
    if not wd > 0:
        raise _group_error(
            m,
            f"weight_decay={wd} gives paper mode no prior term (it adds 1/weight_decay)",
            "use mode='explicit' with prior_precision=... (or num_data=...), or pass weight_decay={group: value}",
        )
    if e < 0:
        raise _group_error(m, f"eps={e} is negative", "pass eps={group: value} >= 0")
    return m.scale, m.shift + 1.0 / wd + e


def explicit_fisher_scale(
    m: ParamMoment, fisher_scale: PerGroup = None, num_data: int | None = None, batch_size: int | None = None
) -> float:
    """Explicit mode's multiplier of ``v_hat`` for one parameter: ``fisher_scale``, else ``num_data * batch_size``."""
    fs = per_group(fisher_scale, m.group, "fisher_scale")
    if fs is None:
        if num_data is None or batch_size is None:
            raise _group_error(
                m, "explicit mode needs a fisher_scale", "pass fisher_scale=... or num_data=N and batch_size=B"
            )
        fs = float(num_data) * float(batch_size)
    return fs


def explicit_coefficients(
    m: ParamMoment,
    fisher_scale: PerGroup = None,
    prior_precision: PerGroup = None,
    temperature: PerGroup = 1.0,
    num_data: int | None = None,
    batch_size: int | None = None,
) -> tuple[float, float]:
    """``(a, b)`` of explicit mode: ``precision = (fisher_scale * v_hat + prior_precision) / temperature``.

    Args:
        m: the parameter's moment and its group's hyperparameters.
        fisher_scale: multiplier of ``v_hat``; default ``num_data * batch_size``.
        prior_precision: additive precision; default ``num_data * weight_decay``.
        temperature: multiplies the variance. Default 1.0.
        num_data: N, the number of training points.
        batch_size: B, the mini-batch size of training.
    """
    fs = explicit_fisher_scale(m, fisher_scale, num_data, batch_size)
    pp = per_group(prior_precision, m.group, "prior_precision")
    if pp is None:
        wd = float(m.hyper.get("weight_decay", 0.0))  # type: ignore[arg-type]
        if num_data is None or not wd > 0:
            raise _group_error(
                m,
                f"no prior precision (weight_decay={wd}, num_data={num_data})",
                "pass prior_precision=... (or num_data=N with a positive weight_decay)",
            )
        pp = float(num_data) * wd
    t = per_group(temperature, m.group, "temperature")
    t = 1.0 if t is None else t
    if not fs >= 0 or not pp >= 0 or not t > 0:
        raise _group_error(
            m,
            f"fisher_scale={fs}, prior_precision={pp}, temperature={t}",
            "fisher_scale and prior_precision must be >= 0 and temperature > 0",
        )
    return fs * m.scale / t, (fs * m.shift + pp) / t


_OPTIONS = {
    "paper": {"weight_decay", "eps"},
    "explicit": {"fisher_scale", "prior_precision", "temperature", "num_data", "batch_size", "prior_mean"},
}


def coefficients(
    moments: Sequence[ParamMoment], params: Mapping[str, Tensor], mode: str, options: Mapping[str, object]
) -> tuple[list[tuple[float, float]], EvidenceFit | None]:
    """Each covered parameter's ``(a, b)`` in ``mode``, and the evidence fit when the prior precision asks for it.

    Args:
        moments: the covered parameters' second moments (or Fisher diagonals), in flat order.
        params: name -> the trained parameter (theta), for the evidence.
        mode: ``"paper"`` or ``"explicit"``.
        options: the mode's options (see :func:`paper_coefficients`, :func:`explicit_coefficients`);
            explicit mode also takes ``prior_precision="evidence"`` or ``"evidence_per_group"`` with
            ``prior_mean`` (:mod:`l2m_fast.evidence`).

    Raises:
        ValueError: an unknown mode. TypeError: options that do not apply to the mode.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    unknown = set(options) - _OPTIONS[mode]
    if unknown:
        raise TypeError(f"{sorted(unknown)} do not apply to mode={mode!r}")
    if mode == "paper":
        return [paper_coefficients(m, **options) for m in moments], None  # type: ignore[arg-type]
    opts = dict(options)
    prior_mean = opts.pop("prior_mean", None)
    evidence = None
    if isinstance(opts.get("prior_precision"), str):
        scales = [
            explicit_fisher_scale(m, opts.get("fisher_scale"), opts.get("num_data"), opts.get("batch_size"))  # type: ignore[arg-type]
            for m in moments
        ]
        evidence = evidence_prior(moments, params, str(opts["prior_precision"]), scales, prior_mean)  # type: ignore[arg-type]
        opts["prior_precision"] = evidence.prior_precision
    elif prior_mean is not None:
        raise TypeError("prior_mean is used by prior_precision='evidence' only (the posterior's mean is theta)")
    return [explicit_coefficients(m, **opts) for m in moments], evidence  # type: ignore[arg-type]


def segments(coeffs: Sequence[tuple[float, float]], layout: FlatLayout) -> tuple[Tensor, Tensor, Tensor]:
    """Merges runs of parameters with equal ``(a, b)`` into segments: ``a (G,), b (G,), bounds (G+1,)``."""
    a_list: list[float] = []
    b_list: list[float] = []
    bounds = [0]
    for (a, b), slot in zip(coeffs, layout):
        if a_list and a_list[-1] == a and b_list[-1] == b:
            bounds[-1] = slot.stop
        else:
            a_list.append(a)
            b_list.append(b)
            bounds.append(slot.stop)
    if not a_list:
        a_list, b_list = [1.0], [1.0]
    return (
        torch.tensor(a_list, dtype=torch.float32),
        torch.tensor(b_list, dtype=torch.float32),
        torch.tensor(bounds if len(bounds) > 1 else [0, 0], dtype=torch.int64),
    )


def restrict_segments(
    seg_a: Tensor, seg_b: Tensor, bounds: list[int], start: int, stop: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The segments over elements ``[start, stop)``, re-based to start at 0.

    Args:
        seg_a, seg_b: (G,) per-segment coefficients.
        bounds: the G + 1 segment boundaries as a list (``seg_bounds.tolist()``, read once by callers
            that restrict to several ranges).
        start, stop: the element range.

    Returns:
        ``a (G',), b (G',), bounds (G'+1,)`` for the op; an empty range keeps one segment, ``[0, 0]``.
    """
    keep = [g for g in range(len(bounds) - 1) if bounds[g] < stop and bounds[g + 1] > start]
    if not keep:
        return seg_a[:1], seg_b[:1], torch.zeros(2, dtype=torch.int64, device=seg_a.device)
    new_bounds = [0] + [min(bounds[g + 1], stop) - start for g in keep]
    return (
        seg_a[keep[0] : keep[-1] + 1].contiguous(),
        seg_b[keep[0] : keep[-1] + 1].contiguous(),
        torch.tensor(new_bounds, dtype=torch.int64, device=seg_a.device),
    )
