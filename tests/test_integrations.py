"""Integrations: other libraries' diagonal posteriors sampled by our op match the peers' own samples.

Each peer is optional: its tests skip when the package is absent (CI installs them, see the report in
benchmarks/RESULTS.md for the commands). Moment checks compare, per element, our samples with the
peer's own sampler: a two-sided Welch z-test on the means and an F-test on the variances, Bonferroni
over all 2P tests at a total false-alarm rate of 1e-3 per check (seeds are fixed, so a run is
reproducible; the rate says how unlikely a failure of a correct implementation is for a fresh seed).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

N = 3000
ALPHA = 1e-3


def _two_sample_check(ours: torch.Tensor, theirs: torch.Tensor, alpha: float = ALPHA) -> None:
    stats = pytest.importorskip("scipy.stats")
    ours, theirs = ours.double(), theirs.double()
    n1, n2 = ours.shape[0], theirs.shape[0]
    p = ours.shape[1]
    m1, m2 = ours.mean(0), theirs.mean(0)
    v1, v2 = ours.var(0), theirs.var(0)
    tail = alpha / (4 * p)  # two-sided, 2P tests
    z = (m1 - m2) / torch.sqrt(v1 / n1 + v2 / n2)
    zc = float(stats.norm.isf(tail))
    assert float(z.abs().max()) < zc, f"means differ: max |z| {float(z.abs().max()):.2f} >= {zc:.2f}"
    f = v1 / v2
    hi = float(stats.f.isf(tail, n1 - 1, n2 - 1))
    lo = float(stats.f.ppf(tail, n1 - 1, n2 - 1))
    assert lo < float(f.min()) and float(f.max()) < hi, f"variances differ: F in [{float(f.min())}, {float(f.max())}]"


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1))


def _data(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, generator=g)
    return x, torch.sin(x[:, :1]) + 0.1 * torch.randn(n, 1, generator=g)


# ------------------------------------------------------------------------------------------ laplace-torch


def test_laplace_diag_matches_la_sample() -> None:
    laplace = pytest.importorskip("laplace")
    from torch.utils.data import DataLoader, TensorDataset

    from l2m_fast.integrations.laplace_torch import from_laplace

    model = _model()
    model[0].bias.requires_grad_(False)  # a subset of weights: laplace-torch covers what requires grad
    x, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = laplace.Laplace(model, "regression", subset_of_weights="all", hessian_structure="diag")
        la.fit(DataLoader(TensorDataset(x, y), batch_size=16))
    la.prior_precision = torch.tensor([0.5, 2.0, 3.0])  # per layer, so the precision is not uniform
    post = from_laplace(la)
    assert post.layout.names == ("0.weight", "2.weight", "2.bias")
    torch.testing.assert_close(post.variance(), la.posterior_variance.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(post.theta, la.mean.float())
    ours = post.sample(N, seed=0).flat
    theirs = la.sample(N, generator=torch.Generator().manual_seed(0))
    _two_sample_check(ours, theirs)


def test_laplace_rejects_other_structures() -> None:
    laplace = pytest.importorskip("laplace")
    from l2m_fast.integrations.laplace_torch import from_laplace

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = laplace.Laplace(_model(), "regression", subset_of_weights="all", hessian_structure="kron")
    with pytest.raises(TypeError, match="DiagLaplace"):
        from_laplace(la)


def test_to_laplace_gives_laplace_torch_our_posterior_and_its_predictives_agree() -> None:
    laplace = pytest.importorskip("laplace")
    from torch.utils.data import DataLoader, TensorDataset

    from l2m_fast import L2MPosterior

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(64, 2)
    y = torch.randint(0, 3, (64,))
    model[0].weight.requires_grad_(False)  # a subset: the posterior covers what requires grad
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = laplace.Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag")
        la.fit(DataLoader(TensorDataset(x, y), batch_size=32))
    la.prior_precision = torch.tensor([0.5, 2.0, 3.0])
    from l2m_fast.integrations.laplace_torch import from_laplace

    ours = from_laplace(la).scaled(0.5)  # an L2M posterior (half laplace-torch's variance) ...
    exported = ours.to_laplace(model, "classification", n_outputs=3)  # ... as a DiagLaplace, no fit
    torch.testing.assert_close(exported.posterior_variance.float(), ours.variance(), rtol=1e-6, atol=0)
    torch.testing.assert_close(exported.mean.float(), ours.theta)
    la.prior_precision = la.prior_precision * 2.0  # the same distribution, fitted by laplace-torch itself
    la.H = la.H * 2.0
    xq = torch.randn(9, 2)
    for link in ("probit", "bridge"):
        want = la(xq, pred_type="glm", link_approx=link)
        torch.testing.assert_close(exported(xq, pred_type="glm", link_approx=link), want, rtol=1e-5, atol=1e-6)
    subset = L2MPosterior({"2.bias": model[2].bias}, {"2.bias": torch.ones(3)}, b=1.0)
    with pytest.raises(ValueError, match="requires_grad_"):
        subset.to_laplace(model, "classification", n_outputs=3)


# ------------------------------------------------------------------------------------------------- IVON


def _ivon_trained() -> tuple[nn.Module, object]:
    ivon = pytest.importorskip("ivon")
    model = _model(1)
    # two groups, listed out of model order, with their own ess and weight decay
    opt = ivon.IVON(
        [
            {"params": list(model[2].parameters()), "weight_decay": 1e-2, "ess": 80.0},
            {"params": list(model[0].parameters()), "weight_decay": 1e-3, "ess": 200.0},
        ],
        lr=0.05,
        ess=100.0,
    )
    x, y = _data()
    for _ in range(2):
        with opt.sampled_params(train=True):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    g = torch.Generator().manual_seed(2)
    for group in opt.param_groups:  # a spread-out Hessian, as after a long training
        group["hess"].copy_(torch.rand(group["hess"].shape, generator=g) * 5 + 0.01)
    return model, opt


def test_ivon_matches_sampled_params() -> None:
    model, opt = _ivon_trained()
    from l2m_fast.integrations.ivon_opt import from_ivon

    post = from_ivon(model, opt)
    assert post.layout.names == ("0.weight", "0.bias", "2.weight", "2.bias")
    # group 0 holds model[2] (2.weight: 6, 2.bias: 1), group 1 model[0] (0.weight: 12, 0.bias: 6)
    var = post.layout.views(post.variance())
    torch.testing.assert_close(var["2.weight"].reshape(-1), 1.0 / (80.0 * (opt.param_groups[0]["hess"][:6] + 1e-2)))
    torch.testing.assert_close(var["2.bias"].reshape(-1), 1.0 / (80.0 * (opt.param_groups[0]["hess"][6:] + 1e-2)))
    torch.testing.assert_close(var["0.weight"].reshape(-1), 1.0 / (200.0 * (opt.param_groups[1]["hess"][:12] + 1e-3)))
    ours = post.sample(N, seed=1).flat
    theirs = []
    torch.manual_seed(3)
    for _ in range(N):
        with opt.sampled_params():
            theirs.append(parameters_to_vector(model.parameters()).detach().clone())
    _two_sample_check(ours, torch.stack(theirs))
    pred = post.predict(model, _data(5)[0], num_samples=8, seed=0, progress=False)
    assert pred.mean.shape == (5, 1)


def test_ivon_rejects_other_optimizers() -> None:
    pytest.importorskip("ivon")
    from l2m_fast.integrations.ivon_opt import from_ivon

    model = _model()
    with pytest.raises(TypeError, match="IVON"):
        from_ivon(model, torch.optim.Adam(model.parameters()))


# ------------------------------------------------------------------------------------------- posteriors


def _log_post(model: nn.Module):  # noqa: ANN202
    def log_post(params: dict, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        xb, yb = batch
        out = torch.func.functional_call(model, params, (xb,))
        return -((out - yb) ** 2).sum(), out

    return log_post


def test_posteriors_diag_fisher_matches_its_sample() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        posteriors = pytest.importorskip("posteriors")
    from l2m_fast.integrations.posteriors import from_posteriors_state

    model = _model(2)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr = posteriors.laplace.diag_fisher.build(_log_post(model), init_prec_diag=1.0)
    state, _ = tr.update(tr.init(params), _data())
    post = from_posteriors_state(state, model)
    prec = torch.cat([state.prec_diag[n].reshape(-1) for n in post.layout.names])
    torch.testing.assert_close(post.variance(), 1.0 / prec, rtol=1e-6, atol=0)
    ours = post.sample(N, seed=2).flat
    torch.manual_seed(4)
    s = posteriors.laplace.diag_fisher.sample(state, (N,))
    theirs = torch.cat([s[n].reshape(N, -1) for n in post.layout.names], dim=1)
    _two_sample_check(ours, theirs)


def test_posteriors_vi_diag_matches_its_sample() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        posteriors = pytest.importorskip("posteriors")
    torchopt = pytest.importorskip("torchopt")
    from l2m_fast.integrations.posteriors import from_posteriors_state

    model = _model(3)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr = posteriors.vi.diag.build(_log_post(model), torchopt.adam(lr=1e-2))
    state = tr.init(params)
    g = torch.Generator().manual_seed(5)
    for t in state.log_sd_diag.values():
        t.data.copy_(torch.rand(t.shape, generator=g) * 2 - 3)
    post = from_posteriors_state(state)
    ours = post.sample(N, seed=3).flat
    torch.manual_seed(6)
    s = posteriors.vi.diag.sample(state, (N,))
    theirs = torch.cat([s[n].reshape(N, -1) for n in post.layout.names], dim=1)
    _two_sample_check(ours, theirs)


def test_integrations_are_not_imported_with_the_package() -> None:
    import subprocess
    import sys

    code = "import sys, l2m_fast; print(any(m.startswith('l2m_fast.integrations') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-1000:]
