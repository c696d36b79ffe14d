"""The digits MLP of ``l2m-fast eval classification`` with the prior precision varied, two ways.

1. ``--explicit`` (seed 0): L2M explicit mode from Adam's ``v``, uncalibrated, sampled: per prior
   precision, the fraction of weights whose ``fisher_scale * v_hat`` exceeds it, the median weight
   variance, and accuracy / NLL / ECE on the test images (50 samples).
2. ``--fisher`` (the eval's seeds): the tracked sampled-label Fisher's posterior
   (``from_fisher(..., prior_precision=delta)``; small delta: the Fisher's structure dominates, large:
   the isotropic prior), calibrated on the validation split (temperature and logit temperature) and
   linearized, against the MAP and the temperature-scaled MAP: test NLL and the AUROC of telling
   pixel-permuted images apart by predictive entropy.

Run: ``python benchmarks/classification_prior_sweep.py [--explicit] [--fisher]`` (both by default).
"""

from __future__ import annotations

import argparse
import warnings

import torch

from l2m_fast import L2MPosterior
from l2m_fast.demo.classification import ClsConfig, digits_mlp, digits_splits, softmax_mean, train_classifier
from l2m_fast.demo.cls_eval import EvalData, l2m_predictor, map_predictor, score
from l2m_fast.demo.common import TimedTracker
from l2m_fast.demo.l2m_method import l2m_samples
from l2m_fast.demo.metrics import accuracy, categorical_nll, expected_calibration_error


def _map_network(cfg: ClsConfig, seed: int, tracked: bool) -> tuple:
    """The eval's MAP network of ``seed`` (its first ensemble member), its optimizer, tracker and data."""
    d = digits_splits(seed, cfg.val_fraction)
    x, y = d["x_train"], d["y_train"]
    torch.manual_seed(seed * 1000 + 10)
    model = digits_mlp(cfg)
    steps_per_epoch = -(-len(y) // cfg.batch_size)
    tracker = TimedTracker(model, start=steps_per_epoch * (cfg.epochs - 1), seed=seed) if tracked else None
    opt = train_classifier(model, x, y, cfg, seed * 1000 + 100, None, tracker)
    return model, opt, tracker, d


def explicit_sweep(cfg: ClsConfig) -> None:
    model, opt, _, d = _map_network(cfg, cfg.seeds[0], tracked=False)
    n = len(d["y_train"])
    print("| prior precision | frac fisher > prior | median var | accuracy | NLL | ECE |")
    print("|---:|---:|---:|---:|---:|---:|")
    for pp in (n * cfg.weight_decay, 8.0, 100.0, 1000.0):
        post = L2MPosterior.from_optimizer(
            model, opt, mode="explicit", num_data=n, batch_size=cfg.batch_size, prior_precision=pp
        )
        a, b = float(post.seg_a[0]), float(post.seg_b[0])
        p = softmax_mean(l2m_samples(post, model, d["x_test"], 50, 0))
        yt = d["y_test"]
        print(
            f"| {pp:g} | {float((a * post.v > b).double().mean()):.3f} | {float(post.variance().median()):.3g} "
            f"| {accuracy(p, yt):.3f} | {categorical_nll(p, yt):.3f} | {expected_calibration_error(p, yt):.3f} |"
        )


def fisher_sweep(cfg: ClsConfig, deltas: tuple[float, ...] = (0.3, 3.0, 30.0, 300.0, 3000.0)) -> None:
    print("| seed | method | tau | logit T | test NLL | AUROC permuted (entropy) |")
    print("|---:|---|---:|---:|---:|---:|")
    for seed in cfg.seeds:
        model, opt, tracker, d = _map_network(cfg, seed, tracked=True)
        data = EvalData(d["x_test"], d["y_test"], {"permuted": d["x_permuted"]}, d["x_val"], d["y_val"])
        rows = [("MAP", None, map_predictor(model))]
        ts = L2MPosterior.from_optimizer(model, opt).scaled(0.0).calibrated(model, data.x_val, data.y_val)
        rows.append(("temperature-scaled MAP", ts, l2m_predictor(ts, model, 1, seed)))
        for delta in deltas:
            post = L2MPosterior.from_fisher(model, tracker, num_data=len(d["y_train"]), prior_precision=delta)
            cal = post.calibrated(model, data.x_val, data.y_val, num_samples=cfg.samples, seed=seed)
            rows.append((f"tracked Fisher, delta {delta:g}, calibrated", cal, None))
        for name, post, predictor in rows:
            if predictor is None:
                predictor = l2m_predictor(post, model, cfg.samples, seed, linearized=True)
            r = score(name, predictor, data)
            tau = "" if post is None else f"{post.temperature:.3g}"
            t = "" if post is None or post.logit_temperature is None else f"{post.logit_temperature:.3g}"
            print(f"| {seed} | {name} | {tau} | {t} | {r['nll']:.4f} | {r['auroc_permuted_entropy']:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--explicit", action="store_true", help="only the explicit-mode sweep")
    ap.add_argument("--fisher", action="store_true", help="only the Fisher prior-precision sweep")
    args = ap.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore", RuntimeWarning)  # the evidence's vanished-curvature warning, expected here
    cfg = ClsConfig()
    both = not (args.explicit or args.fisher)
    if args.explicit or both:
        explicit_sweep(cfg)
    if args.fisher or both:
        fisher_sweep(cfg)


if __name__ == "__main__":
    main()
