"""The batched posterior predictive: equal to a plain loop, chunk-invariant, within its memory budget."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import assert_restored, posterior_with_random_v, snapshot
from torch import nn
from torch.nn.utils import vector_to_parameters

from l2m_fast import L2MPosterior, plan_predict
from l2m_fast.predictive import ClassificationPrediction, RegressionPrediction

ROOT = Path(__file__).resolve().parents[1]


def _posterior(model: nn.Module, b: float = 50.0, names: list[str] | None = None, seed: int = 0) -> L2MPosterior:
    return posterior_with_random_v(model, b=b, names=names, seed=seed, scale=10.0)


def _toy(out: int = 1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, out))


class GaussianHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Sequential(nn.Linear(3, 16), nn.Tanh())
        self.mu = nn.Linear(16, 2)
        self.log_var = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.mu(h), self.log_var(h).exp()


def _loop_outputs(post: L2MPosterior, model: nn.Module, x: torch.Tensor, s: int, seed: int) -> list:
    """The plain Python loop: vector_to_parameters of each sample into a copy, one forward each."""
    flat = post.sample(s, seed).flat
    m = copy.deepcopy(model)
    named = dict(m.named_parameters())
    covered = [named[n] for n in post.layout.names]
    outs = []
    with torch.no_grad():
        for row in flat:
            vector_to_parameters(row, covered)
            outs.append(m(x))
    return outs


@pytest.mark.parametrize("method", ["auto", "vmap", "loop"])
def test_regression_equals_loop(method: str) -> None:
    model = _toy()
    post = _posterior(model)
    x = torch.linspace(-2, 2, 37).unsqueeze(1)
    snap = snapshot(model)
    pred = post.predict(model, x, num_samples=53, seed=11, method=method, chunk_size=8, progress=False)
    assert_restored(model, snap)
    ys = torch.stack(_loop_outputs(post, model, x, 53, 11)).double()
    assert isinstance(pred, RegressionPrediction)
    assert pred.mean.shape == (37, 1) and pred.var.shape == (37, 1)
    assert pred.aleatoric_var is None
    torch.testing.assert_close(pred.mean, ys.mean(0).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred.epistemic_var, ys.var(0, unbiased=False).float(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(pred.var, pred.epistemic_var)


def test_gaussian_head_aleatoric() -> None:
    model = GaussianHead()
    post = _posterior(model)
    x = torch.randn(9, 3, generator=torch.Generator().manual_seed(3))
    pred = post.predict(model, x, num_samples=30, seed=2, chunk_size=7, keep_samples=True, progress=False)
    outs = _loop_outputs(post, model, x, 30, 2)
    mu = torch.stack([o[0] for o in outs]).double()
    var = torch.stack([o[1] for o in outs]).double()
    torch.testing.assert_close(pred.mean, mu.mean(0).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred.aleatoric_var, var.mean(0).float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(pred.epistemic_var, mu.var(0, unbiased=False).float(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(pred.var, (var.mean(0) + mu.var(0, unbiased=False)).float(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(pred.samples, mu.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred.aleatoric_samples, var.float(), rtol=1e-5, atol=1e-6)


def test_output_fn_log_variance_head() -> None:
    model = _toy(out=2)
    post = _posterior(model)
    x = torch.randn(5, 1, generator=torch.Generator().manual_seed(4))

    def split(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return y[..., :1], y[..., 1:].exp()

    pred = post.predict(model, x, num_samples=12, seed=0, output_fn=split, method="vmap", progress=False)
    ys = torch.stack(_loop_outputs(post, model, x, 12, 0)).double()
    torch.testing.assert_close(pred.aleatoric_var, ys[..., 1:].exp().mean(0).float(), rtol=1e-5, atol=1e-7)
    assert pred.mean.shape == (5, 1)


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_classification_equals_loop(method: str) -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 20), nn.ReLU(), nn.Linear(20, 4))
    post = _posterior(model, b=4.0)
    x = torch.randn(17, 6)
    pred = post.predict(
        model, x, num_samples=41, seed=3, task="classification", method=method, chunk_size=6, progress=False
    )
    logits = torch.stack(_loop_outputs(post, model, x, 41, 3)).double()
    p = logits.softmax(-1)
    probs = p.mean(0)
    entropy = -(probs * probs.log()).sum(-1)
    expected = -(p * p.log()).sum(-1).mean(0)
    assert isinstance(pred, ClassificationPrediction)
    assert pred.probs.shape == (17, 4) and pred.entropy.shape == (17,) and pred.mutual_info.shape == (17,)
    torch.testing.assert_close(pred.probs, probs.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred.entropy, entropy.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred.expected_entropy, expected.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred.mutual_info, (entropy - expected).clamp(min=0).float(), rtol=1e-4, atol=1e-6)
    assert bool((pred.mutual_info >= 0).all())


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_chunk_size_does_not_change_results(task: str) -> None:
    model = _toy(out=3)
    post = _posterior(model)
    x = torch.randn(11, 1, generator=torch.Generator().manual_seed(6))
    preds = [
        post.predict(model, x, num_samples=40, seed=9, task=task, chunk_size=c, method=m, progress=False)
        for c, m in [(40, "vmap"), (1, "vmap"), (7, "vmap"), (13, "loop")]
    ]
    ref = preds[0]
    for p in preds[1:]:
        for f in ("mean", "var", "epistemic_var") if task == "regression" else ("probs", "entropy", "mutual_info"):
            torch.testing.assert_close(getattr(p, f), getattr(ref, f), rtol=2e-5, atol=1e-6)


def test_sample_offset_and_subset_posterior() -> None:
    model = _toy()
    post = _posterior(model, names=["2.weight", "4.bias"])
    x = torch.randn(4, 1)
    pred = post.predict(model, x, num_samples=10, seed=1, sample_offset=5, keep_samples=True, progress=False)
    ys = torch.stack(_loop_outputs(post, model, x, 15, 1))[5:]
    torch.testing.assert_close(pred.samples, ys, rtol=1e-5, atol=1e-6)


def test_loop_restores_weights_after_an_exception() -> None:
    class Flaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls == 4:
                raise RuntimeError("boom")
            return self.lin(x)

    model = Flaky()
    post = _posterior(model)
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        post.predict(model, torch.randn(2, 3), num_samples=10, seed=0, method="loop", chunk_size=3, progress=False)
    assert_restored(model, snap)


def test_vmap_falls_back_to_loop_with_a_warning() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.lin(x)
            return y * 2 if float(y.sum().item()) > 0 else y

    model = DataDependent()
    post = _posterior(model)
    x = torch.randn(3, 2)
    with pytest.warns(RuntimeWarning, match="loop"):
        pred = post.predict(model, x, num_samples=6, seed=0, progress=False)
    assert pred.method == "loop"
    ys = torch.stack(_loop_outputs(post, model, x, 6, 0)).double()
    torch.testing.assert_close(pred.mean, ys.mean(0).float(), rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError):
        post.predict(model, x, num_samples=6, seed=0, method="vmap", progress=False)
    # the loop that takes over sizes its chunk by the sample rows alone, not by vmap's working set
    budget = 4000
    vmap_plan = plan_predict(post, model, x, 200, method="vmap", max_memory=budget)
    loop_plan = plan_predict(post, model, x, 200, method="loop", max_memory=budget)
    assert vmap_plan.chunk_size < loop_plan.chunk_size
    with pytest.warns(RuntimeWarning, match="loop"):
        pred = post.predict(model, x, num_samples=200, seed=1, max_memory=budget, progress=False)
    assert pred.method == "loop" and pred.chunk_size == loop_plan.chunk_size
    ys = torch.stack(_loop_outputs(post, model, x, 200, 1)).double()
    torch.testing.assert_close(pred.mean, ys.mean(0).float(), rtol=1e-5, atol=1e-6)


def test_plan_rule() -> None:
    toy = _toy()
    plan = plan_predict(_posterior(toy), toy, torch.randn(200, 1), 500)
    assert plan.method == "vmap" and not plan.measured and plan.flops_per_sample == 2 * 200 * (40 + 1600 + 40)
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
    plan = plan_predict(_posterior(bn), bn, torch.randn(5, 3), 10)
    assert plan.method == "loop" and "running statistics" in plan.reason
    drop = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5)).train()
    assert plan_predict(_posterior(drop), drop, torch.randn(5, 3), 10).method == "loop"
    assert plan_predict(_posterior(drop), drop.eval(), torch.randn(5, 3), 10).method == "vmap"


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_auto_measures_vmap_against_loop_and_caches_the_choice(task: str) -> None:
    model = _toy(out=3, seed=2)
    post = _posterior(model)
    x = torch.randn(7, 1, generator=torch.Generator().manual_seed(8))
    kw = dict(num_samples=45, seed=4, task=task, chunk_size=12, progress=False)
    pred = post.predict(model, x, **kw)
    plan = plan_predict(post, model, x, 45, chunk_size=12)
    assert plan.measured and "measured" in plan.reason and plan.method == pred.method
    ref = post.predict(model, x, method="loop", **kw)
    again = post.predict(model, x, **kw)  # the cached choice, no trial
    for p in (pred, again):
        for f in ("mean", "var") if task == "regression" else ("probs", "entropy", "mutual_info"):
            torch.testing.assert_close(getattr(p, f), getattr(ref, f), rtol=2e-5, atol=1e-6)


def test_batchnorm_in_training_mode_is_evaluated_in_a_loop() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).train()
    post = _posterior(model, names=["0.weight", "2.weight"])
    x = torch.randn(8, 3)
    ref_model = copy.deepcopy(model)
    pred = post.predict(model, x, num_samples=5, seed=0, progress=False)
    assert pred.method == "loop"
    ys = torch.stack(_loop_outputs(post, ref_model, x, 5, 0)).double()
    torch.testing.assert_close(pred.mean, ys.mean(0).float(), rtol=1e-5, atol=1e-6)


def test_memory_budget_sets_the_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("l2m_fast.predictive.plan.CACHE_BYTES", 1 << 40)
    model = _toy()
    post = _posterior(model)
    x = torch.randn(200, 1)
    plan = plan_predict(post, model, x, 500, method="vmap", max_memory=1 << 20)
    assert plan.chunk_size == (1 << 20) // plan.bytes_per_sample
    # one sample's working set: its row, 200 x (40 + 40 + 40 + 40 + 1) op outputs, the input, the output
    assert plan.bytes_per_sample >= post.num_params * 4 + 200 * 161 * 4
    loop = plan_predict(post, model, x, 500, method="loop", max_memory=1 << 20)
    assert loop.bytes_per_sample == post.num_params * 4  # a loop holds only the chunk's sample rows
    # the inputs count once per chunk, shared by its samples
    assert loop.chunk_size == ((1 << 20) - 200 * 4) // (post.num_params * 4)
    # should the timing trial switch a vmap plan to a loop, its chunk is the loop's
    assert plan.loop_chunk_size == loop.chunk_size > plan.chunk_size
    assert plan_predict(post, model, x, 500, max_memory=1).chunk_size == 1


def test_cache_cap_sets_the_default_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _toy()
    post = _posterior(model)
    x = torch.randn(200, 1)
    monkeypatch.setattr("l2m_fast.predictive.plan.CACHE_BYTES", 1 << 20)
    plan = plan_predict(post, model, x, 500, method="vmap")
    assert 1 <= plan.chunk_size < 500
    assert plan.chunk_size == (1 << 20) // (plan.bytes_per_sample - post.num_params * 4 - 200 * 4 - 4 * 200 * 4)


_RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from torch import nn
    import l2m_fast.predictive.plan
    from l2m_fast import L2MPosterior
    l2m_fast.predictive.plan.CACHE_BYTES = 1 << 40  # the budget alone sets the chunk
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 1024), nn.ReLU(), nn.Linear(1024, 1))
    params = dict(model.named_parameters())
    post = L2MPosterior(params, {n: torch.rand_like(p) for n, p in params.items()}, a=1.0, b=10.0)
    x = torch.randn(4096, 1)
    kw = dict(num_samples=32, seed=0, method="vmap", progress=False)
    with torch.no_grad():
        model(x)
    post.predict(model, x, chunk_size=1, **kw)
    # peak RSS of this process's own memory map (VmHWM): getrusage's ru_maxrss also keeps the peak of
    # the parent at fork time, which hides everything here after a parent that once used more
    def rss():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    base = rss()
    budget = int(sys.argv[1])
    post.predict(model, x, max_memory=budget, **kw)
    chunked = rss() - base
    base = rss()
    post.predict(model, x, chunk_size=32, **kw)
    whole = rss() - base
    print(json.dumps({"chunked": chunked, "whole": whole}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc/self/status")
def test_memory_budget_holds_measured_peak_rss() -> None:
    """Peak RSS of a subprocess: a 96 MiB budget holds where the unchunked run needs about 1 GiB."""
    budget = 96 << 20
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(budget)], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    slack = 48 << 20  # allocator and thread-pool noise
    assert got["chunked"] <= budget + slack, got
    assert got["whole"] >= 6 * budget, got  # the measurement sees what an unchunked run costs


def test_bad_arguments() -> None:
    model = _toy()
    post = _posterior(model)
    x = torch.randn(2, 1)
    with pytest.raises(ValueError, match="task"):
        post.predict(model, x, num_samples=2, task="ranking", progress=False)
    with pytest.raises(ValueError, match="num_samples"):
        post.predict(model, x, num_samples=0, progress=False)
    with pytest.raises(ValueError, match="method"):
        post.predict(model, x, num_samples=2, method="jit", progress=False)
    with pytest.raises(ValueError, match="chunk_size"):
        post.predict(model, x, num_samples=2, chunk_size=0, progress=False)
    with pytest.raises(KeyError, match="no parameter"):
        post.predict(nn.Linear(1, 1), x, num_samples=2, progress=False)


class _Masked(nn.Module):
    """A classifier whose last class is masked out with a -inf logit."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.lin = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lin(x)
        return logits.masked_fill(torch.arange(4) == 3, float("-inf"))


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_masked_logits_give_finite_entropies(method: str) -> None:
    model = _Masked()
    post = _posterior(model)
    pred = post.predict(model, torch.randn(5, 3), 6, seed=1, task="classification", method=method, progress=False)
    for t in (pred.probs, pred.entropy, pred.expected_entropy, pred.mutual_info):
        assert bool(torch.isfinite(t).all())
    assert bool((pred.probs[:, 3] == 0).all())


def test_forced_loop_runs_no_extra_forward() -> None:
    """Batch norm in training mode is looped: its statistics are updated once per sample, no probe forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 1)).train()
    post = _posterior(model)
    for _ in range(2):
        before = int(model[1].num_batches_tracked)
        post.predict(model, torch.randn(16, 3), 4, seed=0, progress=False)
        assert int(model[1].num_batches_tracked) - before == 4


def test_plan_cache_is_bounded_per_model() -> None:
    from l2m_fast.predictive import plan as predictive

    model = _toy()
    post = _posterior(model)
    x = torch.randn(4, 1)
    for k in range(predictive._MAX_PLANS + 5):
        post.predict(model, x, 3, seed=0, output_fn=lambda y, k=k: y + k, progress=False)
    assert len(predictive._PLANS[model]) == predictive._MAX_PLANS
