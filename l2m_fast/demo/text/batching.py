"""One ``post.predict`` call over all articles against the same predictive in hand-batched calls.

The case (a) model (MiniLM's last block and the head, 1.9M parameters under the posterior) on cached
128-token states: one call over ``docs`` test articles with S samples, and the same S samples in calls of
16, 32, 64 and 128 articles whose probabilities are concatenated. The results agree to float rounding
(sample ``s`` is the same in every call); the question is the time. Each variant's plan
(:func:`l2m_fast.plan_predict`: vmap or loop, samples per chunk, inputs per chunk) is printed beside it,
and one call with the best hand-batched call's split forced (``chunk_size``, ``input_chunk``) shows what
the planner would gain by choosing it. Timed by :func:`l2m_fast.benchmarking.time_interleaved` (first
calls untimed: they probe, and time vmap against a loop, once per input shape).

    python -m l2m_fast.demo.text.batching [--out l2m_out] [--docs 343] [--samples 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...benchmarking import run_header, time_interleaved
from ...posterior import L2MPosterior
from ...predictive import plan_predict

__all__ = ["hand_batched", "measure_batching", "format_batching", "main"]

SIZES = (16, 32, 64, 128)


def hand_batched(
    post: L2MPosterior, model: nn.Module, x: tuple[Tensor, Tensor], samples: int, seed: int, size: int, **kw: Any
) -> Tensor:
    """The classification predictive in calls of ``size`` articles: (B, C) probabilities, concatenated."""
    n = x[0].shape[0]
    return torch.cat([
        post.predict(model, (x[0][i : i + size], x[1][i : i + size]), samples, seed, task="classification",
                     progress=False, **kw).probs
        for i in range(0, n, size)
    ])


def _plan(post: L2MPosterior, model: nn.Module, x: tuple[Tensor, Tensor], samples: int, **kw: Any) -> str:
    p = plan_predict(post, model, x, samples, **kw)
    return f"{p.method}, {p.chunk_size} samples x {p.input_chunk} articles per chunk"


def measure_batching(
    post: L2MPosterior,
    model: nn.Module,
    x: tuple[Tensor, Tensor],
    samples: int = 32,
    seed: int = 0,
    *,
    sizes: tuple[int, ...] = SIZES,
    rounds: int = 3,
    linearized: bool = False,
) -> list[dict[str, object]]:
    """Times one call against hand-batched calls (and one call given the best hand-batched split).

    Args:
        post: a posterior over (some of) ``model``'s parameters (temperature > 0).
        model: the classifier, ``model(hidden, mask)`` -> (B, C) logits.
        x: ``(hidden (B, T, H), mask (B, T))``.
        samples: S.
        seed: the sampler's seed.
        sizes: articles per hand-batched call.
        rounds: timed rounds (median reported).
        linearized: time the linearized predictive instead of the sampled one.

    Returns:
        One row per variant: ``variant``, ``plan``, ``s`` (median seconds), ``vs_one`` (its time over the one
        call's), ``max_abs_diff`` (of its probabilities from the one call's).
    """
    kw = {"linearized": linearized}
    n = x[0].shape[0]

    def one() -> Tensor:
        return post.predict(model, x, samples, seed, task="classification", progress=False, **kw).probs

    fns = {"one call": one}
    for b in sizes:
        fns[f"calls of {b}"] = lambda b=b: hand_batched(post, model, x, samples, seed, b, **kw)
    first = {k: f() for k, f in fns.items()}  # warm: probes and vmap-or-loop trials, cached per shape
    t = time_interleaved(fns, rounds=rounds)
    best = min(sizes, key=lambda b: t[f"calls of {b}"].median)
    sub = (x[0][:best], x[1][:best])
    hand_plan = plan_predict(post, model, sub, samples, **kw)
    forced = {"chunk_size": hand_plan.chunk_size, "input_chunk": best, "method": hand_plan.method}

    def one_forced() -> Tensor:
        return post.predict(model, x, samples, seed, task="classification", progress=False, **forced, **kw).probs

    first["one call, best split forced"] = one_forced()
    t.update(time_interleaved({"one call, best split forced": one_forced}, rounds=rounds))
    rows = []
    for name, timing in t.items():
        if name == "one call":
            plan = _plan(post, model, x, samples, **kw)
        elif name.startswith("calls of"):
            b = int(name.split()[-1])
            plan = _plan(post, model, (x[0][: min(b, n)], x[1][: min(b, n)]), samples, **kw) + f", {-(-n // b)} calls"
        else:
            plan = f"{forced['method']}, {forced['chunk_size']} samples x {best} articles per chunk (forced)"
        rows.append({
            "variant": name,
            "plan": plan,
            "s": timing.median,
            "vs_one": timing.median / t["one call"].median,
            "max_abs_diff": float((first[name] - first["one call"]).abs().max()),
        })
    return rows


def format_batching(rows: list[dict[str, object]], header: str) -> str:
    """The rows as a markdown table under ``header``."""
    lines = [header, "", "| variant | plan | s (median) | time / one call | max abs diff of probs |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['plan']} | {r['s']:.3f} | {r['vs_one']:.2f} | {r['max_abs_diff']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Fine-tunes case (a) once (seed 0) and prints the batching table for the sampled and linearized predictives."""
    from .cache import FeatureCache
    from .data import load_bbc, text_splits
    from .finetune import FinetuneConfig, finetune
    from .model import LastBlockClassifier, load_minilm, load_tokenizer, model_dir

    p = argparse.ArgumentParser(prog="python -m l2m_fast.demo.text.batching", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="l2m_out", help="output folder holding the frozen-layer cache (default l2m_out)")
    p.add_argument("--docs", type=int, default=343, help="test articles in the one call (default 343)")
    p.add_argument("--samples", type=int, default=32, help="S (default 32)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    corpus = load_bbc()
    folder = model_dir()
    bert, tok = load_minilm(folder), load_tokenizer(folder)
    s = text_splits(corpus, 0)
    cache = FeatureCache(Path(args.out) / "cache", corpus, bert, tok, folder)
    cache.ensure(torch.cat([s.train, s.test]))
    torch.manual_seed(10)
    model = LastBlockClassifier(bert, len(s.classes))
    opt = finetune(model, cache.get(s.train), s.y_train, FinetuneConfig(), 100)
    post = L2MPosterior.from_optimizer(model, opt).scaled(0.01)  # paper mode, narrowed: a posterior worth sampling
    x = cache.get(s.test[: args.docs])
    for lin in (False, True):
        rows = measure_batching(post, model, x, args.samples, 0, rounds=args.rounds, linearized=lin)
        what = "linearized" if lin else "sampled"
        header = (f"{what} predictive, {x[0].shape[0]} articles x 128 tokens, S = {args.samples}, P = "
                  f"{post.num_params:,}; {run_header('cpu')}")
        print(format_batching(rows, header) + "\n", file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
