"""The rows of case (a), one function per family, every one scored by :func:`l2m_fast.demo.cls_eval.score`.

* :func:`baseline_rows`: the MAP, the temperature-scaled MAP, MC dropout with the model's own dropout,
  the deep ensemble.
* :func:`l2m_rows`: L2M in paper and explicit mode as the paper samples them (raw), and three
  posteriors linearized and calibrated on validation data (paper mode, explicit mode, explicit mode with
  the evidence's prior precision around the pretrained weights); the one with the lowest validation
  NLL is also the row "L2M best calibrated".
* :func:`fisher_rows`: the curvature comparison: L2M from Adam's ``v``, from a sampled-label Fisher
  tracked over the last epoch and from a partial pass after training (evidence prior; linearized as it
  is, and linearized + calibrated), and laplace-torch's diagonal GGN Laplace over the same parameters
  (one full pass).
* :func:`laplace_lll_rows`: laplace-torch's last-layer Laplace (diagonal and Kronecker GGN, marginal-
  likelihood prior precision, GLM probit predictive), optional: skipped with a note where it does not
  import.

Inputs of every predictor are ``(hidden, mask)`` tuples: (B, T, H) cached token states and (B, T) masks.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...fisher import fisher_diag
from ...posterior import L2MPosterior
from ..cls_eval import (
    EvalData,
    Predicted,
    Predictor,
    l2m_predictor,
    laplace_glm_predictor,
    map_predictor,
    mc_dropout_predictor,
    members_predictor,
    score,
)
from ..common import Timer
from .finetune import TimedTracker
from .model import LastBlockClassifier

__all__ = [
    "CaseA",
    "Recorder",
    "baseline_rows",
    "l2m_rows",
    "fisher_rows",
    "laplace_lll_rows",
    "laplace_available",
    "BEST_L2M",
]

BEST_L2M = "L2M best calibrated (lowest validation NLL)"

Inputs = tuple[Tensor, Tensor]


@dataclass
class CaseA:
    """What the methods of one seed share.

    Attributes:
        data: test, OOD ("tech") and validation inputs as ``(hidden, mask)`` tuples, with labels.
        x_train: training ``(hidden (N, T, H), mask (N, T))``.
        y_train: (N,) labels.
        model: the MAP classifier (ensemble member 0), eval mode.
        opt: its AdamW (Adam's second moment).
        prior: the classifier before fine-tuning (pretrained block and pooler, initial head).
        tracker: the sampled-label Fisher tracked over the MAP's last epoch (None when not tracked).
        members: the deep ensemble's members, ``model`` first.
        member_s: fine-tuning seconds of each member (the tracker's excluded).
        batch_size: training mini-batch size.
        samples: S of every sampled predictive.
        seed: the seed.
        bars: whether progress bars are shown.
    """

    data: EvalData
    x_train: Inputs
    y_train: Tensor
    model: LastBlockClassifier
    opt: torch.optim.Optimizer
    prior: LastBlockClassifier
    tracker: TimedTracker | None
    members: list[LastBlockClassifier]
    member_s: list[float]
    batch_size: int
    samples: int
    seed: int
    bars: bool = False

    @property
    def num_train(self) -> int:
        return int(self.y_train.shape[0])

    @property
    def map_s(self) -> float:
        return self.member_s[0]


@dataclass
class Recorder:
    """Keeps what the predictors returned (test first, then each OOD set), for the figures.

    Attributes:
        out: method name -> the :class:`Predicted` of each call, in call order.
    """

    out: dict[str, list[Predicted]] = field(default_factory=dict)

    def wrap(self, name: str, predictor: Predictor) -> Predictor:

        def recorded(x: Any) -> Predicted:
            p = predictor(x)
            self.out.setdefault(name, []).append(p)
            return p

        return recorded


def _score(name: str, predictor: Predictor, case: CaseA, rec: Recorder, **extra: object) -> dict[str, object]:
    return score(name, rec.wrap(name, predictor), case.data, **extra)


def baseline_rows(case: CaseA, rec: Recorder) -> list[dict[str, object]]:
    """MAP, temperature-scaled MAP, MC dropout (the model's dropout, S passes), deep ensemble."""
    d = case.data
    rows = [_score("MAP", map_predictor(case.model), case, rec, train_s=case.map_s, posthoc_s=0.0, posthoc_passes=0)]
    with Timer() as t:
        ts = L2MPosterior.from_optimizer(case.model, case.opt).scaled(0.0).calibrated(case.model, d.x_val, d.y_val)
    rows.append(
        _score("Temperature-scaled MAP", l2m_predictor(ts, case.model, 1, case.seed), case, rec, train_s=case.map_s,
               posthoc_s=t.s, posthoc_passes=0, logit_temperature=ts.logit_temperature)
    )
    p = case.model.dropout.p
    rows.append(
        _score(f"MC dropout (p={p:g}, S={case.samples})", mc_dropout_predictor(case.model, case.samples, case.seed),
               case, rec, train_s=case.map_s, posthoc_s=0.0, posthoc_passes=0)
    )
    m = len(case.members)
    rows.append(
        _score(f"Deep ensemble (M={m})", members_predictor(case.members), case, rec, train_s=sum(case.member_s),
               posthoc_s=0.0, posthoc_passes=0)
    )
    return rows


def _evidence_note(post: L2MPosterior, caught: list[warnings.WarningMessage]) -> str:
    ev = post.evidence
    text = f"{ev}" if ev is not None else "no evidence fit"
    return text + ("; warned: curvature vanished" if caught else "")


def l2m_rows(case: CaseA, rec: Recorder, notes: list[str]) -> list[dict[str, object]]:
    """L2M paper and explicit (raw, sampled) and three linearized + calibrated posteriors, and the best of those."""
    d, model, seed, s = case.data, case.model, case.seed, case.samples
    explicit = {"num_data": case.num_train, "batch_size": case.batch_size}
    rows: list[dict[str, object]] = []
    posts: dict[str, tuple[L2MPosterior, float]] = {}
    for mode, options in (("paper", {}), ("explicit", explicit)):
        with Timer() as t:
            post = L2MPosterior.from_optimizer(model, case.opt, mode=mode, **options)
        posts[mode] = (post, t.s)
        rows.append(
            _score(f"L2M {mode}, sampled", l2m_predictor(post, model, s, seed), case, rec, train_s=case.map_s,
                   posthoc_s=t.s, posthoc_passes=0)
        )
    with Timer() as t, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        ev = L2MPosterior.from_optimizer(model, case.opt, mode="explicit", prior_precision="evidence",
                                         prior_mean=case.prior, **explicit)
    posts["explicit (evidence prior)"] = (ev, t.s)
    notes.append(f"seed {seed}, L2M explicit with the evidence's prior (mean: the pretrained weights): "
                 f"{_evidence_note(ev, caught)}")
    candidates = []
    for label, (post, t_build) in posts.items():
        with Timer() as t:
            cal = post.calibrated(model, d.x_val, d.y_val, linearized=True, num_samples=s, seed=seed, progress=False)
        notes.append(f"seed {seed}, L2M {label} linearized: {cal.calibration}")
        name = f"L2M {label}, linearized + calibrated"
        row = _score(name, l2m_predictor(cal, model, s, seed, linearized=True), case, rec, train_s=case.map_s,
                     posthoc_s=t_build + t.s, posthoc_passes=0, val_nll=cal.calibration.nll,
                     temperature=cal.temperature, logit_temperature=cal.logit_temperature)
        rows.append(row)
        candidates.append(row)
    best = min(candidates, key=lambda r: float(r["val_nll"]))  # type: ignore[arg-type]
    notes.append(f"seed {seed}, best calibrated L2M by validation NLL: {best['method']}")
    rows.append({**best, "method": BEST_L2M, "chosen": best["method"]})
    rec.out[BEST_L2M] = rec.out.get(str(best["method"]), [])
    return rows


def _curvature_pair(
    case: CaseA,
    label: str,
    build: Callable[[], L2MPosterior],
    notes: list[str],
    note: str,
    **extra: object,
) -> list[dict[str, object]]:
    """One curvature's rows: its posterior (evidence prior) linearized as it is, and linearized + calibrated."""
    d, model, seed, s = case.data, case.model, case.seed, case.samples
    with Timer() as t_build, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        post = build()
    with Timer() as t_cal:
        cal = post.calibrated(model, d.x_val, d.y_val, linearized=True, num_samples=s, seed=seed, progress=False)
    notes.append(f"seed {seed}, {label}{note}: {_evidence_note(post, caught)}; {cal.calibration}")
    ev = post.evidence
    gamma = {"gamma": ev.total_gamma, "gamma_of": ev.total_params} if ev is not None else {}
    raw = score(f"{label}, evidence prior, linearized", l2m_predictor(post, model, s, seed, linearized=True), d,
                posthoc_s=t_build.s, **extra, **gamma)
    calibrated = score(f"{label}, evidence prior, linearized + calibrated",
                       l2m_predictor(cal, model, s, seed, linearized=True), d, posthoc_s=t_build.s + t_cal.s,
                       val_nll=cal.calibration.nll, temperature=cal.temperature, **extra, **gamma)
    return [raw, calibrated]


def fisher_rows(case: CaseA, notes: list[str], fisher_batches: int) -> list[dict[str, object]]:
    """The curvature comparison on the same parameters: Adam's ``v``, tracked and partial-pass Fishers, laplace-torch.

    Each L2M curvature gives two rows, its posterior with the evidence's prior precision (prior mean: the
    pretrained weights) linearized as it is, and linearized + calibrated on validation data;
    ``train_overhead_s`` is what the curvature added to training, ``posthoc_passes`` the passes over the
    training data after it.
    """
    model, seed, n = case.model, case.seed, case.num_train
    explicit = {"num_data": n, "batch_size": case.batch_size}
    rows = _curvature_pair(
        case, "Adam's v (explicit mode)",
        lambda: L2MPosterior.from_optimizer(model, case.opt, mode="explicit", prior_precision="evidence",
                                            prior_mean=case.prior, **explicit),
        notes, "", train_s=case.map_s, train_overhead_s=0.0, posthoc_passes=0,
    )
    tr = case.tracker
    if tr is None:
        raise ValueError("the curvature comparison needs the Fisher tracked during fine-tuning (case.tracker)")
    rows += _curvature_pair(
        case, "Tracked sampled-label Fisher (last epoch)",
        lambda: L2MPosterior.from_fisher(model, tr, num_data=n, prior_precision="evidence", prior_mean=case.prior),
        notes, f" ({tr.tracked} steps, {tr.examples} articles, {tr.seconds:.2f} s on top of {case.map_s:.2f} s of "
        "fine-tuning)", train_s=case.map_s, train_overhead_s=tr.seconds, posthoc_passes=0,
    )
    hidden, mask = case.x_train
    g = torch.Generator().manual_seed(seed + 7)
    order = torch.randperm(n, generator=g)
    b = case.batch_size
    batches = [(hidden[order[i : i + b]], mask[order[i : i + b]]) for i in range(0, n, b)][:fisher_batches]
    found: dict[str, Any] = {}

    def partial() -> L2MPosterior:
        est = fisher_diag(model, batches, max_batches=fisher_batches, seed=seed, forward=lambda m, x: m(*x))
        found["est"] = est
        return L2MPosterior.from_fisher(model, est, num_data=n, prior_precision="evidence", prior_mean=case.prior)

    pair = _curvature_pair(case, f"Partial-pass Fisher ({min(fisher_batches, len(batches))} batches)", partial, notes,
                           "", train_s=case.map_s, train_overhead_s=0.0)
    est = found["est"]
    for r in pair:
        r.update(posthoc_passes=est.examples / n, fisher_batches=est.batches,
                 settled_after=float("nan") if est.settled_after is None else float(est.settled_after))
    notes.append(f"seed {seed}, partial-pass Fisher: {est.batches} batches, {est.examples} articles, "
                 f"{est.seconds:.2f} s; {est.settling()} (changes: "
                 f"{', '.join(f'{c:.3f}' for c in est.changes)})")
    rows += pair
    rows += _laplace_ggn_row(case, notes)
    return rows


def laplace_available(notes: list[str] | None = None) -> bool:
    """Whether laplace-torch imports (a note says why not, once)."""
    try:
        import laplace  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means: skip with a note
        if notes is not None:
            notes.append(f"laplace-torch rows skipped: laplace-torch is not importable ({type(err).__name__}: {err}).")
        return False
    return True


class _Packed(nn.Module):
    """The classifier taking one tensor, (B, T, H + 1): token states with the mask as the last channel.

    laplace-torch passes one input tensor to the model.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x[..., :-1], x[..., -1])


def _pack(x: Inputs) -> Tensor:
    return torch.cat([x[0], x[1].to(x[0].dtype).unsqueeze(-1)], dim=-1)


def _prior_value(la: Any) -> float:
    prior = la.prior_precision
    return float(prior.mean()) if isinstance(prior, Tensor) else float(prior)


def _laplace_ggn_row(case: CaseA, notes: list[str]) -> list[dict[str, object]]:
    """laplace-torch's diagonal GGN Laplace over every fine-tuned parameter (one pass), or nothing and a note."""
    if not laplace_available(notes if case.seed == 0 else None):
        return []
    from laplace import Laplace

    net = _Packed(copy.deepcopy(case.model)).eval()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(_pack(case.x_train), case.y_train), batch_size=1
    )  # one article per Jacobian: laplace-torch's jacrev costs batch^2 backward passes per batch
    with Timer() as t, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = Laplace(net, "classification", subset_of_weights="all", hessian_structure="diag")
        la.fit(loader, progress_bar=case.bars)
        la.optimize_prior_precision(method="marglik")
    notes.append(
        f"seed {case.seed}, laplace-torch diagonal GGN over the {sum(p.numel() for p in net.parameters()):,} "
        f"fine-tuned parameters: fit (one pass, exact GGN from per-example Jacobians) and marginal-likelihood prior "
        f"precision ({_prior_value(la):.3g}) in {t.s:.1f} s; predictive: GLM probit"
    )
    row = score(
        "laplace-torch diag GGN, all fine-tuned parameters (marglik prior, GLM probit)",
        laplace_glm_predictor(la, case.samples, case.seed, transform=_pack, chunk=1),
        case.data,
        train_s=case.map_s,
        train_overhead_s=0.0,
        posthoc_s=t.s,
        posthoc_passes=1,
    )
    return [row]


@torch.no_grad()
def _features(model: LastBlockClassifier, x: Inputs, chunk: int = 256) -> Tensor:
    """(B, H) pooled features (the last layer's input) of ``(hidden, mask)`` inputs, the model in eval mode."""
    was = model.training
    model.eval()
    try:
        return torch.cat([model.features(x[0][i : i + chunk], x[1][i : i + chunk]) for i in range(0, len(x[0]), chunk)])
    finally:
        model.train(was)


def laplace_lll_rows(case: CaseA, rec: Recorder, notes: list[str]) -> list[dict[str, object]]:
    """laplace-torch's last-layer Laplace, diagonal and Kronecker GGN, or nothing and a note.

    The last layer is the linear classifier on the pooled features; those are fixed at the MAP, so the
    Laplace over that layer alone, fitted on the features, is laplace-torch's last-layer Laplace.
    """
    if not laplace_available(notes if case.seed == 0 else None):
        return []
    from laplace import Laplace

    with Timer() as t_feat:
        phi = _features(case.model, case.x_train)
    rows = []
    transform: Callable[[Any], Tensor] = lambda x: _features(case.model, x)  # noqa: E731
    for structure, label in (("diag", "diag"), ("kron", "Kronecker")):
        head = nn.Sequential(copy.deepcopy(case.model.classifier)).eval()
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(phi, case.y_train), batch_size=64)
        with Timer() as t, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            la = Laplace(head, "classification", subset_of_weights="all", hessian_structure=structure)
            la.fit(loader)
            la.optimize_prior_precision(method="marglik")
        notes.append(
            f"seed {case.seed}, laplace-torch last-layer {label} GGN: features {t_feat.s:.2f} s, fit and "
            f"marginal-likelihood prior precision ({_prior_value(la):.3g}) {t.s:.2f} s"
        )
        name = f"laplace-torch last-layer {label} (GLM, marglik prior)"
        rows.append(
            _score(name, laplace_glm_predictor(la, case.samples, case.seed, transform=transform), case, rec,
                   train_s=case.map_s, posthoc_s=t_feat.s + t.s, posthoc_passes=1)
        )
    return rows
