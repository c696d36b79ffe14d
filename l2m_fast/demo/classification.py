"""Classification, the paper's future work: L2M on an MLP for scikit-learn's digits, against peers.

Data: ``sklearn.datasets.load_digits`` (1,797 8x8 images, shipped with scikit-learn, no download),
pixels scaled to [0, 1]. The classifier sees classes 0-7 only: a stratified 70/30 train/test split, and
a validation set (15% of the training images, stratified) carved from the training split for every
method that calibrates; the test set is never used to fit anything. Out-of-distribution inputs:

* **held-out classes**: the images of 8 and 9. Same pen, same pixel statistics, shapes never seen:
  a semantic shift, the hard case.
* **pixel-permuted**: the test images with their 64 pixels shuffled by one fixed permutation. Same
  intensity histogram, no digit structure: a covariate shift any model should flag.

Methods (rows): the MAP; the temperature-scaled MAP (Guo et al. 2017); L2M in paper and explicit
modes, sampled and linearized, raw and calibrated (:mod:`l2m_fast.calibration`), explicit mode with
the evidence's prior precision; L2M with a sampled-label Fisher tracked over the last epoch, and one
from a partial pass after training (:mod:`l2m_fast.fisher`); MC dropout; a deep ensemble; an ensemble
of L2M posteriors; laplace-torch's diagonal GGN Laplace with its marginal-likelihood prior precision and
GLM probit predictive (optional: skipped with a note when not installed). Every row is the mean and
standard deviation over ``seeds``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..ensemble import L2MEnsemble
from ..fisher import FisherTracker, fisher_diag
from ..posterior import L2MPosterior
from .cls_eval import (
    EvalData,
    Predicted,
    l2m_predictor,
    laplace_glm_predictor,
    map_predictor,
    mc_dropout_predictor,
    members_predictor,
    score,
)
from .common import TimedTracker, Timer
from .tables import aggregate_seeds

__all__ = [
    "ClsConfig",
    "CLS_COLUMNS",
    "digits_splits",
    "digits_mlp",
    "train_classifier",
    "softmax_mean",
    "run_classification",
]

CLS_COLUMNS = (
    ("method", "method"),
    ("acc", "accuracy"),
    ("nll", "NLL"),
    ("ece", "ECE"),
    ("brier", "Brier"),
    ("auroc_heldout_entropy", "AUROC held-out 8/9"),
    ("auroc_permuted_entropy", "AUROC permuted"),
    ("auroc_permuted_mi", "AUROC permuted (MI)"),
    ("train_s", "train s"),
    ("posthoc_s", "post-hoc s"),
    ("posthoc_passes", "post-hoc data passes"),
    ("predict_s", "predict s"),
)

IN_CLASSES = 8


@dataclass
class ClsConfig:
    """Budget of the classification comparison.

    Attributes:
        epochs: Adam epochs (mini-batches of ``batch_size``).
        batch_size: mini-batch size.
        lr: Adam learning rate.
        weight_decay: Adam's (L2) weight decay, the prior of both L2M modes.
        hidden: width of the two hidden layers.
        samples: predictive samples per sampling method (split across members for the L2M ensemble).
        calibration_samples: samples of the calibration's predictive (default: ``samples``, so that the
            temperature is fitted for the predictive it is used with).
        ensemble_size: members of the deep ensemble and of the L2M ensemble.
        dropout: MC dropout probability.
        fisher_batches: batches of the partial-pass Fisher (``fisher_diag``).
        val_fraction: share of the training split kept for validation.
        seeds: seeds of the split, initialisation and sampling; one table row per method, over all.
    """

    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-3
    hidden: int = 128
    samples: int = 100
    calibration_samples: int | None = None
    ensemble_size: int = 5
    dropout: float = 0.1
    fisher_batches: int = 8
    val_fraction: float = 0.15
    seeds: tuple[int, ...] = (0, 1, 2)


def digits_splits(seed: int = 0, val_fraction: float = 0.15) -> dict[str, Tensor]:
    """The digits data split as described in the module docstring.

    Returns:
        ``x_train`` (N, 64), ``y_train`` (N,), ``x_val`` (V, 64), ``y_val`` (V,), ``x_test`` (T, 64),
        ``y_test`` (T,), ``x_heldout`` (H, 64), ``x_permuted`` (T, 64); float32 inputs in [0, 1], int64
        labels in [0, 8). ``val_fraction=0`` keeps the whole training split (no validation set).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.int64)
    ind = y < IN_CLASSES
    xi, yi = x[ind].numpy(), y[ind].numpy()
    xtr, xte, ytr, yte = train_test_split(xi, yi, test_size=0.3, random_state=seed, stratify=yi)
    if val_fraction > 0:
        xtr, xva, ytr, yva = train_test_split(xtr, ytr, test_size=val_fraction, random_state=seed, stratify=ytr)
    else:
        xva, yva = xtr[:0], ytr[:0]
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(seed + 99))
    xte_t = torch.from_numpy(xte)
    return {
        "x_train": torch.from_numpy(xtr),
        "y_train": torch.from_numpy(ytr),
        "x_val": torch.from_numpy(xva),
        "y_val": torch.from_numpy(yva),
        "x_test": xte_t,
        "y_test": torch.from_numpy(yte),
        "x_heldout": x[~ind],
        "x_permuted": xte_t[:, perm],
    }


