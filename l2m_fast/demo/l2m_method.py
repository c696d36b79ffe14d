"""L2M on the toy regression: every L2M row of the demo (posterior, calibration, Fisher), and laplace-torch's.

Rows (names of :data:`L2M_ROWS`):

* ``l2m_paper``, ``l2m_explicit``: the posterior from AdamW's second moment, sampled predictive;
* ``l2m_paper_calibrated`` (sampled) and ``l2m_explicit_calibrated`` (linearized): the temperature and a
  noise variance fitted jointly on fresh validation draws;
* ``l2m_fisher_calibrated``: the sampled-label Fisher tracked over the last steps of the MAP's training
  (Gaussian likelihood with the known noise), the evidence's prior precision, linearized + calibrated;
* ``l2m_fisher_pass_calibrated``: the same Fisher from passes over the 20 training points after training
  (``fisher_diag``), until it settles;
* ``laplace_diag``: laplace-torch's diagonal GGN Laplace, one pass, marginal-likelihood prior precision,
  its GLM predictive (optional: skipped when laplace-torch does not import).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ..fisher import FisherTracker, fisher_diag
from ..posterior import L2MPosterior
from .common import MethodRun, TimedTracker, Timer
from .toy import NOISE_STD, ToyConfig, fresh_draws

__all__ = ["build_l2m", "l2m_samples", "run_l2m", "run_laplace", "L2M_ROWS", "VALIDATION_POINTS", "FISHER_STEPS"]

L2M_ROWS = (
    "l2m_paper",
    "l2m_explicit",
    "l2m_paper_calibrated",
    "l2m_explicit_calibrated",
    "l2m_fisher_calibrated",
    "l2m_fisher_pass_calibrated",
)
VALIDATION_POINTS = 200
"""Fresh draws from the data distribution (their own seed) on which the calibrated rows fit the
temperature and, jointly, their own noise variance (which then replaces the known 3^2 in their scores)."""
FISHER_STEPS = 500
"""The last steps of the MAP's full-batch training over which the Fisher is tracked."""


def build_l2m(model: nn.Module, optimizer: torch.optim.Optimizer, mode: str, **options: float | int) -> L2MPosterior:
    """``L2MPosterior.from_optimizer`` in ``mode`` (``"paper"`` or ``"explicit"`` with its options)."""
    return L2MPosterior.from_optimizer(model, optimizer, mode=mode, **options)


@torch.no_grad()
def l2m_samples(
    post: L2MPosterior, model: nn.Module, x: Tensor, num_samples: int, seed: int, linearized: bool = False
) -> Tensor:
    """Network outputs under ``num_samples`` posterior samples: (B, ...) inputs -> (S, B, ...) outputs.

    The one place the regression demo computes the L2M predictive: ``post.predict`` evaluates the model
    on all samples in batched chunks (or a loop where that is faster) and keeps the S outputs;
    ``linearized`` evaluates the model linearized at the MAP instead.
    """
    pred = post.predict(
        model, x, num_samples=num_samples, seed=seed, keep_samples=True, linearized=linearized, progress=False
    )
    return pred.samples


def fisher_tracker(model: nn.Module, cfg: ToyConfig) -> TimedTracker:
    """The tracker the MAP's training feeds: Gaussian likelihood with the known noise, the last steps."""
    return TimedTracker(
        model, likelihood="regression", sigma=NOISE_STD, start=max(cfg.epochs - FISHER_STEPS, 0), seed=cfg.seed
    )


