"""The text client's figures: a reliability diagram and the in/out-of-distribution entropy histograms."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..metrics import entropy

__all__ = ["reliability_diagram", "entropy_histograms"]


def _plt():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path, title: str) -> Path:  # noqa: ANN001
    """Titles, lays out, writes and closes ``fig``; returns ``path``."""
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def reliability_diagram(
    preds: Mapping[str, Tensor], labels: Tensor, path: Path, bins: int = 15, title: str = ""
) -> Path:
    """Accuracy against confidence in ``bins`` equal-width bins, one panel per method (the ECE's bins).

    Args:
        preds: method -> (N, C) predictive probabilities on the test set.
        labels: (N,) labels.
        path: the PNG to write.
        bins: confidence bins on (0, 1]. Default 15.
        title: the figure's title.

    Returns:
        ``path``.
    """
    plt = _plt()
    names = list(preds)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), squeeze=False, sharey=True)
    edges = torch.linspace(0, 1, bins + 1)
    for ax, name in zip(axes[0], names):
        conf, pred = preds[name].double().max(1)
        correct = (pred == labels).double()
        idx = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
        acc = [float(correct[idx == b].mean()) if bool((idx == b).any()) else float("nan") for b in range(bins)]
        count = [int((idx == b).sum()) for b in range(bins)]
        centers = ((edges[:-1] + edges[1:]) / 2).tolist()
        ax.bar(centers, acc, width=1.0 / bins, edgecolor="k", lw=0.5, color="tab:blue", alpha=0.8, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        for c, a, k in zip(centers, acc, count):
            if k and a == a:
                ax.text(c, min(a, 0.95) + 0.02, str(k), ha="center", fontsize=5, rotation=90)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.05)
        ax.set_title(name, fontsize=7)
        ax.set_xlabel("confidence", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("accuracy", fontsize=8)
    return _save(plt, fig, path, title)


def entropy_histograms(
    preds: Mapping[str, tuple[Tensor, Tensor]], path: Path, title: str = "", bins: int = 30
) -> Path:
    """Histograms of the predictive entropy on in-distribution test and out-of-distribution articles.

    Args:
        preds: method -> ((N, C) test probabilities, (M, C) OOD probabilities).
        path: the PNG to write.
        title: the figure's title.
        bins: histogram bins on [0, log C].

    Returns:
        ``path``.
    """
    plt = _plt()
    names = list(preds)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.0), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], names):
        p_in, p_out = preds[name]
        top = float(torch.log(torch.tensor(float(p_in.shape[1]))))
        h_in, h_out = entropy(p_in).numpy(), entropy(p_out).numpy()
        ax.hist(h_in, bins=bins, range=(0, top), alpha=0.6, density=True, label="test (in)", color="tab:blue")
        ax.hist(h_out, bins=bins, range=(0, top), alpha=0.6, density=True, label="tech (OOD)", color="tab:red")
        ax.set_title(name, fontsize=7)
        ax.set_xlabel("predictive entropy (nats)", fontsize=8)
        ax.set_yscale("log")
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("density (log)", fontsize=8)
    axes[0][0].legend(fontsize=7)
    return _save(plt, fig, path, title)
