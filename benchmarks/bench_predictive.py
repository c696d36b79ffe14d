"""Posterior predictive benchmark: ``L2MPosterior.predict`` against per-sample Python loops.

Cases:

* ``toy``: the paper's 1-40-40-1 ReLU MLP, S = 500 samples, 200 test inputs (regression);
* ``mlp``: a 784-512-512-10 MLP, batch 256, S = 100 samples (classification).

Contenders, all under ``torch.no_grad()`` and producing the same reductions:

* ``naive``: the usual loop, ``theta + sigma * torch.randn(P)`` (sigma precomputed),
  ``torch.nn.utils.vector_to_parameters`` and a forward per sample;
* ``l2m auto`` / ``l2m vmap`` / ``l2m loop``: :meth:`l2m_fast.L2MPosterior.predict` with its rule,
  or the method forced; ``l2m linearized``: the same samples through the model linearized at the MAP
  (``linearized=True``, forward-mode jvps);
* ``laplace-torch``: a fitted ``DiagLaplace``'s own Monte-Carlo predictive, ``la(x, pred_type="nn",
  link_approx="mc", n_samples=S)``;
* ``ivon``: IVON's ``with optimizer.sampled_params(): model(x)`` loop;
* ``S MAP forwards``: S forwards with no sampling at all, the floor of any loop: ``naive / floor`` is
  the most that removing the sampling and copying overhead of a loop can gain.

Run as a script for one table with ratios measured in the same run::

    python benchmarks/bench_predictive.py [--rounds 7] [--cases toy mlp]

Timing, labels and the machine line come from :mod:`l2m_fast.benchmarking`, as in every benchmark here.

or under pytest-benchmark: ``pytest benchmarks/bench_predictive.py --benchmark-only``.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from l2m_fast import L2MPosterior
from l2m_fast.benchmarking import run_header, sampler_backend, time_interleaved

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "toy": {"sizes": (1, 40, 40, 1), "batch": 200, "samples": 500, "task": "regression"},
    "mlp": {"sizes": (784, 512, 512, 10), "batch": 256, "samples": 100, "task": "classification"},
}


def _mlp(sizes: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@dataclass
class Case:
    name: str
    model: nn.Module
    x: torch.Tensor
    samples: int
    task: str
    post: L2MPosterior
    extras: dict[str, Any] = field(default_factory=dict)


def make_case(name: str) -> Case:
    """The model, inputs and an L2M posterior from a few Adam steps (weight decay 1e-4, paper mode)."""
    spec = CASES[name]
    torch.manual_seed(0)
    model = _mlp(spec["sizes"]).eval()
    x = torch.randn(spec["batch"], spec["sizes"][0])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(3):
        opt.zero_grad()
        out = model(x)
        loss = out.square().mean() if spec["task"] == "regression" else out.logsumexp(-1).mean()
        loss.backward()
        opt.step()
    post = L2MPosterior.from_optimizer(model, opt)
    return Case(name, model, x, spec["samples"], spec["task"], post)


# -------------------------------------------------------------------------------------------- contenders


def _reduce(outs: list[torch.Tensor], task: str) -> tuple[torch.Tensor, ...]:
    if task == "regression":
        y = torch.stack(outs)
        return y.mean(0), y.var(0, unbiased=False)
    p = torch.stack(outs).softmax(-1)
    probs = p.mean(0)
    entropy = -torch.special.xlogy(probs, probs).sum(-1)
    return probs, entropy, entropy + torch.special.xlogy(p, p).sum(-1).mean(0)


def naive(case: Case) -> Any:
    """theta + sigma * randn, vector_to_parameters, forward: one Python iteration per sample."""
    params = list(case.model.parameters())
    theta = case.post.theta
    sigma = case.extras.setdefault("sigma", case.post.variance().sqrt())
    keep = parameters_to_vector(params).detach().clone()
    outs = []
    with torch.no_grad():
        for _ in range(case.samples):
            vector_to_parameters(theta + sigma * torch.randn_like(theta), params)
            outs.append(case.model(case.x))
        vector_to_parameters(keep, params)
    return _reduce(outs, case.task)


def forward_only(case: Case) -> Any:
    """S forwards at the MAP, no sampling: the floor of any per-sample loop (not a predictive)."""
    with torch.no_grad():
        outs = [case.model(case.x) for _ in range(case.samples)]
    return _reduce(outs, case.task)


def ours(method: str, linearized: bool = False) -> Callable[[Case], Any]:
    def run(case: Case) -> Any:
        return case.post.predict(
            case.model, case.x, num_samples=case.samples, seed=0, task=case.task, method=method,
            linearized=linearized, progress=False,
        )

    run.__name__ = f"l2m_{method}{'_linearized' if linearized else ''}"
    return run


def _laplace(case: Case) -> Any:
    if "la" not in case.extras:
        import laplace
        from torch.utils.data import DataLoader, TensorDataset

        x = case.x[:32]
        with torch.no_grad():
            y = case.model(x)
        y = y if case.task == "regression" else y.argmax(-1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            la = laplace.Laplace(case.model, case.task, subset_of_weights="all", hessian_structure="diag")
            la.fit(DataLoader(TensorDataset(x, y), batch_size=32))
        case.extras["la"] = la
    return case.extras["la"]


def laplace_mc(case: Case) -> Any:
    la = _laplace(case)
    with torch.no_grad():
        return la(case.x, pred_type="nn", link_approx="mc", n_samples=case.samples)


def _ivon(case: Case) -> Any:
    if "ivon" not in case.extras:
        import ivon

        case.extras["ivon"] = ivon.IVON(case.model.parameters(), lr=0.1, ess=1000.0)
    return case.extras["ivon"]


def ivon_loop(case: Case) -> Any:
    opt = _ivon(case)
    outs = []
    with torch.no_grad():
        for _ in range(case.samples):
            with opt.sampled_params():
                outs.append(case.model(case.x))
    return _reduce(outs, case.task)


CONTENDERS: dict[str, Callable[[Case], Any]] = {
    "naive loop": naive,
    "l2m predict (auto)": ours("auto"),
    "l2m predict (vmap)": ours("vmap"),
    "l2m predict (loop)": ours("loop"),
    "l2m linearized predict (auto)": ours("auto", linearized=True),
    "laplace-torch nn MC": laplace_mc,
    "ivon sampled_params": ivon_loop,
    "S MAP forwards (loop floor)": forward_only,
}
PEERS = {"laplace-torch nn MC": "laplace", "ivon sampled_params": "ivon"}


def available(name: str) -> bool:
    mod = PEERS.get(name)
    if mod is None:
        return True
    try:
        __import__(mod)
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------ pytest-benchmark

try:
    import pytest
except ImportError:  # script use without pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:
    _CACHE: dict[str, Case] = {}

    @pytest.mark.parametrize("contender", list(CONTENDERS))
    @pytest.mark.parametrize("case_name", list(CASES))
    def test_predictive(benchmark: Any, case_name: str, contender: str) -> None:
        if not available(contender):
            pytest.skip(f"{PEERS[contender]} is not installed")
        case = _CACHE.setdefault(case_name, make_case(case_name))
        fn = CONTENDERS[contender]
        benchmark.extra_info.update(case=case_name, samples=case.samples, params=case.post.num_params)
        benchmark.pedantic(fn, args=(case,), rounds=3, warmup_rounds=1)


# ---------------------------------------------------------------------------------------------- script


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    print(f"{run_header('cpu')}; sampler: {sampler_backend('cpu')}")
    print(f"median and min over {args.rounds} interleaved rounds after one untimed warm-up call each")
    print()
    print("| case | P | S | contender | plan | min s | median s | naive / this (min) | naive / this (median) |")
    print("| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |")
    for name in args.cases:
        case = make_case(name)
        fns = {k: f for k, f in CONTENDERS.items() if available(k)}
        timings = time_interleaved({k: (lambda f=f, c=case: f(c)) for k, f in fns.items()}, rounds=args.rounds)
        base_min, base_med = timings["naive loop"].min, timings["naive loop"].median
        for label in CONTENDERS:
            if label not in fns:
                print(f"| {name} | {case.post.num_params:,} | {case.samples} | {label} | not installed | | | | |")
                continue
            plan = ""
            if label.startswith("l2m"):
                res = fns[label](case)
                plan = f"{res.method}, chunk {res.chunk_size}"
            tmin, tmed = timings[label].min, timings[label].median
            print(
                f"| {name} | {case.post.num_params:,} | {case.samples} | {label} | {plan} | {tmin:.4f} | {tmed:.4f} "
                f"| {base_min / tmin:.2f}x | {base_med / tmed:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
