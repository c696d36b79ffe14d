"""L2M explicit mode on the digits MLP of ``l2m-fast eval classification``, prior precision varied.

Prints, per prior precision: the fraction of weights whose ``fisher_scale * v_hat`` exceeds it, the
median weight variance, and accuracy / NLL / ECE on the test images (50 samples).
Run: ``python benchmarks/classification_prior_sweep.py``.
"""

import torch

from l2m_fast.demo.classification import ClsConfig, digits_mlp, digits_splits, softmax_mean, train_classifier
from l2m_fast.demo.l2m_method import build_l2m, l2m_samples
from l2m_fast.demo.metrics import accuracy, categorical_nll, expected_calibration_error

torch.set_num_threads(2)
cfg = ClsConfig()
d = digits_splits(cfg.seed)
x, y = d["x_train"], d["y_train"]
n = len(y)
torch.manual_seed(cfg.seed + 10)  # the eval's first ensemble member, its MAP network
model = digits_mlp(cfg)
opt = train_classifier(model, x, y, cfg, cfg.seed + 100)
print("| prior precision | frac fisher > prior | median var | accuracy | NLL | ECE |")
print("|---:|---:|---:|---:|---:|---:|")
for pp in (n * cfg.weight_decay, 8.0, 100.0, 1000.0):
    post = build_l2m(model, opt, "explicit", num_data=n, batch_size=cfg.batch_size, prior_precision=pp)
    a, b = float(post.seg_a[0]), float(post.seg_b[0])
    p = softmax_mean(l2m_samples(post, model, d["x_test"], 50, 0))
    yt = d["y_test"]
    print(
        f"| {pp:g} | {float((a * post.v > b).double().mean()):.3f} | {float(post.variance().median()):.3g} "
        f"| {accuracy(p, yt):.3f} | {categorical_nll(p, yt):.3f} | {expected_calibration_error(p, yt):.3f} |"
    )
