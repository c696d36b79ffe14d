"""laplace-torch's diagonal Laplace approximation and L2M posteriors, both ways.

* :func:`from_laplace`: a fitted ``DiagLaplace`` as an :class:`L2MPosterior`, sampled by the fused sampler;
* :func:`to_laplace`: an L2M posterior as a ``DiagLaplace`` (no fit pass), so that laplace-torch's GLM,
  probit and bridge predictives run on it.

``laplace.DiagLaplace`` keeps the posterior mean ``la.mean`` (P,) and a diagonal posterior precision
``la.posterior_precision = H / (sigma_noise^2 * temperature) + prior_precision`` (P,) over the
parameters of ``la.model`` that require grad, in ``model.parameters()`` order. The L2M posterior built
by :func:`from_laplace` is ``N(mean, diag(precision)^-1)`` with ``v = posterior_precision, a = 1, b = 0``:
the same distribution as ``la.sample``, drawn in one call of our sampler.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..layout import FlatLayout
from ..posterior import L2MPosterior
from ._common import require

__all__ = ["from_laplace", "to_laplace"]


def from_laplace(la: Any, model: nn.Module | None = None) -> L2MPosterior:
    """The :class:`~l2m_fast.L2MPosterior` of a fitted laplace-torch ``DiagLaplace``.

    Args:
        la: a fitted ``laplace.DiagLaplace`` (``Laplace(model, ..., hessian_structure="diag")``,
            subset of weights by ``requires_grad``). Last-layer variants are not supported.
        model: the model whose parameter names to use. Default: ``la.model``.

    Returns:
        The posterior over the parameters laplace-torch covers; its snapshot is taken now (refitting
        ``la`` or changing its prior precision afterwards does not change it).
    """
    laplace = require("laplace", "laplace-torch")
    if not isinstance(la, laplace.DiagLaplace):
        raise TypeError(f"expected a fitted laplace.DiagLaplace (hessian_structure='diag'), got {type(la).__name__}")
    model = la.model if model is None else model
    covered = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ids = [id(p) for p in la.params]
    if [id(p) for _, p in covered] != ids:
        raise ValueError("the model's parameters that require grad are not the ones laplace-torch covers")
    layout = FlatLayout.from_shapes((n, p.shape) for n, p in covered)
    mean = layout.views(la.mean.detach().float().reshape(-1))
    prec = layout.views(la.posterior_precision.detach().float().reshape(-1))
    return L2MPosterior(mean, prec, a=1.0, b=0.0, mode="laplace-torch")


def to_laplace(
    posterior: L2MPosterior,
    model: nn.Module,
    likelihood: str,
    *,
    n_outputs: int,
    n_data: int | None = None,
    sigma_noise: float = 1.0,
    **laplace_kwargs: Any,
) -> Any:
    """A laplace-torch ``DiagLaplace`` holding this posterior: its GLM, probit and bridge predictives, no fit pass.

    laplace-torch's diagonal posterior precision is ``H / sigma_noise^2 + prior_precision`` over the
    parameters of ``model`` that require grad; it is loaded with ``H = sigma_noise^2 a v`` and the
    per-element prior precision ``b`` (each element's segment coefficients), and with ``mean = theta``, so
    that its precision is this posterior's ``a v + b`` element by element (temperature included).

    Args:
        posterior: a posterior over exactly the parameters of ``model`` that require grad (set
            ``requires_grad_(False)`` on the others, e.g. for a last-layer posterior), not sharded.
        model: the model.
        likelihood: ``"classification"`` or ``"regression"``.
        n_outputs: outputs of the model (classes), which laplace-torch otherwise learns in its fit.
        n_data: N, for laplace-torch's marginal likelihood (default: unset, 0).
        sigma_noise: regression noise standard deviation. Default 1.
        **laplace_kwargs: passed to ``laplace.DiagLaplace`` (``backend``, ...).

    Returns:
        The ``DiagLaplace``. Its predictive does not apply a calibrated ``logit_temperature``.
    """
    laplace = require("laplace", "laplace-torch")
    if posterior.is_sharded:
        raise NotImplementedError("laplace-torch works on whole parameters: export from an unsharded posterior")
    if posterior.temperature == 0:
        raise ValueError("a zero-temperature posterior is the MAP: its precision is infinite, laplace-torch's is not")
    params = posterior.parameters_of(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if trainable != list(params):
        raise ValueError(
            f"laplace-torch covers the parameters that require grad ({trainable[:4]}...), this posterior "
            f"{list(params)[:4]}...: set requires_grad_(False) on the parameters the posterior does not cover"
        )
    from ..ops.reference import segment_ids_ref

    seg = segment_ids_ref(posterior.seg_bounds, posterior.num_params)
    dtype = next(iter(params.values())).dtype
    prior = posterior.seg_b[seg].to(dtype)
    la = laplace.DiagLaplace(model, likelihood, sigma_noise=sigma_noise, prior_precision=prior, **laplace_kwargs)
    la.H = (sigma_noise**2 * posterior.seg_a[seg] * posterior.v).to(dtype)
    la.mean = posterior.theta.to(dtype).clone()
    la.n_outputs = int(n_outputs)
    la.n_data = 0 if n_data is None else int(n_data)
    la.loss = 0.0
    if posterior.logit_temperature != 1.0:
        import warnings

        warnings.warn(
            f"laplace-torch's predictive does not divide the logits by this posterior's logit temperature "
            f"({posterior.logit_temperature:.4g}): divide them yourself, or use post.predict",
            RuntimeWarning,
            stacklevel=2,
        )
    return la