def digits_mlp(cfg: ClsConfig, dropout: float = 0.0) -> nn.Sequential:
    """The digits classifier: ``64 -> hidden -> hidden -> 8`` with ReLU (and dropout when asked)."""
    from .toy import mlp

    return mlp(cfg.hidden, dropout=dropout, in_features=64, out_features=IN_CLASSES)


def train_classifier(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: ClsConfig,
    seed: int,
    bar: object | None = None,
    tracker: FisherTracker | None = None,
) -> torch.optim.Adam:
    """Mini-batch Adam (L2 weight decay) on the cross-entropy, in place; returns the optimizer (its second moment).

    Args:
        model: the classifier.
        x: (N, 64) inputs.
        y: (N,) labels.
        cfg: epochs, batch size, learning rate, weight decay.
        seed: seed of the mini-batch order.
        bar: optional tqdm-like bar, advanced once per epoch.
        tracker: optional Fisher tracker, updated with every step's logits before the backward.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = x.shape[0]
    model.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            logits = model(x[idx])
            if tracker is not None:
                tracker.update(logits)
            nn.functional.cross_entropy(logits, y[idx]).backward()
            opt.step()
        if bar is not None:
            bar.update(1)  # type: ignore[attr-defined]
    model.eval()
    return opt


def softmax_mean(logits: Tensor) -> Tensor:
    """(S, B, C) logits -> (B, C) mean of the softmax over samples."""
    return torch.softmax(logits.double(), -1).mean(0)


def _seed_rows(cfg: ClsConfig, seed: int, mk: Callable[[str, int], object], notes: list[str]) -> list[dict]:
    """Every method of one seed (the rows of its table)."""
    d = digits_splits(seed, cfg.val_fraction)
    x, y = d["x_train"], d["y_train"]
    n = x.shape[0]
    data = EvalData(
        d["x_test"], d["y_test"], {"heldout": d["x_heldout"], "permuted": d["x_permuted"]}, d["x_val"], d["y_val"]
    )
    S = cfg.samples
    Sc = cfg.calibration_samples or S
    rows: list[dict] = []

    def add(name: str, predictor: Callable, train_s: float, posthoc_s: float, passes: float) -> None:
        rows.append(score(name, predictor, data, train_s=train_s, posthoc_s=posthoc_s, posthoc_passes=passes))

    def close(b: object) -> None:
        if b is not None:
            b.close()  # type: ignore[attr-defined]

    # ensemble members; member 0 is the MAP network of the single-model methods, trained with the tracker
    steps_per_epoch = -(-n // cfg.batch_size)
    members, opts, train_times, trackers = [], [], [], []
    b = mk(f"seed {seed}: deep ensemble (Adam)", cfg.epochs * cfg.ensemble_size)
    for k in range(cfg.ensemble_size):
        torch.manual_seed(seed * 1000 + 10 + k)
        m = digits_mlp(cfg)
        if k == 0:  # the MAP network: the sampled-label Fisher tracked over its last epoch
            trackers.append(TimedTracker(m, start=steps_per_epoch * (cfg.epochs - 1), seed=seed))
        with Timer() as t:
            opts.append(train_classifier(m, x, y, cfg, seed * 1000 + 100 + k, b, trackers[0] if k == 0 else None))
        members.append(m)
        train_times.append(t.s)
    close(b)
    tracker = trackers[0]
    model, opt, t_map = members[0], opts[0], train_times[0] - tracker.seconds
    add("MAP", map_predictor(model), t_map, 0.0, 0)
    with Timer() as t:
        ts_map = L2MPosterior.from_optimizer(model, opt).scaled(0.0).calibrated(model, data.x_val, data.y_val)
    add("Temperature-scaled MAP", l2m_predictor(ts_map, model, 1, seed), t_map, t.s, 0)

    explicit = {"num_data": n, "batch_size": cfg.batch_size}
    for mode, options in (("paper", {}), ("explicit", explicit)):
        with Timer() as t:
            post = L2MPosterior.from_optimizer(model, opt, mode=mode, **options)
        t_build = t.s
        add(f"L2M {mode}, sampled", l2m_predictor(post, model, S, seed), t_map, t_build, 0)
        add(f"L2M {mode}, linearized", l2m_predictor(post, model, S, seed, linearized=True), t_map, t_build, 0)
        for lin in (True, False):
            with Timer() as t:
                cal = post.calibrated(model, data.x_val, data.y_val, linearized=lin, num_samples=Sc, seed=seed)
            how = "linearized" if lin else "sampled"
            notes.append(f"seed {seed}, L2M {mode} {how}: {cal.calibration}")
            add(
                f"L2M {mode}, {how} + calibrated",
                l2m_predictor(cal, model, S, seed, linearized=lin),
                t_map,
                t_build + t.s,
                0,
            )
    with Timer() as t, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        ev = L2MPosterior.from_optimizer(model, opt, mode="explicit", prior_precision="evidence", **explicit)
        ev_cal = ev.calibrated(model, data.x_val, data.y_val, num_samples=Sc, seed=seed)
    notes.append(
        f"seed {seed}, L2M explicit with the evidence's prior: {ev.evidence}"
        + ("; warned: curvature vanished" if caught else "")
    )
    add(
        "L2M explicit (evidence prior), linearized + calibrated",
        l2m_predictor(ev_cal, model, S, seed, linearized=True),
        t_map,
        t.s,
        0,
    )

    # the sampled-label Fisher: tracked over the last epoch, and from a partial pass after training
    with Timer() as t:
        fpost = L2MPosterior.from_fisher(model, tracker, num_data=n, prior_precision="evidence")
        fcal = fpost.calibrated(model, data.x_val, data.y_val, num_samples=Sc, seed=seed)
    notes.append(
        f"seed {seed}, tracked Fisher (last epoch, {tracker.tracked} steps, {tracker.seconds:.2f} s of "
        f"{train_times[0]:.2f} s training): {fpost.evidence}; {fcal.calibration}"
    )
    add(
        "L2M tracked Fisher (evidence prior), linearized + calibrated",
        l2m_predictor(fcal, model, S, seed, linearized=True),
        train_times[0],
        t.s,
        0,
    )
    with Timer() as t:
        g = torch.Generator().manual_seed(seed + 7)
        order = torch.randperm(n, generator=g)
        batches = [x[order[i : i + cfg.batch_size]] for i in range(0, n, cfg.batch_size)]
        est = fisher_diag(model, batches, max_batches=cfg.fisher_batches, seed=seed)
        dpost = L2MPosterior.from_fisher(model, est, num_data=n, prior_precision="evidence")
        dcal = dpost.calibrated(model, data.x_val, data.y_val, num_samples=Sc, seed=seed)
    notes.append(
        f"seed {seed}, partial-pass Fisher ({est.batches} batches, {est.examples} images; {est.settling()}): "
        f"{dpost.evidence}"
    )
    add(
        f"L2M partial-pass Fisher ({est.batches} batches), linearized + calibrated",
        l2m_predictor(dcal, model, S, seed, linearized=True),
        t_map,
        t.s,
        est.examples / n,
    )

    torch.manual_seed(seed * 1000 + 5)
    drop = digits_mlp(cfg, dropout=cfg.dropout)
    b = mk(f"seed {seed}: MC dropout", cfg.epochs)
    with Timer() as t:
        train_classifier(drop, x, y, cfg, seed * 1000 + 200, b)
    close(b)
    add("MC dropout", mc_dropout_predictor(drop, S, seed), t.s, 0.0, 0)
    t_ens = sum(train_times)
    add(f"Deep ensemble (M={cfg.ensemble_size})", members_predictor(members), t_ens, 0.0, 0)
    with Timer() as t:
        ens = L2MEnsemble(
            [(m, L2MPosterior.from_optimizer(m, o, mode="explicit", **explicit)) for m, o in zip(members, opts)]
        )
    per = max(1, S // cfg.ensemble_size)

    def l2m_ens(xq: Tensor) -> Predicted:
        pred = ens.predict(xq, per, seed, task="classification", linearized=True, progress=False)
        return Predicted(pred.probs.double(), pred.mutual_info.double())

    add(f"L2M ensemble (explicit, linearized, M={cfg.ensemble_size})", l2m_ens, t_ens, t.s, 0)
    rows.append(_laplace_row(model, x, y, cfg, data, t_map, notes, seed))
    return [r for r in rows if r]


def run_classification(
    cfg: ClsConfig, *, bar: Callable[[str, int], object] | None = None
) -> tuple[list[dict[str, object]], list[str], list[list[dict[str, object]]]]:
    """Trains and scores every method for every seed.

    Args:
        cfg: the budget.
        bar: ``bar(description, total)`` returning a tqdm-like object, or None.

    Returns:
        The table rows (mean and ``_sd`` over the seeds, keys of :data:`CLS_COLUMNS`), notes to print
        under the table, and the rows of each seed.
    """
    mk = bar or (lambda d, t: None)
    notes: list[str] = []
    per_seed = [_seed_rows(cfg, seed, mk, notes) for seed in cfg.seeds]
    d = digits_splits(cfg.seeds[0], cfg.val_fraction)
    head = (
        f"{len(d['y_train'])} training and {len(d['y_val'])} validation images of classes 0-7, {len(d['y_test'])} "
        f"test images; OOD: {len(d['x_heldout'])} images of 8 and 9, and the test images pixel-permuted. AUROC "
        f"scores OOD by predictive entropy (MI: mutual information). Adam lr {cfg.lr}, weight decay "
        f"{cfg.weight_decay}, batch {cfg.batch_size}, {cfg.epochs} epochs; {cfg.samples} predictive samples, "
        f"{cfg.calibration_samples or cfg.samples} for calibration; L2M explicit: num_data = training images, "
        f"batch_size {cfg.batch_size}. Mean ± sd over seeds {list(cfg.seeds)}."
    )
    return aggregate_seeds(per_seed), [head, *notes], per_seed


def _laplace_row(
    model: nn.Module, x: Tensor, y: Tensor, cfg: ClsConfig, data: EvalData, t_map: float, notes: list[str], seed: int
) -> dict[str, object]:
    """laplace-torch's diagonal GGN Laplace on a copy of the MAP network, or an empty row and a note."""
    try:
        from laplace import Laplace
    except Exception as e:  # noqa: BLE001 - any import failure means: skip with a note
        why = f"{type(e).__name__}: {e}"
        if seed == cfg.seeds[0]:
            notes.append(f"laplace-torch diagonal Laplace skipped: laplace-torch is not importable ({why}).")
        return {}
    import copy

    net = copy.deepcopy(model)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=cfg.batch_size)
    with Timer() as t, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = Laplace(net, "classification", subset_of_weights="all", hessian_structure="diag")
        la.fit(loader)
        la.optimize_prior_precision(method="marglik")
    prior = la.prior_precision
    prior = float(prior.mean()) if isinstance(prior, Tensor) else float(prior)
    notes.append(
        f"seed {seed}, laplace-torch diagonal GGN Laplace: fit (one pass over the training data) and "
        f"marginal-likelihood prior precision ({prior:.3g}) in {t.s:.2f} s; predictive: GLM probit, mutual "
        f"information from {cfg.samples} samples of the GLM's Gaussian over the logits."
    )

    return score(
        "laplace-torch diag GGN (marglik prior, GLM probit)",
        laplace_glm_predictor(la, cfg.samples, seed),
        data,
        train_s=t_map,
        posthoc_s=t.s,
        posthoc_passes=1,
    )
