"""The paper's toy regression (Section 5): data, network and MAP training shared by every method.

Twenty points ``x ~ U[-4, 4]``, ``y = x^3 + N(0, 3^2)`` (Ritter et al. 2018, as used in the L2M paper),
an MLP with two fully-connected hidden layers of 40 ReLU units, AdamW with decoupled weight decay 0.1,
learning rate 0.1, 5,000 full-batch epochs. The data are generated deterministically from a fixed seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "NOISE_STD",
    "TRAIN_SEED",
    "ToyConfig",
    "toy_data",
    "fresh_draws",
    "draw_toy",
    "grid",
    "mlp",
    "train_map",
]

NOISE_STD = 3.0
"""Standard deviation of the observation noise, known and used by every method's predictive."""

TRAIN_SEED = 20210101
X_RANGE = (-4.0, 4.0)


@dataclass
class ToyConfig:
    """Budget of the toy regression; the defaults are the paper's.

    Attributes:
        epochs: full-batch AdamW steps of every trained network.
        lr: AdamW learning rate.
        weight_decay: AdamW decoupled weight decay.
        samples: posterior/predictive samples per method.
        hidden: width of the two hidden layers.
        ensemble_size: members of the deep ensemble and of randomized prior functions.
        hmc_samples: kept HMC samples (after burn-in); thinned to ``samples`` for the predictive.
        hmc_burn: HMC burn-in iterations.
        seed: seed of initialisation and sampling.
    """

    epochs: int = 5000
    lr: float = 0.1
    weight_decay: float = 0.1
    samples: int = 500
    hidden: int = 40
    ensemble_size: int = 5
    hmc_samples: int = 3000
    hmc_burn: int = 1000
    seed: int = 0


def draw_toy(n: int, seed: int, low: float, high: float) -> tuple[Tensor, Tensor]:
    """``n`` points ``x ~ U[low, high]``, ``y = x^3 + N(0, 3^2)`` from ``seed`` (float64 draws).

    Returns:
        ``x`` (n, 1) and ``y`` (n, 1), float32.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g, dtype=torch.float64) * (high - low) + low
    y = x**3 + NOISE_STD * torch.randn(n, 1, generator=g, dtype=torch.float64)
    return x.float(), y.float()


def toy_data(n: int = 20) -> tuple[Tensor, Tensor]:
    """The training set, the same on every machine (float64 draws from a fixed seed).

    Returns:
        ``x`` (n, 1) and ``y`` (n, 1), float32.
    """
    return draw_toy(n, TRAIN_SEED, *X_RANGE)


def fresh_draws(n: int = 2000, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Test points from the data distribution (inside [-4, 4]), independent of the training set.

    Returns:
        ``x`` (n, 1) and ``y`` (n, 1), float32.
    """
    return draw_toy(n, TRAIN_SEED + 1 + seed, *X_RANGE)


def grid(n: int = 400, low: float = -6.0, high: float = 6.0) -> Tensor:
    """Evenly spaced inputs for the figure and the out-of-data spread: (n, 1)."""
    return torch.linspace(low, high, n).unsqueeze(1)


def mlp(hidden: int = 40, dropout: float = 0.0, in_features: int = 1, out_features: int = 1) -> nn.Sequential:
    """``in -> hidden -> hidden -> out`` with ReLU (and optional dropout after each hidden layer)."""
    layers: list[nn.Module] = [nn.Linear(in_features, hidden), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Linear(hidden, hidden), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, out_features))
    return nn.Sequential(*layers)


def train_map(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: ToyConfig,
    *,
    prior: nn.Module | None = None,
    prior_scale: float = 0.0,
    target: Tensor | None = None,
    progress: object | None = None,
    tracker: object | None = None,
) -> torch.optim.AdamW:
    """Full-batch AdamW on the mean squared error, the paper's training.

    Args:
        model: the network to train, in place.
        x: (N, 1) inputs.
        y: (N, 1) targets.
        cfg: epochs, lr and weight decay.
        prior: optional fixed network added as ``prior_scale * prior(x)`` (randomized prior functions).
        prior_scale: its scale.
        target: (N, 1) targets to fit instead of ``y`` (bootstrapped or perturbed targets).
        progress: optional tqdm bar, advanced once per epoch.
        tracker: optional :class:`~l2m_fast.fisher.FisherTracker`, updated with each step's outputs.

    Returns:
        The optimizer, holding Adam's second moment.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    tgt = y if target is None else target
    offset = torch.zeros_like(tgt)
    if prior is not None:
        with torch.no_grad():
            offset = prior_scale * prior(x)
    model.train()
    for _ in range(cfg.epochs):
        opt.zero_grad(set_to_none=True)
        out = model(x)
        if tracker is not None:
            tracker.update(out)  # type: ignore[attr-defined]
        loss = torch.mean((out + offset - tgt) ** 2)
        loss.backward()
        opt.step()
        if progress is not None:
            progress.update(1)  # type: ignore[attr-defined]
    model.eval()
    return opt
