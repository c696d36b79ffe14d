"""Ensembles of L2M posteriors: the mixture predictive."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from l2m_fast import L2MEnsemble, L2MPosterior
from l2m_fast.ensemble import member_seed


def _member(seed: int, out: int = 2, head: bool = False) -> tuple[nn.Module, L2MPosterior]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 12), nn.ReLU(), nn.Linear(12, out))
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(seed)
    post = L2MPosterior(params, {n: torch.rand(p.shape, generator=g) for n, p in params.items()}, a=1.0, b=20.0)
    return model, post


X = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))


def test_single_member_is_its_predictive() -> None:
    model, post = _member(0)
    ens = L2MEnsemble([(model, post)])
    got = ens.predict(X, num_samples=20, seed=3, progress=False)
    ref = post.predict(model, X, num_samples=20, seed=member_seed(3, 0), progress=False)
    for f in ("mean", "var", "epistemic_var"):
        torch.testing.assert_close(getattr(got, f), getattr(ref, f), rtol=1e-6, atol=1e-7)


def test_regression_mixture_equals_pooled_samples() -> None:
    members = [_member(k) for k in range(3)]
    w = [1.0, 2.0, 1.0]
    ens = L2MEnsemble(members, weights=w)
    got = ens.predict(X, num_samples=16, seed=1, keep_samples=True, progress=False)
    samples = got.samples.double().view(3, 16, 6, 2)
    wk = torch.tensor(w, dtype=torch.float64).div(sum(w)).view(3, 1, 1, 1)
    mean = (wk * samples.mean(1, keepdim=True)).sum(0)[0]
    second = (wk * samples.square().mean(1, keepdim=True)).sum(0)[0]
    torch.testing.assert_close(got.mean, mean.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.var, (second - mean.square()).float(), rtol=1e-4, atol=1e-6)
    assert got.num_samples == 48 and got.samples.shape == (48, 6, 2)


def test_members_draw_different_noise() -> None:
    model, post = _member(0)
    ens = L2MEnsemble([(model, post), (model, post)])
    got = ens.predict(X, num_samples=8, seed=0, keep_samples=True, progress=False)
    assert not torch.equal(got.samples[:8], got.samples[8:])


def test_classification_mixture() -> None:
    members = [_member(k, out=4) for k in range(2)]
    ens = L2MEnsemble(members)
    got = ens.predict(X, num_samples=10, seed=2, task="classification", keep_samples=True, progress=False)
    p = got.samples.double()
    probs = p.mean(0)
    entropy = -(probs * probs.log()).sum(-1)
    expected = -(p * p.log()).sum(-1).mean(0)
    torch.testing.assert_close(got.probs, probs.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.entropy, entropy.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.mutual_info, (entropy - expected).clamp(min=0).float(), rtol=1e-4, atol=1e-6)


def test_gaussian_heads_mix_aleatoric() -> None:
    class Head(nn.Module):
        def __init__(self, seed: int) -> None:
            super().__init__()
            torch.manual_seed(seed)
            self.lin = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.lin(x)
            return y[:, :1], y[:, 1:].exp()

    members = []
    for k in range(2):
        m = Head(k)
        params = dict(m.named_parameters())
        members.append((m, L2MPosterior(params, {n: torch.ones_like(p) for n, p in params.items()}, b=9.0)))
    got = L2MEnsemble(members).predict(X, num_samples=12, seed=0, progress=False)
    parts = [post.predict(m, X, 12, member_seed(0, k), progress=False) for k, (m, post) in enumerate(members)]
    torch.testing.assert_close(got.aleatoric_var, (parts[0].aleatoric_var + parts[1].aleatoric_var) / 2)
    torch.testing.assert_close(got.var, got.epistemic_var + got.aleatoric_var, rtol=1e-5, atol=1e-7)


def test_bad_ensembles() -> None:
    with pytest.raises(ValueError, match="at least one"):
        L2MEnsemble([])
    with pytest.raises(ValueError, match="weights"):
        L2MEnsemble([_member(0)], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="non-negative"):
        L2MEnsemble([_member(0), _member(1)], weights=[1.0, -1.0])
