"""SWAG-diagonal (Maddox, Garipov, Izmailov, Vetrov & Wilson 2019), small version for the toy regression.

Starting from the trained network, SGD with a constant learning rate on mini-batches runs for
``swa_epochs`` more epochs; after each epoch the weights are collected into running first and second
moments. The posterior is ``N(theta_SWA, diag(E[theta^2] - E[theta]^2))`` and the predictive averages
the network over samples of it (SWAG-diagonal, the paper's ``Sigma_diag`` alone).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..common import MethodRun, Timer
from ..toy import ToyConfig

__all__ = ["run_swag"]


def run_swag(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    queries: Tensor,
    cfg: ToyConfig,
    *,
    swa_epochs: int = 1000,
    swa_lr: float = 1e-4,
    batch_size: int = 5,
    train_s: float = 0.0,
    progress: object | None = None,
) -> MethodRun:
    """Runs the SWA phase from ``model`` (left unchanged) and samples the diagonal SWAG posterior.

    Args:
        model: the trained network (pre-training as in the paper's setup).
        x: (N, 1) inputs. y: (N, 1) targets.
        queries: (Q, 1) inputs to predict at.
        cfg: ``samples`` and ``seed``.
        swa_epochs: epochs of the SWA phase, one snapshot after each. Default 1000.
        swa_lr: constant SGD learning rate of the SWA phase (1e-3 diverges on these raw targets). Default 1e-4.
        batch_size: mini-batch size of the SWA phase (its gradient noise makes the spread). Default 5.
        train_s: wall time of the pre-training, reported as the training time.
        progress: optional tqdm bar, advanced once per SWA epoch.

    Returns:
        A :class:`MethodRun` with ``samples`` (cfg.samples, Q); ``posthoc_s`` is the SWA phase.
    """
    net = _clone(model)
    g = torch.Generator().manual_seed(cfg.seed + 4000)
    opt = torch.optim.SGD(net.parameters(), lr=swa_lr, momentum=0.9)
    names = [n for n, _ in net.named_parameters()]
    mean = [torch.zeros_like(p) for p in net.parameters()]
    sq = [torch.zeros_like(p) for p in net.parameters()]
    n = x.shape[0]
    with Timer() as t_post:
        net.train()
        for e in range(swa_epochs):
            perm = torch.randperm(n, generator=g)
            for i in range(0, n, batch_size):
                idx = perm[i : i + batch_size]
                opt.zero_grad(set_to_none=True)
                loss = torch.mean((net(x[idx]) - y[idx]) ** 2)
                loss.backward()
                opt.step()
            with torch.no_grad():
                for mu, s2, p in zip(mean, sq, net.parameters()):
                    mu.mul_(e / (e + 1)).add_(p / (e + 1))
                    s2.mul_(e / (e + 1)).add_(p * p / (e + 1))
            if progress is not None:
                progress.update(1)  # type: ignore[attr-defined]
        net.eval()
        std = [(s2 - mu * mu).clamp_min(1e-30).sqrt() for mu, s2 in zip(mean, sq)]
    with Timer() as t_pred, torch.no_grad():
        outs = []
        for _ in range(cfg.samples):
            params = {nm: mu + sd * torch.randn(mu.shape, generator=g) for nm, mu, sd in zip(names, mean, std)}
            outs.append(functional_call(net, params, (queries,)).squeeze(-1))
        samples = torch.stack(outs)
    diag = {"mean_std": float(torch.cat([s.reshape(-1) for s in std]).mean())}
    return MethodRun(samples, train_s=train_s, posthoc_s=t_post.s, predict_s=t_pred.s, diagnostics=diag)


def _clone(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)
