"""Calibration of the posterior temperature (and the logit temperature) on validation data."""

from __future__ import annotations

import io
import math

import pytest
import torch
from conftest import mlp, posterior_with_random_v
from torch import nn

from l2m_fast import L2MPosterior
from l2m_fast.calibration import classification_nll, gaussian_nll


def _classifier(seed: int = 0, n: int = 240, noise: float = 1.0) -> tuple[nn.Module, L2MPosterior, dict]:
    """A 2-D, 3-class problem with label noise, an MLP trained to overfit it (over-confident), its posterior."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[0.0, 1.5], [1.3, -0.8], [-1.3, -0.8]])
    y = torch.randint(0, 3, (n,), generator=g)
    x = centers[y] + noise * torch.randn(n, 2, generator=g)
    model = mlp((2, 32, 3), seed=seed, act=nn.Tanh)
    opt = torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=1e-4)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[: n // 2]), y[: n // 2]).backward()
        opt.step()
    post = L2MPosterior.from_optimizer(model, opt, mode="explicit", num_data=n // 2, batch_size=n // 2)
    data = {"x_train": x[: n // 2], "y_train": y[: n // 2], "x_val": x[n // 2 :], "y_val": y[n // 2 :]}
    return model, post, data


@pytest.mark.parametrize("linearized", [True, False])
def test_calibration_fits_both_temperatures_and_its_nll_is_the_predictives(linearized: bool) -> None:
    model, post, d = _classifier()
    cal = post.calibrated(model, d["x_val"], d["y_val"], linearized=linearized, num_samples=16, seed=3)
    rep = cal.calibration
    assert cal is not post and post.temperature == 1.0  # a new posterior; the old one unchanged
    assert cal.temperature == pytest.approx(rep.temperature) and cal.logit_temperature == pytest.approx(
        rep.logit_temperature
    )
    with torch.no_grad():
        raw_map = classification_nll(model(d["x_val"])[None], d["y_val"])
    assert rep.map_nll < raw_map  # the overfit MAP is over-confident: temperature scaling alone helps
    assert rep.nll <= rep.map_nll  # never worse than the temperature-scaled MAP on validation
    # the reported NLL is that of the calibrated posterior's own predictive on the validation set
    pred = cal.predict(model, d["x_val"], 16, seed=3, task="classification", linearized=linearized, progress=False)
    if rep.temperature > 0:
        nll = -float(torch.log(pred.probs.double().gather(1, d["y_val"][:, None])).mean())
        assert nll == pytest.approx(rep.nll, rel=1e-4, abs=1e-5)
    assert math.isinf(rep.curve[0][0]) and rep.curve[0][1] == pytest.approx(rep.map_nll)
    assert [round(g, 6) for g, _ in rep.curve[1:]] == [round(-8 + 0.5 * k, 6) for k in range(25)]


def test_the_map_nll_is_temperature_scaling() -> None:
    model, post, d = _classifier(seed=1)
    cal = post.calibrated(model, d["x_val"], d["y_val"], num_samples=8)
    with torch.no_grad():
        logits = model(d["x_val"]).double()
    grid = torch.exp(torch.linspace(-3, 3, 2001, dtype=torch.float64))
    best = min(classification_nll(logits[None] / t, d["y_val"]) for t in grid.tolist())
    assert cal.calibration.map_nll == pytest.approx(best, abs=1e-4)


def test_noise_that_does_not_help_is_not_kept() -> None:
    """A linear model whose MAP fits the labels' log-odds exactly: any weight noise only hurts."""
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    x = torch.randn(400, 2)
    with torch.no_grad():
        p1 = torch.sigmoid(model(x)[:, 1] - model(x)[:, 0])
    y = (torch.rand(400) < p1).long()  # labels drawn from the model itself: the MAP is calibrated
    post = posterior_with_random_v(model, b=1.0)
    cal = post.calibrated(model, x, y, num_samples=16)
    assert cal.temperature == 0.0 and cal.calibration.temperature == 0.0
    assert cal.calibration.nll == cal.calibration.map_nll
    pred = cal.predict(model, x, 8, task="classification", progress=False)
    assert pred.method == "map"


def test_calibrated_state_round_trips() -> None:
    model, post, d = _classifier()
    cal = post.calibrated(model, d["x_val"], d["y_val"], num_samples=8)
    buf = io.BytesIO()
    torch.save(cal.state_dict(), buf)
    buf.seek(0)
    back = L2MPosterior.from_saved(torch.load(buf, weights_only=True))
    assert back.temperature == cal.temperature and back.logit_temperature == cal.logit_temperature
    assert torch.equal(back.sample(4, seed=1).flat, cal.sample(4, seed=1).flat)
    assert f"temperature={cal.temperature:.4g}" in repr(back)


def test_regression_calibration_with_known_fitted_and_head_noise() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 1, generator=g) * 4 - 2
    y = torch.sin(2 * x) + 0.3 * torch.randn(200, 1, generator=g)
    model = mlp((1, 32, 1), act=nn.Tanh)
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.01)
    for _ in range(400):
        opt.zero_grad()
        nn.functional.mse_loss(model(x[:100]), y[:100]).backward()
        opt.step()
    post = L2MPosterior.from_optimizer(model, opt)
    known = post.calibrated(model, x[100:], y[100:], task="regression", noise_var=0.09, num_samples=16)
    fitted = post.calibrated(model, x[100:], y[100:], task="regression", num_samples=16)
    assert known.calibration.noise_var == 0.09 and 0.03 < fitted.calibration.noise_var < 0.3
    assert known.logit_temperature == 1.0
    pred = known.predict(model, x[100:], 16, linearized=True, progress=False)
    nll = gaussian_nll(pred.mean, pred.var + 0.09, y[100:])
    assert nll == pytest.approx(known.calibration.nll, rel=1e-4, abs=1e-5)
    y1 = y[100:, 0]  # (B,) targets for a (B, 1) model are accepted
    assert post.calibrated(model, x[100:], y1, task="regression", noise_var=0.09, num_samples=16).temperature == (
        pytest.approx(known.temperature)
    )


@pytest.mark.parametrize(
    ("inputs", "targets", "kwargs", "exc", "match"),
    [
        ("empty", None, {}, ValueError, "validation set is empty"),
        ("x", "bad_labels", {}, ValueError, r"must lie in \[0, 3\)"),
        ("x", "float_labels", {}, ValueError, "integer class labels"),
        ("x", "short_labels", {}, ValueError, "integer class labels"),
        ("x", "y", {"num_samples": 1}, ValueError, "num_samples must be an int >= 2"),
        ("x", "y", {"task": "ranking"}, ValueError, "task must be"),
        ("x", "y", {"link": "probit", "task": "regression"}, ValueError, "link must be"),
        ("x", "y", {"search": (2.0, 1.0)}, ValueError, "search must be"),
        ("x", "y", {"noise_var": -1.0}, ValueError, "noise_var"),
    ],
)
def test_bad_validation_input_is_a_clear_error(inputs, targets, kwargs, exc, match) -> None:
    model, post, d = _classifier()
    x = d["x_val"][:0] if inputs == "empty" else d["x_val"]
    y = {
        None: d["y_val"][:0],
        "y": d["y_val"],
        "bad_labels": d["y_val"] + 3,
        "float_labels": d["y_val"].float(),
        "short_labels": d["y_val"][:-1],
    }[targets]
    with pytest.raises(exc, match=match):
        post.calibrated(model, x, y, **kwargs)
