"""Case (b): every one of MiniLM's 22.7M parameters fine-tuned with AdamW, its posterior sampled in place.

One epoch of AdamW over the tokenised training articles (the usual transformer settings of
:mod:`.finetune`, learning rate 5e-5), then:

* the posterior over all parameters from the optimizer, in paper mode and in explicit mode with the
  evidence's prior precision around the pretrained weights;
* its predictive through the in-place path, ``post.iter_sampled``: each of S samples written into the
  model's own parameters (one copy of them in memory, however many samples) and the model run as it is,
  on a subset of the test and tech articles (every sample costs a forward of the whole encoder);
* the temperature-scaled MAP for reference (one forward over a validation subset);
* the sampler's time for all P parameters at S = 16 against batched PyTorch (``torch.randn(S, P) * sigma
  + theta``), both timed by :func:`l2m_fast.benchmarking.time_interleaved`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...benchmarking import gbs, sampler_backend, sampler_bytes, time_interleaved
from ...posterior import L2MPosterior
from ..cls_eval import EvalData, Predicted, map_predictor, mixture_mutual_info, score
from ..common import Timer
from .cache import tokenize
from .data import OOD_TOPIC, BBCCorpus, TextSplits
from .finetune import FinetuneConfig, finetune
from .model import WholeModelClassifier

__all__ = ["WholeConfig", "WHOLE_COLUMNS", "inplace_predictor", "sampler_timing", "format_sampler_timing",
           "run_whole_model"]

WHOLE_COLUMNS = (
    ("method", "method (case (b))"),
    ("acc", "accuracy"),
    ("nll", "NLL"),
    ("ece", "ECE"),
    ("brier", "Brier"),
    (f"auroc_{OOD_TOPIC}_entropy", "AUROC tech (entropy)"),
    (f"auroc_{OOD_TOPIC}_maxprob", "AUROC tech (max p)"),
    (f"auroc_{OOD_TOPIC}_mi", "AUROC tech (MI)"),
    ("train_s", "fine-tune s"),
    ("posthoc_s", "post-hoc s"),
    ("predict_s", "predict s"),
)


@dataclass
class WholeConfig:
    """Case (b)'s budget.

    Attributes:
        finetune: one epoch of AdamW at 5e-5 by default.
        samples: S of the in-place predictive.
        eval_docs: test and tech articles each scored (a subset: every sample is a forward of the encoder).
        val_docs: validation articles for the temperature-scaled MAP.
        sampler_samples: S of the sampler timing.
        sampler_rounds: its timed rounds (median reported).
        chunk: articles per forward.
    """

    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(epochs=1, batch_size=16, lr=5e-5))
    samples: int = 8
    eval_docs: int = 128
    val_docs: int = 96
    sampler_samples: int = 16
    sampler_rounds: int = 3
    chunk: int = 32


def _forward(model: nn.Module, x: tuple[Tensor, Tensor], chunk: int) -> Tensor:
    return torch.cat([model(x[0][i : i + chunk], x[1][i : i + chunk]) for i in range(0, len(x[0]), chunk)])


def inplace_predictor(
    post: L2MPosterior, model: nn.Module, samples: int, seed: int, chunk: int = 32, bar: Any = None
) -> Callable[[tuple[Tensor, Tensor]], Predicted]:
    """The predictive by in-place samples: ``post.iter_sampled`` writes each into the model, which runs as it is.

    Args:
        post: the posterior.
        model: the model it covers (eval mode).
        samples: S.
        seed: the sampler's seed.
        chunk: articles per forward.
        bar: optional tqdm-like bar, advanced once per sample.

    Returns:
        ``(input_ids (B, T), mask (B, T)) -> Predicted`` (average softmax of the S sampled logit vectors,
        divided by the posterior's logit temperature, and their mutual information).
    """

    @torch.no_grad()
    def predict(x: tuple[Tensor, Tensor]) -> Predicted:
        logits = []
        with post.iter_sampled(model, samples, seed) as it:
            for _ in it:
                logits.append(_forward(model, x, chunk) / post.logit_temperature)
                if bar is not None:
                    bar.update(1)
        stacked = torch.stack(logits)  # (S, B, C)
        return Predicted(torch.softmax(stacked.double(), -1).mean(0), mixture_mutual_info(stacked))

    return predict


def sampler_timing(post: L2MPosterior, samples: int, seed: int, rounds: int) -> dict[str, Any]:
    """The fused sampler writing (S, P) samples of ``post`` into a warm buffer, against batched PyTorch.

    Returns:
        ``P``, ``S``, ``backend`` and per variant the median ``ms`` and ``gb_s`` (read + written bytes).
    """
    p = post.num_params
    buf = torch.empty(samples, p)
    sd = post.variance().sqrt()
    theta = post.theta

    def fused() -> Tensor:
        return post.sample(samples, seed, out=buf).flat

    def batched() -> Tensor:
        return torch.randn(samples, p) * sd + theta

    backend = sampler_backend("cpu")
    t = time_interleaved({"fused": fused, "batched": batched}, rounds=rounds)
    moved = sampler_bytes(p, samples)
    return {
        "P": p,
        "S": samples,
        "backend": backend,
        "fused_ms": t["fused"].median * 1e3,
        "batched_ms": t["batched"].median * 1e3,
        "fused_gb_s": gbs(moved, t["fused"].median),
        "batched_gb_s": gbs(moved, t["batched"].median),
        "rounds": rounds,
    }


def format_sampler_timing(t: dict[str, Any]) -> str:
    """The sampler timing as a sentence and a two-row markdown table."""
    return "\n".join([
        f"Sampler over all P = {t['P']:,} parameters of case (b), S = {t['S']}, float32, median of {t['rounds']} "
        f"interleaved rounds (fused op backend: {t['backend']}):",
        "",
        "| variant | ms | GB/s (read + written) |",
        "|---|---:|---:|",
        f"| fused op, out= (warm buffer) | {t['fused_ms']:.1f} | {t['fused_gb_s']:.2f} |",
        f"| PyTorch batched randn(S, P) * sigma + theta | {t['batched_ms']:.1f} | {t['batched_gb_s']:.2f} |",
    ])


def run_whole_model(
    bert: nn.Module,
    tokenizer: Any,
    corpus: BBCCorpus,
    s: TextSplits,
    cfg: WholeConfig,
    seed: int,
    mk: Callable[[str, int], Any],
    notes: list[str],
    max_length: int = 128,
) -> dict[str, Any]:
    """Case (b) on one seed's split.

    Returns:
        ``rows`` (scored like case (a), on ``cfg.eval_docs`` test and tech articles) and ``sampler`` (the
        timing of :func:`sampler_timing`).
    """

    def tokens(idx: Tensor) -> tuple[Tensor, Tensor]:
        return tokenize(tokenizer, [corpus.texts[i] for i in idx.tolist()], max_length)

    g = torch.Generator().manual_seed(seed + 99)
    test_idx = torch.randperm(len(s.test), generator=g)[: cfg.eval_docs]
    ood_pick = torch.randperm(len(s.ood), generator=g)[: cfg.eval_docs]
    val_idx = torch.randperm(len(s.val), generator=g)[: cfg.val_docs]
    x_train = tokens(s.train)
    data = EvalData(tokens(s.test[test_idx]), s.y_test[test_idx], {OOD_TOPIC: tokens(s.ood[ood_pick])},
                    tokens(s.val[val_idx]), s.y_val[val_idx])
    torch.manual_seed(seed * 1000 + 500)
    model = WholeModelClassifier(bert, len(s.classes))
    prior = copy.deepcopy(model)
    ft = cfg.finetune
    b = mk("case (b): fine-tuning all parameters (AdamW)", -(-len(s.train) // ft.batch_size) * ft.epochs)
    with Timer() as t_ft:
        opt = finetune(model, x_train, s.y_train, ft, seed * 1000 + 501, bar=b)
    if b is not None:
        b.close()
    p_all = sum(p.numel() for p in model.parameters())
    fwd = lambda m, x: _forward(m, x, cfg.chunk)  # noqa: E731
    rows = [score("MAP (whole model)", map_predictor(model, fwd), data, train_s=t_ft.s, posthoc_s=0.0)]
    with Timer() as t:
        ts = L2MPosterior.from_optimizer(model, opt).scaled(0.0).calibrated(model, data.x_val, data.y_val,
                                                                             output_fn=None, progress=False)
    ts_t = ts.logit_temperature

    @torch.no_grad()
    def ts_map(x: tuple[Tensor, Tensor]) -> Predicted:
        return Predicted(torch.softmax(fwd(model, x).double() / ts_t, -1))

    rows.append(score("Temperature-scaled MAP (whole model)", ts_map, data, train_s=t_ft.s, posthoc_s=t.s))
    n = len(s.train)
    with Timer() as t_paper:
        paper = L2MPosterior.from_optimizer(model, opt)
    with Timer() as t_ev, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        ev = L2MPosterior.from_optimizer(model, opt, mode="explicit", prior_precision="evidence", prior_mean=prior,
                                         num_data=n, batch_size=ft.batch_size)
    notes.append(
        f"case (b): {p_all:,} parameters, one epoch of AdamW (lr {ft.lr:g}, batch {ft.batch_size}) in {t_ft.s:.1f} s; "
        f"posteriors built in {t_paper.s:.2f} s (paper) and {t_ev.s:.2f} s (explicit, {ev.evidence}"
        f"{'; warned: curvature vanished' if caught else ''}); temperature-scaled MAP T = {ts_t:.3f}; scored on "
        f"{len(test_idx)} test and {len(ood_pick)} tech articles, S = {cfg.samples} in-place samples"
    )
    for label, post in (("L2M paper, sampled in place", paper),
                        ("L2M explicit (evidence prior), sampled in place", ev),
                        ("L2M explicit (evidence prior) + TS-MAP's T, sampled in place", ev.scaled(1.0, ts_t))):
        b = mk(f"case (b): {label}", cfg.samples * 2)
        rows.append(score(f"{label} (whole model)", inplace_predictor(post, model, cfg.samples, seed, cfg.chunk, b),
                          data, train_s=t_ft.s, posthoc_s=t_paper.s if post is paper else t_ev.s))
        if b is not None:
            b.close()
    timing = sampler_timing(paper, cfg.sampler_samples, seed, cfg.sampler_rounds)
    return {"rows": rows, "sampler": timing}
