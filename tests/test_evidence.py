"""The evidence-maximising prior precision (explicit mode) and the prior mean."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import train_toy

from l2m_fast import L2MPosterior
from l2m_fast.evidence import fit_prior_precision, log_evidence


def _problem(seed: int = 0, p: int = 2000) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = torch.rand(p, generator=g, dtype=torch.float64) * 50
    h[: p // 3] = 0.0  # weights the data say nothing about
    d2 = torch.rand(p, generator=g, dtype=torch.float64) * 0.2
    return h, d2


def test_the_fit_is_the_fixed_point_and_maximises_the_evidence() -> None:
    h, d2 = _problem()
    fit = fit_prior_precision([h], [d2], [0])
    delta = fit.prior_precision[0]
    gamma = float((h / (h + delta)).sum())
    assert fit.converged and fit.gamma[0] == pytest.approx(gamma, rel=1e-9)
    assert delta == pytest.approx(gamma / float(d2.sum()), rel=1e-8)  # delta = gamma / |theta - mu0|^2
    grid = torch.logspace(-3, 3, 4001, dtype=torch.float64) * delta
    best = grid[int(torch.tensor([log_evidence(h, d2, float(x)) for x in grid]).argmax())]
    assert float(best) == pytest.approx(delta, rel=2e-3)
    assert 0 < fit.gamma[0] < 2000 * 2 / 3  # at most the weights with curvature


def test_per_group_fits_each_group_alone() -> None:
    (h1, d1), (h2, d2) = _problem(1, 500), _problem(2, 300)
    d2 = d2 * 10
    fit = fit_prior_precision([h1, h2], [d1, d2], [0, 1], per_group=True)
    alone = [fit_prior_precision([h], [d], [0]).prior_precision[0] for h, d in ((h1, d1), (h2, d2))]
    assert fit.prior_precision[0] == pytest.approx(alone[0], rel=1e-8)
    assert fit.prior_precision[1] == pytest.approx(alone[1], rel=1e-8)
    shared = fit_prior_precision([h1, h2], [d1, d2], [0, 1])
    assert shared.prior_precision[0] == shared.prior_precision[1]
    assert shared.total_gamma == pytest.approx(sum(shared.gamma.values()))
    with pytest.raises(ValueError, match="equals the prior mean"):
        fit_prior_precision([h1], [torch.zeros_like(d1)], [0])


def test_explicit_mode_with_the_evidence_prior() -> None:
    toy = train_toy(steps=20)
    n, b = 32, 32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a 20-step toy may have little curvature
        post = L2MPosterior.from_optimizer(
            toy.model, toy.optimizer, mode="explicit", num_data=n, batch_size=b, prior_precision="evidence"
        )
    fit = post.evidence
    delta = fit.prior_precision[0]
    opt = toy.optimizer
    v_hat = []
    for p in toy.model.parameters():
        st = opt.state[p]
        v_hat.append((st["exp_avg_sq"] / (1 - opt.param_groups[0]["betas"][1] ** float(st["step"]))).reshape(-1))
    h = n * b * torch.cat(v_hat).double()
    theta = torch.cat([p.detach().reshape(-1) for p in toy.model.parameters()]).double()
    assert delta == pytest.approx(float((h / (h + delta)).sum()) / float(theta.square().sum()), rel=1e-6)
    torch.testing.assert_close(post.variance().double(), 1.0 / (h + delta), rtol=1e-5, atol=0)
    # a prior mean near theta: smaller deviations, a stronger prior
    near = {name: p.detach() + 0.01 for name, p in toy.model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        tight = L2MPosterior.from_optimizer(
            toy.model, toy.optimizer, mode="explicit", num_data=n, batch_size=b, prior_precision="evidence",
            prior_mean=near,
        )
    assert tight.evidence.prior_precision[0] > 10 * delta
    assert torch.equal(tight.theta, post.theta)  # the posterior mean stays theta


def test_vanished_curvature_warns_and_says_what_to_do() -> None:
    toy = train_toy(steps=5)
    for st in toy.optimizer.state.values():
        st["exp_avg_sq"].mul_(1e-12)  # an empirical Fisher that has all but vanished
    with pytest.warns(RuntimeWarning, match="FisherTracker.*calibrate"):
        post = L2MPosterior.from_optimizer(
            toy.model, toy.optimizer, mode="explicit", num_data=32, batch_size=32, prior_precision="evidence"
        )
    assert post.evidence.total_gamma < 0.01 * post.num_params


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(prior_precision="evidnce"), ValueError, "prior_precision must be"),
        (dict(prior_precision="evidence", prior_mean={"0.weight": torch.zeros(6, 2)}), KeyError, "prior_mean has no"),
        (dict(prior_precision=1.0, prior_mean={}), TypeError, "prior_mean is used by"),
        (dict(prior_precision=float("inf")), ValueError, "finite number"),
    ],
)
def test_bad_evidence_options(kwargs, exc, match) -> None:
    toy = train_toy()
    with pytest.raises(exc, match=match):
        L2MPosterior.from_optimizer(toy.model, toy.optimizer, mode="explicit", num_data=32, batch_size=32, **kwargs)


def test_prior_mean_shape_is_checked() -> None:
    toy = train_toy()
    bad = {n: torch.zeros(1) for n, _ in toy.model.named_parameters()}
    with pytest.raises(ValueError, match=r"prior_mean\['0.weight'\] has shape"):
        L2MPosterior.from_optimizer(
            toy.model, toy.optimizer, mode="explicit", num_data=32, batch_size=32, prior_precision="evidence",
            prior_mean=bad,
        )
