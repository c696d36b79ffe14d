"""laplace-torch's diagonal Laplace approximation, sampled by the fused sampler.

``laplace.DiagLaplace`` keeps the posterior mean ``la.mean`` (P,) and a diagonal posterior precision
``la.posterior_precision = H / (sigma_noise^2 * temperature) + prior_precision`` (P,) over the
parameters of ``la.model`` that require grad, in ``model.parameters()`` order. The L2M posterior built
here is ``N(mean, diag(precision)^-1)`` with ``v = posterior_precision, a = 1, b = 0``: the same
distribution as ``la.sample``, drawn in one call of our sampler.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..layout import FlatLayout
from ..posterior import L2MPosterior
from ._common import require

__all__ = ["from_laplace"]


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
