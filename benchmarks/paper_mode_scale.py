"""How the L2M variance scales with weight decay and data size, paper mode vs explicit mode.

Trains the demo's toy MLP (AdamW, lr 0.1, 5,000 full-batch epochs) for weight decay lambda in
{0.01, 0.1, 1} and N in {20, 200} points, and prints, per mode: the largest weight variance over
lambda, the fraction of weights whose v_hat exceeds the prior term, and the predictive sd of f at
x = 0 (among the data) and x = 6 (outside). Run: ``python benchmarks/paper_mode_scale.py``.
"""

import torch

from l2m_fast import L2MPosterior
from l2m_fast.demo.l2m_method import l2m_samples
from l2m_fast.demo.toy import ToyConfig, draw_toy, mlp, train_map

torch.set_num_threads(1)
xq = torch.tensor([[0.0], [6.0]])
print("| N | lambda | mode | max var / lambda | frac v_hat > prior | sd f(0) | sd f(6) |")
print("|---:|---:|---|---:|---:|---:|---:|")
for n in (20, 200):
    x, y = draw_toy(n, 7, -4.0, 4.0)
    for wd in (0.01, 0.1, 1.0):
        cfg = ToyConfig(weight_decay=wd)
        torch.manual_seed(0)
        m = mlp()
        opt = train_map(m, x, y, cfg)
        for mode, kw in (("paper", {}), ("explicit", {"num_data": n, "batch_size": n})):
            post = L2MPosterior.from_optimizer(m, opt, mode=mode, **kw)
            var = post.variance()
            a, b = float(post.seg_a[0]), float(post.seg_b[0])
            frac = float((a * post.v > b).double().mean())
            sd = l2m_samples(post, m, xq, 300, 0).squeeze(-1).std(0)
            print(
                f"| {n} | {wd} | {mode} | {float(var.max()) / wd:.3g} | {frac:.3f} | {float(sd[0]):.2f} "
                f"| {float(sd[1]):.1f} |"
            )
