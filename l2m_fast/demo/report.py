"""The six-panel figure of the toy regression (the paper's Figure 1 with its baselines)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from .regression import LABELS, RegressionResult

__all__ = ["draw_figure", "FIGURE_ORDER"]

FIGURE_ORDER = ("rpf", "mc_dropout", "ensemble", "swag", "hmc", "l2m_paper")
"""The paper's panel order; the sixth panel is L2M in paper mode."""


def _panel(ax, res: RegressionResult, name: str, ylim: float) -> None:  # noqa: ANN001
    ng = res.grid.numel()
    s = res.runs[name].samples[:, :ng].double()
    mean = s.mean(0).numpy()
    sd = (s.std(0, unbiased=False) if s.shape[0] > 1 else torch.zeros(ng, dtype=torch.float64)).numpy()
    gx = res.grid.numpy()
    for k, alpha in ((3, 0.2), (2, 0.3), (1, 0.45)):
        ax.fill_between(gx, mean - k * sd, mean + k * sd, color="tab:red", alpha=alpha, lw=0)
    ax.plot(gx, gx**3, color="0.5", lw=0.8, ls="--")
    ax.plot(gx, mean, color="k", lw=1.2)
    ax.scatter(res.x.squeeze(1).numpy(), res.y.squeeze(1).numpy(), marker="x", color="k", s=18, lw=1, zorder=3)
    ax.set_xlim(float(gx[0]), float(gx[-1]))
    ax.set_ylim(-ylim, ylim)
    ax.set_title(LABELS[name], fontsize=10)
    ax.tick_params(labelsize=8)


def draw_figure(res: RegressionResult, path: Path, order: Sequence[str] = FIGURE_ORDER, ylim: float = 160.0) -> Path:
    """Draws one panel per method that ran (paper order), bands at 1, 2, 3 epistemic sd; saves a PNG.

    Args:
        res: the regression runs.
        path: where to write the PNG.
        order: the panels, skipped where a method did not run.
        ylim: symmetric y range.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in order if n in res.runs]
    if not names:
        names = list(res.runs)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.2 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        _panel(ax, res, name, ylim)
    fig.suptitle("Toy regression y = x^3 + N(0, 3^2): mean (black), 1/2/3 sd of f(x) (red), x^3 (dashed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
