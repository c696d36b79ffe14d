"""The linearized (GLM) predictive, the probit link, input chunks and the zero-temperature posterior."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_restored, mlp, posterior_with_random_v, snapshot
from torch import nn
from torch.func import functional_call, jacrev

from l2m_fast import L2MPosterior


def _explicit_linearized(post: L2MPosterior, model: nn.Module, x: torch.Tensor, s: int, seed: int) -> torch.Tensor:
    """f(x, theta) + J(x) (theta_s - theta) with the full Jacobian formed by reverse mode: (S, B, out)."""
    params = {n: p.detach() for n, p in post.parameters_of(model).items()}
    f = lambda p: functional_call(model, p, (x,))  # noqa: E731
    jac = jacrev(f)(params)  # name -> (B, out, *shape)
    f0 = f(params)
    rows = post.sample(s, seed).flat
    outs = []
    for row in rows:
        delta = {n: t - post.layout.views(post.theta)[n] for n, t in post.layout.views(row).items()}
        lin = f0.clone()
        for n, d in delta.items():
            lin = lin + (jac[n].reshape(*f0.shape, -1) @ d.reshape(-1))
        outs.append(lin)
    return torch.stack(outs)


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_linearized_outputs_are_f0_plus_jacobian_times_the_same_samples(method: str) -> None:
    model = mlp((3, 8, 2))
    post = posterior_with_random_v(model, b=20.0)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    snap = snapshot(model)
    pred = post.predict(model, x, 7, seed=3, linearized=True, keep_samples=True, method=method, progress=False)
    assert_restored(model, snap)
    want = _explicit_linearized(post, model, x, 7, 3)
    torch.testing.assert_close(pred.samples, want, rtol=1e-4, atol=1e-5)
    assert pred.linearized and pred.num_samples == 7
    torch.testing.assert_close(pred.mean, want.double().mean(0).float(), rtol=1e-4, atol=1e-5)


def test_a_model_linear_in_its_weights_is_its_own_linearization() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    post = posterior_with_random_v(model, b=0.5)
    x = torch.randn(6, 4)
    sampled = post.predict(model, x, 16, seed=1, keep_samples=True, progress=False)
    lin = post.predict(model, x, 16, seed=1, keep_samples=True, linearized=True, progress=False)
    torch.testing.assert_close(lin.samples, sampled.samples, rtol=1e-5, atol=1e-5)


def test_chunks_methods_and_input_chunks_do_not_change_the_result() -> None:
    model = mlp((3, 16, 16, 4), act=nn.ReLU)
    post = posterior_with_random_v(model, b=30.0)
    x = torch.randn(11, 3, generator=torch.Generator().manual_seed(5))
    ref = post.predict(model, x, 20, seed=2, linearized=True, task="classification", chunk_size=20, progress=False)
    for kwargs in (dict(chunk_size=3), dict(input_chunk=4), dict(method="loop", input_chunk=5, chunk_size=6)):
        got = post.predict(model, x, 20, seed=2, linearized=True, task="classification", progress=False, **kwargs)
        torch.testing.assert_close(got.probs, ref.probs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.mutual_info, ref.mutual_info, rtol=1e-4, atol=1e-6)


def test_input_chunks_of_the_sampled_predictive_match_one_call() -> None:
    model = mlp((3, 16, 2), act=nn.ReLU)
    post = posterior_with_random_v(model, b=10.0)
    x = torch.randn(23, 3, generator=torch.Generator().manual_seed(6))
    whole = post.predict(model, x, 9, seed=4, keep_samples=True, progress=False)
    for method in ("vmap", "loop"):
        split = post.predict(model, x, 9, seed=4, keep_samples=True, input_chunk=5, method=method, progress=False)
        torch.testing.assert_close(split.samples, whole.samples, rtol=1e-6, atol=1e-6)


def test_the_plan_splits_inputs_when_one_sample_over_the_batch_exceeds_the_budget() -> None:
    from l2m_fast import plan_predict

    model = mlp((32, 512, 512, 2), act=nn.ReLU)
    post = posterior_with_random_v(model, b=10.0)
    x = torch.randn(400, 32)
    small = plan_predict(post, model, x, 16, max_memory=2 << 20)
    assert 1 <= small.input_chunk < 400 and small.bytes_per_sample <= 2 << 20
    roomy = plan_predict(post, model, x, 16, max_memory=1 << 30)
    assert roomy.input_chunk == 400
    pred = post.predict(model, x, 4, seed=0, max_memory=2 << 20, keep_samples=True, progress=False)
    ref = post.predict(model, x, 4, seed=0, keep_samples=True, progress=False)
    # the same samples; float32 sums over 512 terms batched differently round differently
    torch.testing.assert_close(pred.samples, ref.samples, rtol=1e-4, atol=1e-4)


def test_last_layer_subset_and_a_gaussian_head() -> None:
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(1)
            self.body = nn.Sequential(nn.Linear(3, 8), nn.Tanh())
            self.mu = nn.Linear(8, 2)
            self.log_var = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.body(x)
            return self.mu(h), self.log_var(h).exp()

    model = Head()
    post = posterior_with_random_v(model, b=5.0, names=["mu.weight", "mu.bias", "log_var.weight"])
    x = torch.randn(4, 3)
    pred = post.predict(model, x, 12, seed=0, linearized=True, keep_samples=True, progress=False)
    with torch.no_grad():
        mu0, var0 = model(x)
    torch.testing.assert_close(pred.aleatoric_var, var0, rtol=1e-5, atol=1e-7)  # the MAP's variance
    assert torch.equal(pred.aleatoric_samples, var0.expand(12, *var0.shape))
    assert not torch.allclose(pred.samples[0], mu0)  # the mean moved with the samples


def test_probit_link_from_the_logits_mean_and_variance() -> None:
    model = mlp((3, 8, 4))
    post = posterior_with_random_v(model, b=5.0)
    x = torch.randn(6, 3)
    raw = post.predict(model, x, 30, seed=1, linearized=True, keep_samples=True, progress=False)  # logits kept
    pred = post.predict(model, x, 30, seed=1, linearized=True, task="classification", link="probit", progress=False)
    mu, var = raw.samples.double().mean(0), raw.samples.double().var(0, unbiased=False)
    want = torch.softmax(mu / torch.sqrt(1 + math.pi / 8 * var), -1)
    torch.testing.assert_close(pred.probs, want.float(), rtol=1e-5, atol=1e-6)
    assert pred.link == "probit"
    with pytest.raises(ValueError, match="classification.* only"):
        post.predict(model, x, 4, link="probit")
    with pytest.raises(ValueError, match="link must be one of"):
        post.predict(model, x, 4, task="classification", link="logit")


def test_logit_temperature_and_zero_temperature() -> None:
    model = mlp((3, 8, 4))
    post = posterior_with_random_v(model, b=5.0)
    x = torch.randn(6, 3)
    with torch.no_grad():
        f0 = model(x)
    cold = post.scaled(0.0, logit_temperature=2.0)
    assert cold.temperature == 0 and cold.logit_temperature == 2.0
    assert "temperature=0" in repr(cold) and "logit_temperature=2" in repr(cold)
    pred = cold.predict(model, x, 8, task="classification", progress=False)
    assert pred.method == "map"
    torch.testing.assert_close(pred.probs, torch.softmax(f0 / 2.0, -1), rtol=1e-6, atol=1e-7)
    assert float(pred.mutual_info.max()) <= 1e-6
    assert torch.equal(cold.sample(3, seed=1).flat, post.theta.expand(3, -1))
    assert torch.equal(cold.variance(), torch.zeros_like(post.theta))
    warm = post.scaled(4.0)
    torch.testing.assert_close(warm.variance(), 4.0 * post.variance(), rtol=1e-6, atol=0)
    z = (warm.sample(5, seed=3).flat - post.theta) / (post.sample(5, seed=3).flat - post.theta)
    torch.testing.assert_close(z, torch.full_like(z, 2.0), rtol=1e-3, atol=1e-3)  # sqrt(4) x the same noise
    with pytest.raises(ValueError, match="temperature"):
        post.scaled(-1.0)
    with pytest.raises(ValueError, match="logit_temperature"):
        post.scaled(1.0, logit_temperature=0.0)


def test_a_sharded_posterior_refuses_the_linearized_predictive() -> None:
    model = mlp((3, 4, 1))
    post = posterior_with_random_v(model)
    state = post.state_dict()
    state.update(is_sharded=True, global_numel=post.num_params + 5, runs=[[0, 5, post.num_params]])
    sharded = L2MPosterior.from_saved(state)
    assert sharded.is_sharded
    with pytest.raises(NotImplementedError, match="linearized predictive needs whole parameters"):
        sharded.predict(model, torch.randn(2, 3), 4, linearized=True)
