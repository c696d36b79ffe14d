"""The demo's pieces: toy data, the L2M predictive, scoring, the paper-mode bound, figure and tables."""

import math

import pytest
import torch

from l2m_fast import L2MPosterior
from l2m_fast.demo.common import MethodRun
from l2m_fast.demo.l2m_method import l2m_samples
from l2m_fast.demo.regression import RegressionResult, parse_methods, score
from l2m_fast.demo.report import draw_figure
from l2m_fast.demo.tables import markdown_table, write_csv
from l2m_fast.demo.toy import NOISE_STD, ToyConfig, fresh_draws, grid, mlp, toy_data, train_map

TINY = ToyConfig(epochs=40, samples=6, hidden=8)


@pytest.fixture(scope="module")
def trained():
    x, y = toy_data()
    torch.manual_seed(0)
    m = mlp(TINY.hidden)
    opt = train_map(m, x, y, TINY)
    return m, opt


def test_toy_data_is_deterministic_and_in_range():
    x, y = toy_data()
    x2, y2 = toy_data()
    assert x.shape == (20, 1) and y.shape == (20, 1)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.min() >= -4 and x.max() <= 4
    # the noise around x^3 has sd 3: the sample sd of 20 residuals is within a factor 2 of it
    assert 1.5 < float((y - x**3).std()) < 6.0
    tx, _ = fresh_draws(100)
    assert not torch.equal(tx[:20], x)


def test_parse_methods():
    l2m = [
        "l2m_paper", "l2m_explicit", "l2m_paper_calibrated", "l2m_explicit_calibrated", "l2m_fisher_calibrated",
        "l2m_fisher_pass_calibrated",
    ]
    assert parse_methods("all") == ["rpf", "mc_dropout", "ensemble", "swag", "hmc", *l2m, "laplace_diag"]
    assert parse_methods("l2m,mc_dropout") == ["mc_dropout", *l2m]
    assert parse_methods("l2m_paper,hmc") == ["hmc", "l2m_paper"]
    with pytest.raises(ValueError, match="unknown method"):
        parse_methods("bogus")


def test_l2m_predict_matches_the_samples_and_restores_the_map(trained):
    model, opt = trained
    post = L2MPosterior.from_optimizer(model, opt)
    before = [p.detach().clone() for p in model.parameters()]
    xq = grid(5)
    out = l2m_samples(post, model, xq, 4, seed=3)
    assert out.shape == (4, 5, 1)
    flat = post.sample(4, seed=3).views()
    want = torch.stack([torch.func.functional_call(model, {k: v[i] for k, v in flat.items()}, (xq,)) for i in range(4)])
    torch.testing.assert_close(out, want)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_paper_mode_variance_is_bounded_by_weight_decay(trained):
    # paper mode: variance = 1 / (v_hat + 1/lambda + eps) <= lambda whatever the data
    model, opt = trained
    var = L2MPosterior.from_optimizer(model, opt).variance()
    assert float(var.max()) <= TINY.weight_decay * (1 + 1e-6)
    explicit = L2MPosterior.from_optimizer(model, opt, mode="explicit", num_data=20, batch_size=20).variance()
    # explicit: prior precision N * lambda = 2, so the variance reaches up to 1 / 2
    assert float(explicit.max()) <= 1 / (20 * TINY.weight_decay) * (1 + 1e-6)
    assert float(explicit.max()) > TINY.weight_decay


def _result(runs):
    g = torch.tensor([-5.0, 0.0, 5.0])
    return RegressionResult(
        x=torch.zeros(2, 1),
        y=torch.zeros(2, 1),
        grid=g,
        test_x=torch.zeros(2),
        test_y=torch.tensor([0.0, 3.0]),
        runs=runs,
        map_train_s=0.0,
    )


def test_score_by_hand():
    # queries: grid (-5, 0, 5) then two test points; samples +-1 around 0 everywhere except +-2 at x = 5
    s = torch.tensor([[1.0, 1.0, 2.0, 1.0, 1.0], [-1.0, -1.0, -2.0, -1.0, -1.0]])
    ref = torch.tensor([[2.0, 0.0, 2.0, 0.0, 0.0], [-2.0, 0.0, -2.0, 0.0, 0.0]])
    rows = score(_result({"l2m_paper": MethodRun(s, 1.0, 2.0, 3.0), "hmc": MethodRun(ref, 0.0, 5.0)}))
    r = rows[0]
    var = 1.0 + NOISE_STD**2  # epistemic 1 + noise 9 at both test points, mean 0, y = 0 and 3
    want_nll = 0.5 * math.log(2 * math.pi * var) + 0.5 * (0 + 9) / var / 2
    assert r["nll"] == pytest.approx(want_nll, rel=1e-12)
    assert r["cov1"] == 1.0  # |3| <= sqrt(10)
    assert r["std_in"] == pytest.approx(1.0) and r["std_out"] == pytest.approx(1.5)
    assert r["out_vs_hmc"] == pytest.approx(1.5 / 2.0)
    assert (r["train_s"], r["posthoc_s"], r["predict_s"]) == (1.0, 2.0, 3.0)
    assert rows[1]["out_vs_hmc"] == pytest.approx(1.0)


def test_figure_and_tables(tmp_path):
    s = torch.randn(4, 403, generator=torch.Generator().manual_seed(0))
    res = RegressionResult(
        x=torch.zeros(3, 1),
        y=torch.zeros(3, 1),
        grid=grid(400).squeeze(1),
        test_x=torch.zeros(3),
        test_y=torch.zeros(3),
        runs={"l2m_paper": MethodRun(s, 0.0, 0.0), "hmc": MethodRun(s, 0.0, 0.0)},
        map_train_s=0.0,
    )
    pytest.importorskip("matplotlib")
    path = draw_figure(res, tmp_path / "f.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [{"method": "a", "x": 0.5, "y": float("nan")}]
    assert markdown_table(rows, [("method", "m"), ("x", "X"), ("y", "Y")]).splitlines() == [
        "| m | X | Y |",
        "|---|---:|---:|",
        "| a | 0.500 |  |",
    ]
    write_csv(tmp_path / "t.csv", rows)
    assert (tmp_path / "t.csv").read_text().splitlines()[0] == "method,x,y"


def test_digits_splits():
    pytest.importorskip("sklearn")
    from l2m_fast.demo.classification import digits_splits

    d = digits_splits(0)
    assert int(d["y_train"].max()) == 7 and int(d["y_test"].max()) == 7
    assert d["x_train"].shape[1] == 64 and d["x_heldout"].shape[1] == 64
    assert float(d["x_train"].max()) <= 1.0
    # the permuted images keep each image's pixel values, in another order
    torch.testing.assert_close(d["x_permuted"].sort(1).values, d["x_test"].sort(1).values)
    assert not torch.equal(d["x_permuted"], d["x_test"])
