"""The IVON optimizer's variational posterior, sampled by the fused sampler.

IVON (Shen et al., 2024; package ``ivon-opt``) keeps per parameter group a Hessian estimate ``hess``
(flat, in the group's parameter order), an effective sample size ``ess`` and a ``weight_decay``; the
parameters themselves hold the mean. Its posterior is ``N(p, diag(ess * (hess + weight_decay))^-1)``
(``IVON._sample_params``). The L2M posterior built here uses ``v = hess``, ``a = ess`` and
``b = ess * weight_decay`` per group, in the model's parameter order.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..posterior import L2MPosterior
from ._common import require

__all__ = ["from_ivon"]


def from_ivon(model: nn.Module, optimizer: Any) -> L2MPosterior:
    """The :class:`~l2m_fast.L2MPosterior` of a model trained with ``ivon.IVON``.

    Call it outside ``optimizer.sampled_params()`` (the parameters must hold the mean).

    Args:
        model: the trained model.
        optimizer: its ``ivon.IVON`` optimizer, after at least one step (``hess`` initialised).

    Returns:
        The posterior over every parameter the optimizer updates.
    """
    ivon = require("ivon", "ivon-opt")
    if not isinstance(optimizer, ivon.IVON):
        raise TypeError(f"expected an ivon.IVON optimizer, got {type(optimizer).__name__}")
    name_of = {id(p): n for n, p in model.named_parameters()}
    hess: dict[str, Tensor] = {}
    groups: dict[str, int] = {}
    a, b = [], []
    for g, group in enumerate(optimizer.param_groups):
        if "hess" not in group:
            raise ValueError("the IVON optimizer has no Hessian estimate yet: take a step first")
        ess, wd = float(group["ess"]), float(group["weight_decay"])
        a.append(ess)
        b.append(ess * wd)
        pos = 0
        for p in group["params"]:
            if p is None:
                continue
            n = name_of.get(id(p))
            if n is None:
                raise ValueError("the optimizer updates a parameter that is not in the model")
            k = p.numel()
            hess[n] = group["hess"][pos : pos + k].detach().view(p.shape)
            groups[n] = g
            pos += k
    params = {n: p for n, p in model.named_parameters() if n in hess}
    return L2MPosterior(params, hess, a=a, b=b, groups=groups, mode="ivon")