def _posterior(
    name: str, model: nn.Module, opt: torch.optim.Optimizer, tracker: FisherTracker, x: Tensor, cfg: ToyConfig
) -> tuple[L2MPosterior, dict[str, float]]:
    n = x.shape[0]
    if name.startswith("l2m_fisher_pass"):
        est = fisher_diag(model, [x] * 200, likelihood="regression", sigma=NOISE_STD, seed=cfg.seed)
        settled = est.settled_after or est.batches
        est = fisher_diag(model, [x] * settled, likelihood="regression", sigma=NOISE_STD, seed=cfg.seed)
        post = L2MPosterior.from_fisher(model, est, num_data=n, prior_precision="evidence")
        return post, {"fisher_passes": float(settled)}
    if name.startswith("l2m_fisher"):
        post = L2MPosterior.from_fisher(model, tracker, num_data=n, prior_precision="evidence")
        return post, {"tracked_steps": float(tracker.tracked)}
    mode = name.split("_")[1]
    options = {} if mode == "paper" else {"num_data": n, "batch_size": n}
    return build_l2m(model, opt, mode, **options), {}


def run_l2m(
    name: str,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    tracker: TimedTracker,
    x: Tensor,
    queries: Tensor,
    cfg: ToyConfig,
    map_s: float,
) -> MethodRun:
    """One L2M row of :data:`L2M_ROWS`: build, maybe calibrate, predict at ``queries`` (Q, 1) -> (S, Q)."""
    calibrated = name.endswith("_calibrated")
    linearized = calibrated and name != "l2m_paper_calibrated"
    with Timer() as t_post, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a vanishing curvature warns; its row shows the effect
        post, extra = _posterior(name, model, opt, tracker, x, cfg)
        gamma = post.evidence.total_gamma if post.evidence is not None else float("nan")
        if calibrated:  # tau and a noise variance fitted jointly on fresh validation draws
            vx, vy = fresh_draws(VALIDATION_POINTS, seed=2)
            post = post.calibrated(
                model, vx, vy, task="regression", linearized=linearized, num_samples=cfg.samples, seed=cfg.seed
            )
    with Timer() as t_pred:
        samples = l2m_samples(post, model, queries, cfg.samples, cfg.seed, linearized=linearized).squeeze(-1)
    var = post.variance()
    diagnostics = {
        "max_weight_var": float(var.max()),
        "median_weight_var": float(var.median()),
        "temperature": post.temperature,
        "gamma": gamma,
        **extra,
    }
    if calibrated:
        diagnostics["noise_var"] = post.calibration.noise_var
    train_s = map_s + (tracker.seconds if name == "l2m_fisher_calibrated" else 0.0)  # the tracker's overhead
    return MethodRun(samples, train_s=train_s, posthoc_s=t_post.s, predict_s=t_pred.s, diagnostics=diagnostics)


def run_laplace(
    model: nn.Module, x: Tensor, y: Tensor, queries: Tensor, cfg: ToyConfig, map_s: float
) -> MethodRun | None:
    """laplace-torch's diagonal GGN Laplace around the MAP (one pass, marginal-likelihood prior precision, the
    known noise), its GLM predictive sampled at ``queries``; None when laplace-torch does not import."""
    try:
        from laplace import Laplace
    except Exception:  # noqa: BLE001 - any import failure: no row
        return None
    import copy

    net = copy.deepcopy(model)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=x.shape[0])
    with Timer() as t_post, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = Laplace(net, "regression", subset_of_weights="all", hessian_structure="diag", sigma_noise=NOISE_STD)
        la.fit(loader)
        la.optimize_prior_precision(method="marglik")
    with Timer() as t_pred, torch.no_grad():
        f_mu, f_var = la._glm_predictive_distribution(queries)
        g = torch.Generator().manual_seed(cfg.seed)
        z = torch.randn(cfg.samples, f_mu.shape[0], generator=g)
        samples = f_mu.reshape(1, -1) + z * f_var.reshape(-1).clamp(min=0).sqrt()
    prior = la.prior_precision
    return MethodRun(
        samples,
        train_s=map_s,
        posthoc_s=t_post.s,
        predict_s=t_pred.s,
        diagnostics={"prior_precision": float(prior.mean() if isinstance(prior, Tensor) else prior)},
    )
