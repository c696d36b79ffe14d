"""Hamiltonian Monte Carlo over the weights of the toy MLP (Neal 2011; Cobb & Jalaian 2020).

The target is the exact posterior of the network: Gaussian likelihood with the known noise
``sigma = 3`` and an isotropic Gaussian prior on every weight (``N(0, 1/prior_precision)``, as in
hamiltorch's default ``tau = 1``). Leapfrog integration with a Metropolis correction; the step size
is adapted during burn-in towards a target acceptance rate (a Robbins-Monro rule on log step size)
and frozen afterwards (up to a random jitter per iteration), so the kept chain is a valid Markov
chain. The chain starts at the MAP.
Diagnostics: acceptance rate after burn-in and effective sample sizes (Geyer) of the network output
at a few inputs and of the log posterior.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..common import MethodRun, Timer
from ..metrics import effective_sample_size
from ..toy import NOISE_STD, ToyConfig

__all__ = ["run_hmc"]


def _unflatten(model: nn.Module, flat: Tensor) -> dict[str, Tensor]:
    out, i = {}, 0
    for n, p in model.named_parameters():
        out[n] = flat[i : i + p.numel()].view_as(p)
        i += p.numel()
    return out


def run_hmc(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    queries: Tensor,
    cfg: ToyConfig,
    *,
    prior_precision: float = 1.0,
    leapfrog_steps: int = 40,
    target_accept: float = 0.75,
    init_step: float = 1e-3,
    step_jitter: float = 0.2,
    ess_inputs: tuple[float, ...] = (-5.0, 0.0, 5.0),
    progress: object | None = None,
) -> MethodRun:
    """Samples the posterior with HMC, starting at ``model``'s weights (the MAP).

    Args:
        model: the network; its weights are the starting point and are left unchanged.
        x: (N, 1) inputs. y: (N, 1) targets.
        queries: (Q, 1) inputs to predict at.
        cfg: ``hmc_burn`` burn-in and ``hmc_samples`` kept iterations; ``samples`` of those are
            kept, evenly thinned, for the predictive.
        prior_precision: precision of the Gaussian prior on each weight. Default 1.0.
        leapfrog_steps: leapfrog steps per iteration. Default 40.
        target_accept: acceptance rate the burn-in adapts the step size to. Default 0.75.
        init_step: initial step size. Default 1e-3.
        step_jitter: each iteration's step is the adapted one times ``U(1 - jitter, 1 + jitter)``, which
            keeps the chain from locking onto a trajectory length that is a period of the posterior
            (Neal 2011, section 5.4.2.2). Default 0.2.
        ess_inputs: inputs whose output chain gets an ESS.
        progress: optional tqdm bar, advanced once per iteration.

    Returns:
        A :class:`MethodRun` with ``samples`` (cfg.samples, Q) and diagnostics ``accept_rate``,
        ``step_size``, ``chain`` (post-burn-in iterations), ``ess_min`` (the smallest ESS of the
        outputs at ``ess_inputs`` over the whole post-burn-in chain), ``ess_logpost``, ``kept``.
    """
    from torch.func import functional_call

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    g = torch.Generator().manual_seed(cfg.seed + 7)
    inv2s2 = 0.5 / NOISE_STD**2

    def logpost_grad(t: Tensor) -> tuple[float, Tensor]:
        t = t.detach().requires_grad_(True)
        f = functional_call(model, _unflatten(model, t), (x,))
        lp = -inv2s2 * ((f - y) ** 2).sum() - 0.5 * prior_precision * (t * t).sum()
        (grad,) = torch.autograd.grad(lp, t)
        return float(lp.detach()), grad

    total = cfg.hmc_burn + cfg.hmc_samples
    keep_every = max(1, cfg.hmc_samples // max(1, cfg.samples))
    log_step = math.log(init_step)
    lp, grad = logpost_grad(theta)
    probe = torch.tensor(ess_inputs).view(-1, 1)
    kept: list[Tensor] = []
    lps: list[float] = []
    probes: list[Tensor] = []
    accepted = 0
    with Timer() as t_all:
        for it in range(total):
            step = math.exp(log_step) * (1.0 + step_jitter * (2.0 * float(torch.rand((), generator=g)) - 1.0))
            mom = torch.randn(theta.shape, generator=g)
            h0 = -lp + 0.5 * float(mom @ mom)
            q, p, gq = theta.clone(), mom + 0.5 * step * grad, grad
            for k in range(leapfrog_steps):
                q = q + step * p
                lq, gq = logpost_grad(q)
                if k < leapfrog_steps - 1:
                    p = p + step * gq
            p = p + 0.5 * step * gq
            h1 = -lq + 0.5 * float(p @ p)
            accept_prob = math.exp(min(0.0, h0 - h1)) if math.isfinite(h1) else 0.0
            if float(torch.rand((), generator=g)) < accept_prob:
                theta, lp, grad = q, lq, gq
                if it >= cfg.hmc_burn:
                    accepted += 1
            if it < cfg.hmc_burn:
                log_step += (accept_prob - target_accept) / math.sqrt(it + 10.0)
            else:
                lps.append(lp)
                with torch.no_grad():
                    probes.append(functional_call(model, _unflatten(model, theta), (probe,)).squeeze(-1))
                if (it - cfg.hmc_burn) % keep_every == 0 and len(kept) < cfg.samples:
                    kept.append(theta.clone())
            if progress is not None:
                progress.update(1)  # type: ignore[attr-defined]

    with Timer() as t_pred, torch.no_grad():
        samples = torch.stack([functional_call(model, _unflatten(model, t), (queries,)).squeeze(-1) for t in kept])
    chain_out = torch.stack(probes) if probes else torch.zeros(1, probe.shape[0])
    ess = [effective_sample_size(chain_out[:, j]) for j in range(chain_out.shape[1])]
    diag = {
        "accept_rate": accepted / max(1, cfg.hmc_samples),
        "step_size": math.exp(log_step),
        "leapfrog_steps": float(leapfrog_steps),
        "kept": float(len(kept)),
        "ess_min": min(ess),
        "ess_logpost": effective_sample_size(torch.tensor(lps)) if lps else 0.0,
        "chain": float(len(lps)),
    }
    return MethodRun(samples, train_s=0.0, posthoc_s=t_all.s, predict_s=t_pred.s, diagnostics=diag)
