"""The toy-regression comparison (the paper's Figure 1): run the methods, score them, draw the figure.

Every method predicts ``f(x)`` samples at the same queries: a grid on [-6, 6] for the figure and the
spread outside the data, and fresh draws inside [-4, 4] for the scores. The predictive of every
method is Gaussian with the method's mean and the variance of its samples (epistemic) plus the known
noise variance ``3^2`` (the calibrated L2M rows: plus the noise variance they fitted on validation
draws); NLL and interval coverage use that total variance, the figure's bands the epistemic standard
deviation alone (as in the paper's figure).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .common import MethodRun, Timer
from .l2m_method import L2M_ROWS
from .metrics import coverage, gaussian_nll
from .toy import NOISE_STD, ToyConfig, fresh_draws, grid, mlp, toy_data, train_map

__all__ = ["METHODS", "LABELS", "parse_methods", "run_regression", "RegressionResult", "score", "l2m_notes"]

METHODS = ("rpf", "mc_dropout", "ensemble", "swag", "hmc", *L2M_ROWS, "laplace_diag")
LABELS = {
    "rpf": "Randomized prior functions",
    "mc_dropout": "MC dropout",
    "ensemble": "Deep ensemble",
    "swag": "SWAG-diagonal",
    "hmc": "HMC",
    "l2m_paper": "L2M (paper mode)",
    "l2m_explicit": "L2M (explicit mode)",
    "l2m_paper_calibrated": "L2M (paper mode, sampled + calibrated)",
    "l2m_explicit_calibrated": "L2M (explicit mode, linearized + calibrated)",
    "l2m_fisher_calibrated": "L2M (tracked Fisher, evidence prior, linearized + calibrated)",
    "l2m_fisher_pass_calibrated": "L2M (Fisher from passes, evidence prior, linearized + calibrated)",
    "laplace_diag": "laplace-torch diag GGN (marglik prior, GLM)",
}


def parse_methods(spec: str) -> list[str]:
    """``"all"`` or a comma list; ``l2m`` means every L2M row. Returns names in :data:`METHODS` order."""
    if spec.strip() == "all":
        return list(METHODS)
    wanted: set[str] = set()
    for w in (s.strip() for s in spec.split(",") if s.strip()):
        if w == "l2m":
            wanted |= set(L2M_ROWS)
        elif w in METHODS:
            wanted.add(w)
        else:
            raise ValueError(f"unknown method {w!r}; choose from {', '.join(METHODS)}, l2m or all")
    return [m for m in METHODS if m in wanted]


@dataclass
class RegressionResult:
    """Everything the figure and the tables need.

    Attributes:
        x, y: (N, 1) training data. grid: (G,) figure inputs. test_x, test_y: (T,) fresh draws.
        runs: method -> its :class:`MethodRun` (samples (S, G + T)).
        map_train_s: wall time of the shared MAP training (L2M and SWAG start from it).
    """

    x: Tensor
    y: Tensor
    grid: Tensor
    test_x: Tensor
    test_y: Tensor
    runs: dict[str, MethodRun]
    map_train_s: float


def run_regression(
    methods: Sequence[str], cfg: ToyConfig, *, bar: Callable[[str, int], object] | None = None
) -> RegressionResult:
    """Trains and samples each method on the embedded toy data.

    Args:
        methods: names from :data:`METHODS`.
        cfg: the budget (defaults: the paper's).
        bar: ``bar(description, total)`` returning a tqdm-like object, or None for no progress.
    """
    from .baselines.ensemble import run_ensemble
    from .baselines.hmc import run_hmc
    from .baselines.mc_dropout import run_mc_dropout
    from .baselines.rpf import run_rpf
    from .baselines.swag import run_swag
    from .l2m_method import fisher_tracker, run_l2m, run_laplace

    x, y = toy_data()
    g = grid()
    tx, ty = fresh_draws()
    queries = torch.cat([g, tx])
    mk = (lambda d, n: bar(d, n)) if bar is not None else (lambda d, n: None)

    def close(b: object) -> None:
        if b is not None:
            b.close()  # type: ignore[attr-defined]

    runs: dict[str, MethodRun] = {}
    map_model, map_opt, map_s, tracker = None, None, 0.0, None
    if any(m in ("swag", "hmc", "laplace_diag") or m.startswith("l2m") for m in methods):
        torch.manual_seed(cfg.seed)
        map_model = mlp(cfg.hidden)
        tracker = fisher_tracker(map_model, cfg)  # tracks the last steps; the training is unchanged
        b = mk("MAP (AdamW)", cfg.epochs)
        with Timer() as t:
            map_opt = train_map(map_model, x, y, cfg, progress=b, tracker=tracker)
        close(b)
        map_s = t.s - tracker.seconds  # the MAP's own training; the tracker's share goes to the Fisher row
    for name in methods:
        if name == "rpf":
            b = mk(LABELS[name], cfg.epochs * cfg.ensemble_size)
            runs[name] = run_rpf(x, y, queries, cfg, progress=b)
        elif name == "mc_dropout":
            b = mk(LABELS[name], cfg.epochs)
            runs[name] = run_mc_dropout(x, y, queries, cfg, progress=b)
        elif name == "ensemble":
            b = mk(LABELS[name], cfg.epochs * cfg.ensemble_size)
            runs[name] = run_ensemble(x, y, queries, cfg, progress=b)
        elif name == "swag":
            epochs = max(10, cfg.epochs // 5)
            b = mk(LABELS[name], epochs)
            runs[name] = run_swag(map_model, x, y, queries, cfg, swa_epochs=epochs, train_s=map_s, progress=b)
        elif name == "hmc":
            b = mk(LABELS[name], cfg.hmc_burn + cfg.hmc_samples)
            runs[name] = run_hmc(map_model, x, y, queries, cfg, progress=b)
        elif name == "laplace_diag":
            b = None
            run = run_laplace(map_model, x, y, queries, cfg, map_s)
            if run is not None:
                runs[name] = run
        else:
            b = mk(LABELS[name], cfg.samples)
            runs[name] = run_l2m(name, map_model, map_opt, tracker, x, queries, cfg, map_s)
            if b is not None:
                b.update(cfg.samples)  # type: ignore[attr-defined]
        close(b)
    return RegressionResult(x, y, g.squeeze(1), tx.squeeze(1), ty.squeeze(1), runs, map_s)


def score(res: RegressionResult) -> list[dict[str, object]]:
    """One row per method: test NLL, 1/2/3-sigma coverage, spread inside and outside the data, times.

    ``std_out`` is the mean epistemic sd on the grid points outside the data ([-6, -4) and (4, 6]),
    ``out/HMC`` that divided by HMC's (blank without HMC); ``std_in`` the mean epistemic sd at the
    test points. NLL and coverage use the total variance, epistemic + ``NOISE_STD^2`` (the calibrated L2M
    rows: + their own noise variance, fitted on validation draws).
    """
    ng = res.grid.numel()
    outside = res.grid.abs() > 4.0
    rows = []
    ref = None
    if "hmc" in res.runs:
        ref = float(res.runs["hmc"].samples[:, :ng].double().var(0, unbiased=False).sqrt()[outside].mean())
    for name, run in res.runs.items():
        s = run.samples.double()
        mean = s.mean(0)
        epi = s.var(0, unbiased=False) if s.shape[0] > 1 else torch.zeros_like(mean)
        tm, tv = mean[ng:], epi[ng:] + run.diagnostics.get("noise_var", NOISE_STD**2)
        std_out = float(epi[:ng].sqrt()[outside].mean())
        rows.append(
            {
                "method": LABELS[name],
                "nll": gaussian_nll(res.test_y, tm, tv),
                "cov1": coverage(res.test_y, tm, tv.sqrt(), 1.0),
                "cov2": coverage(res.test_y, tm, tv.sqrt(), 2.0),
                "cov3": coverage(res.test_y, tm, tv.sqrt(), 3.0),
                "std_in": float(epi[ng:].sqrt().mean()),
                "std_out": std_out,
                "out_vs_hmc": std_out / ref if ref else math.nan,
                "samples": s.shape[0],
                "train_s": run.train_s,
                "posthoc_s": run.posthoc_s,
                "predict_s": run.predict_s,
            }
        )
    return rows


def l2m_notes(res: RegressionResult) -> list[str]:
    """One line per L2M (and laplace-torch) row: what its calibration, evidence and Fisher found."""
    keys = (
        ("temperature", "temperature {:.4g}"),
        ("noise_var", "noise variance {:.4g}"),
        ("gamma", "evidence gamma {:.4g}"),
        ("tracked_steps", "{:.0f} tracked steps"),
        ("fisher_passes", "{:.0f} passes"),
        ("prior_precision", "prior precision {:.4g}"),
    )
    lines = []
    for name, run in res.runs.items():
        if not name.startswith(("l2m", "laplace")):
            continue
        d = run.diagnostics
        parts = [fmt.format(d[k]) for k, fmt in keys if k in d and not math.isnan(d[k])]
        if parts:
            lines.append(f"{LABELS[name]}: " + ", ".join(parts))
    return lines
