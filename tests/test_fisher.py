"""The sampled-label Fisher: tracked during training, from a partial pass, and as a posterior's curvature.

Statistical checks use fixed seeds. The estimator ``B g^2`` of one step has a relative spread of about
sqrt(2) per element; averaged over T steps and summed over elements its L1 relative error is about
1.1 / sqrt(T); the bounds below sit at more than 4 times that (false-alarm rate < 1e-4 per check).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from l2m_fast import L2MPosterior
from l2m_fast.fisher import FisherTracker, fisher_diag


def _logistic(seed: int = 0, b: int = 32, d: int = 5, c: int = 3) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Linear(d, c)
    return model, torch.randn(b, d)


def _exact_softmax_fisher(model: nn.Linear, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-example Fisher diagonal of a softmax-linear model, averaged over x: x_j^2 p_c (1 - p_c)."""
    with torch.no_grad():
        p = torch.softmax(model(x).double(), -1)
    q = p * (1 - p)  # (B, C)
    return {"weight": (q[:, :, None] * x.double()[:, None, :] ** 2).mean(0), "bias": q.mean(0)}


def _rel_l1(est: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> float:
    num = sum(float((est[n].double() - exact[n]).abs().sum()) for n in exact)
    return num / sum(float(exact[n].abs().sum()) for n in exact)


def test_tracked_fisher_is_unbiased_for_the_softmax_fisher() -> None:
    model, x = _logistic()
    tracker = FisherTracker(model, seed=0)
    steps = 4000
    for _ in range(steps):
        tracker.update(model(x))
    assert tracker.tracked == steps and tracker.examples == steps * 32
    err = _rel_l1(tracker.fisher(), _exact_softmax_fisher(model, x))
    assert err < 4.5 / math.sqrt(steps), err


def test_regression_fisher_is_x_squared_over_sigma_squared() -> None:
    torch.manual_seed(1)
    model = nn.Linear(4, 2)
    x = torch.randn(16, 4)
    sigma = 0.5
    tracker = FisherTracker(model, likelihood="regression", sigma=sigma, seed=1)
    steps = 3000
    for _ in range(steps):
        tracker.update(model(x))
    exact = {
        "weight": (x.double() ** 2).mean(0).expand(2, 4) / sigma**2,
        "bias": torch.full((2,), 1.0 / sigma**2, dtype=torch.float64),
    }
    assert _rel_l1(tracker.fisher(), exact) < 4.5 / math.sqrt(steps)


def test_it_does_not_vanish_where_the_empirical_fisher_does() -> None:
    """On a set with a margin, fitted to p ~ 1, the true-label gradients vanish; the sampled-label ones much less."""
    torch.manual_seed(2)
    x = torch.randn(200, 2)
    y = (x[:, 0] > 0).long()
    x[:, 0] += torch.where(y == 1, 1.0, -1.0)  # no point near the boundary
    model = nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(500):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    tracker = FisherTracker(model, seed=2)
    for _ in range(200):
        tracker.update(model(x))
    with torch.no_grad():  # the per-example empirical Fisher: true-label gradients (p - onehot(y)) x, squared
        r = torch.softmax(model(x), -1) - nn.functional.one_hot(y, 2)
    emp = (r[:, :, None] ** 2 * x[:, None, :] ** 2).mean(0)
    assert float(tracker.fisher()["weight"].sum()) > 20 * float(emp.sum())


def test_training_is_unchanged_and_start_every_choose_the_steps() -> None:
    model, x = _logistic(3)
    y = torch.randint(0, 3, (32,))
    twin, _ = _logistic(3)
    tracker = FisherTracker(model, start=3, every=2, seed=0)
    tracked = []
    for _ in range(9):
        out = model(x)
        tracked.append(tracker.update(out))  # before the training backward
        nn.functional.cross_entropy(out, y).backward()
        nn.functional.cross_entropy(twin(x), y).backward()
    assert tracked == [False, False, False, True, False, True, False, True, False]
    assert tracker.tracked == 3 and tracker.calls == 9
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad)  # the training gradients are those without the tracker


def test_update_after_a_backward_that_freed_the_graph_says_what_to_do() -> None:
    model, x = _logistic()
    out = model(x)
    out.sum().backward()
    with pytest.raises(RuntimeError, match="before loss.backward"):
        FisherTracker(model).update(out)
    out = model(x)
    out.sum().backward(retain_graph=True)
    assert FisherTracker(model).update(out)


