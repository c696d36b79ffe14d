"""Metrics of the demo against hand-computed values."""

import math

import pytest
import torch

from l2m_fast.demo.metrics import (
    accuracy,
    auroc,
    brier_score,
    categorical_nll,
    coverage,
    effective_sample_size,
    entropy,
    expected_calibration_error,
    gaussian_nll,
)

D = torch.float64


def test_gaussian_nll_by_hand():
    y = torch.tensor([0.0, 1.0], dtype=D)
    mean = torch.zeros(2, dtype=D)
    var = torch.tensor([1.0, 4.0], dtype=D)
    want = (0.5 * math.log(2 * math.pi) + 0.5 * math.log(8 * math.pi) + 1.0 / 8.0) / 2
    assert gaussian_nll(y, mean, var) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize(("k", "want"), [(1.0, 0.5), (2.0, 0.5), (3.0, 1.0), (0.5, 0.25)])
def test_coverage_by_hand(k, want):
    y = torch.tensor([0.0, 1.0, 2.5, -3.0], dtype=D)
    assert coverage(y, torch.zeros(4, dtype=D), torch.ones(4, dtype=D), k) == want


def test_classification_scores_by_hand():
    probs = torch.tensor([[0.75, 0.25], [0.35, 0.65]], dtype=D)
    labels = torch.tensor([0, 0])
    assert accuracy(probs, labels) == 0.5
    assert categorical_nll(probs, labels) == pytest.approx(-(math.log(0.75) + math.log(0.35)) / 2, rel=1e-12)
    # (0.25^2 + 0.25^2 + 0.65^2 + 0.65^2) / 2
    assert brier_score(probs, labels) == pytest.approx((2 * 0.0625 + 2 * 0.4225) / 2, rel=1e-12)
    # confidences 0.75 (right) and 0.65 (wrong) fall in different bins of 10: 0.5 * 0.25 + 0.5 * 0.65
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx(0.45, rel=1e-12)
    # one bin: |accuracy 0.5 - mean confidence 0.7|
    assert expected_calibration_error(probs, labels, bins=1) == pytest.approx(0.2, rel=1e-12)


def test_ece_is_zero_when_calibrated():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=D)
    assert expected_calibration_error(probs, torch.tensor([0, 1])) == 0.0


@pytest.mark.parametrize(
    ("s_in", "s_out", "want"),
    [([0.0, 1.0], [2.0, 3.0], 1.0), ([2.0, 3.0], [0.0, 1.0], 0.0), ([0.0, 2.0], [1.0, 3.0], 0.75), ([1.0], [1.0], 0.5)],
)
def test_auroc_by_hand(s_in, s_out, want):
    assert auroc(torch.tensor(s_in), torch.tensor(s_out)) == want


def test_auroc_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    s_in, s_out = torch.randn(50, generator=g), torch.randn(40, generator=g) + 0.5
    labels = [0] * 50 + [1] * 40
    want = metrics.roc_auc_score(labels, torch.cat([s_in, s_out]).numpy())
    assert auroc(s_in, s_out) == pytest.approx(want, abs=1e-12)


def test_entropy_by_hand():
    h = entropy(torch.tensor([[0.25] * 4, [1.0, 0.0, 0.0, 0.0]], dtype=D))
    assert h[0].item() == pytest.approx(math.log(4), rel=1e-12)
    assert h[1].item() == pytest.approx(0.0, abs=1e-12)


def test_ess_constant_chain_is_its_length():
    assert effective_sample_size(torch.ones(100)) == 100.0


def test_ess_iid_chain_near_its_length():
    # iid draws: ESS ~ n; the estimator's spread at n = 20000 is a few percent (fixed seed)
    x = torch.randn(20000, generator=torch.Generator().manual_seed(0), dtype=D)
    assert 0.85 * 20000 < effective_sample_size(x) < 1.15 * 20000


def test_ess_ar1_chain_matches_theory():
    # AR(1) with phi = 0.9: ESS = n (1 - phi) / (1 + phi); the estimate is within 30% at this n (fixed seed)
    n, phi = 40000, 0.9
    e = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=D)
    x = torch.empty(n, dtype=D)
    x[0] = e[0] / math.sqrt(1 - phi**2)
    for t in range(1, n):
        x[t] = phi * x[t - 1] + e[t]
    want = n * (1 - phi) / (1 + phi)
    assert 0.7 * want < effective_sample_size(x) < 1.3 * want
