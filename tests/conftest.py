"""Shared fixtures and helpers of the test suite.

* The sampling contract's known answers (Random123, Philox4x32-10), written down once: :data:`KNOWN_ANSWERS`.
* Small models and posteriors: :func:`toy_model` (fresh each test), :func:`trained_toy` (AdamW-trained a
  few steps, with its optimizer), :func:`toy_posterior` (its paper-mode posterior), and
  :func:`posterior_with_random_v` for a posterior over any model with a fixed random second moment.
* Exact-restore checks: :func:`snapshot` and :func:`assert_restored` (values bit for bit and storage).

Helpers are plain functions, imported by test modules with ``from conftest import ...``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from l2m_fast import L2MPosterior

KNOWN_ANSWERS: list[tuple[tuple[int, int], tuple[int, int, int, int], tuple[int, int, int, int]]] = [
    # (key (k0, k1), counter (c0, c1, c2, c3), words (r0, r1, r2, r3)): Random123's kat_vectors
    ((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 2, (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0xA4093822, 0x299F31D0),
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]
"""Philox4x32-10 known answers every backend must reproduce bit for bit."""

U64 = 1 << 64


def seed_of(key: tuple[int, int]) -> int:
    """The 64-bit seed whose Philox key is ``key`` (low word first)."""
    return key[0] | (key[1] << 32)


def signed(seed: int) -> int:
    """A 64-bit seed as the signed int64 the raw ops take (same bit pattern)."""
    return seed - U64 if seed >= 1 << 63 else seed


def mlp(sizes: tuple[int, ...] = (3, 7, 2), seed: int = 0, act: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    """A small MLP, seeded."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def posterior_with_random_v(
    model: nn.Module, b: float = 3.0, names: list[str] | None = None, seed: int = 1, scale: float = 1.0
) -> L2MPosterior:
    """``N(theta, 1 / (v + b))`` over the model's parameters (or ``names``), ``v ~ scale * U[0, 1)`` seeded."""
    g = torch.Generator().manual_seed(seed)
    params = {n: p for n, p in model.named_parameters() if names is None or n in names}
    v = {n: torch.rand(p.shape, generator=g) * scale for n, p in params.items()}
    return L2MPosterior(params, v, a=1.0, b=b)


def snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    """Every parameter's value (cloned) and storage address."""
    return {n: (p.detach().clone(), p.data_ptr()) for n, p in model.named_parameters()}


def assert_restored(model: nn.Module, snap: dict[str, tuple[torch.Tensor, int]]) -> None:
    """The parameters hold exactly what :func:`snapshot` saw, in the same storage."""
    for n, p in model.named_parameters():
        before, ptr = snap[n]
        assert p.data_ptr() == ptr, f"{n} was left bound to other storage"
        assert torch.equal(p.detach(), before), f"{n} was not restored bit for bit"


@dataclass
class TrainedToy:
    """A small regression MLP trained a few AdamW steps: the model, its optimizer and the data."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    y: torch.Tensor


def train_toy(steps: int = 5, weight_decay: float = 0.1, groups: bool = False) -> TrainedToy:
    """``2 -> 6 -> 1`` tanh MLP, AdamW (lr 1e-2), MSE on 32 seeded points; two groups when ``groups``."""
    model = mlp((2, 6, 1))
    if groups:
        params: object = [
            {"params": [model[0].weight, model[0].bias], "weight_decay": weight_decay},
            {"params": [model[2].weight, model[2].bias], "weight_decay": 2 * weight_decay, "eps": 1e-3},
        ]
    else:
        params = model.parameters()
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=weight_decay)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 2, generator=g), torch.randn(32, 1, generator=g)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return TrainedToy(model, opt, x, y)


@pytest.fixture
def toy_model() -> nn.Module:
    """A fresh ``3 -> 7 -> 2`` tanh MLP."""
    return mlp()


@pytest.fixture
def trained_toy() -> TrainedToy:
    """A freshly trained toy (see :func:`train_toy`)."""
    return train_toy()


@pytest.fixture
def toy_posterior(trained_toy: TrainedToy) -> L2MPosterior:
    """The paper-mode posterior of :func:`trained_toy`."""
    return L2MPosterior.from_optimizer(trained_toy.model, trained_toy.optimizer)