def test_ema_is_the_bias_corrected_average_of_the_steps() -> None:
    model, x = _logistic(4)
    plain, ema = FisherTracker(model, seed=5), FisherTracker(model, decay=0.9, seed=5)
    contributions, before = [], {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for k in range(1, 8):
        out = model(x)
        plain.update(out)
        ema.update(out)
        total = {n: f * k for n, f in plain.fisher().items()}
        contributions.append({n: total[n] - before[n] for n in total})
        before = total
    for n in before:
        acc = torch.zeros_like(before[n])
        for c in contributions:
            acc = 0.9 * acc + 0.1 * c[n]
        torch.testing.assert_close(ema.fisher()[n], acc / (1 - 0.9**7), rtol=1e-5, atol=1e-7)


def test_state_dict_resumes_exactly() -> None:
    model, x = _logistic(5)
    whole = FisherTracker(model, seed=7)
    part = FisherTracker(model, seed=7)
    for _ in range(3):
        whole.update(model(x))
        part.update(model(x))
    resumed = FisherTracker(model)
    resumed.load_state_dict(part.state_dict())
    resumed._generator = part._generator  # the same label stream from here on
    for _ in range(2):
        whole.update(model(x))
        resumed.update(model(x))
    for n, f in whole.fisher().items():
        torch.testing.assert_close(resumed.fisher()[n], f)
    with pytest.raises(ValueError, match="decay"):
        FisherTracker(model, decay=0.5).load_state_dict(part.state_dict())


def test_bf16_model_and_parameter_subset() -> None:
    model, x = _logistic(6)
    model = model.to(torch.bfloat16)
    tracker = FisherTracker(model, params=["bias"], seed=0)
    tracker.update(model(x.to(torch.bfloat16)))
    f = tracker.fisher()
    assert list(f) == ["bias"] and f["bias"].dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(likelihood="regression"), "sigma"),
        (dict(likelihood="poisson"), "likelihood must be"),
        (dict(decay=1.0), "decay"),
        (dict(every=0), "every"),
        (dict(params=lambda n, p: False), "no parameter to track"),
    ],
)
def test_bad_tracker_options(kwargs, match) -> None:
    model, _ = _logistic()
    with pytest.raises(ValueError, match=match):
        FisherTracker(model, **kwargs)


def test_fisher_before_any_step_is_an_error() -> None:
    model, _ = _logistic()
    with pytest.raises(RuntimeError, match="no step yet"):
        FisherTracker(model, start=5).fisher()


def test_fisher_diag_equals_the_tracker_on_the_same_batches_and_reports_settling() -> None:
    model, _ = _logistic(7)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(16, 5, generator=g), torch.zeros(16)) for _ in range(60)]
    est = fisher_diag(model, batches, seed=11, max_batches=50)
    tracker = FisherTracker(model, seed=11)
    for xb, _ in batches[:50]:
        tracker.update(model(xb))
    for n, f in tracker.fisher().items():
        torch.testing.assert_close(est[n], f)
    assert est.batches == 50 and est.examples == 800 and len(est.changes) == 49
    assert est.settled_after is not None and 2 <= est.settled_after <= 50
    assert all(c < 0.05 for c in est.changes[est.settled_after - 1 :])
    assert est.settling() == f"relative change under 5% from batch {est.settled_after} of 50"
    short = fisher_diag(model, batches, seed=11, max_batches=3)  # three batches of 16 cannot settle
    assert short.settled_after is None
    assert short.settling().startswith("not settled (relative change under 5%) within 3 batches")
    with pytest.raises(ValueError, match="no batch"):
        fisher_diag(model, [])


def test_the_posterior_from_a_fisher() -> None:
    model, x = _logistic(8)
    tracker = FisherTracker(model, seed=0)
    for _ in range(50):
        tracker.update(model(x))
    post = L2MPosterior.from_fisher(model, tracker, num_data=1000, prior_precision=2.0)
    f = torch.cat([tracker.fisher()[n].reshape(-1) for n in ("weight", "bias")])
    torch.testing.assert_close(post.variance(), 1.0 / (1000 * f + 2.0), rtol=1e-5, atol=0)
    assert post.mode == "fisher" and "mode='fisher'" in repr(post)
    ev = L2MPosterior.from_fisher(model, tracker, num_data=1000, prior_precision="evidence")
    assert ev.evidence is not None and ev.evidence.total_gamma > 0
    only_w = L2MPosterior.from_fisher(model, {"weight": tracker.fisher()["weight"]}, num_data=10, prior_precision=1.0)
    assert only_w.layout.names == ("weight",) and only_w.kept_at_map == (("bias", "no Fisher given"),)
    pred = post.predict(model, x, 8, task="classification", linearized=True, progress=False)
    assert pred.probs.shape == (32, 3)
    with pytest.raises(KeyError, match="not parameters of the model"):
        L2MPosterior.from_fisher(model, {"nope": torch.ones(1)}, num_data=10, prior_precision=1.0)
    with pytest.raises(ValueError, match="num_data"):
        L2MPosterior.from_fisher(model, tracker, num_data=0, prior_precision=1.0)
