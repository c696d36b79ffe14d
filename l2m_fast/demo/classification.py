"""Classification, the paper's future work: L2M on an MLP for scikit-learn's digits, against peers.

Data: ``sklearn.datasets.load_digits`` (1,797 8x8 images, shipped with scikit-learn, no download),
pixels scaled to [0, 1]. The classifier sees classes 0-7 only (stratified 70/30 split, fixed seed).
Out-of-distribution inputs, scored by predictive entropy:

* **held-out classes**: the images of 8 and 9. Same pen, same pixel statistics, shapes never seen:
  a semantic shift, the hard case.
* **pixel-permuted**: the in-distribution test images with their 64 pixels shuffled by one fixed
  permutation. Same intensity histogram, no digit structure: a covariate shift any model should flag.

Methods: MAP; L2M paper and explicit modes (zero passes over the data after training); MC dropout;
a deep ensemble; an ensemble of L2M (explicit) posteriors, one per member; laplace-torch's diagonal
Laplace (optional: skipped with a note when not installed), its prior precision tuned by marginal
likelihood and its predictive the GLM probit approximation, its defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .common import Timer
from .l2m_method import build_l2m, l2m_samples
from .metrics import accuracy, auroc, brier_score, categorical_nll, entropy, expected_calibration_error

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
    ("auroc_heldout", "AUROC held-out 8/9"),
    ("auroc_permuted", "AUROC permuted"),
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
        ensemble_size: members of the deep ensemble and of the L2M ensemble.
        dropout: MC dropout probability.
        seed: seed of the split, initialisation and sampling.
    """

    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-3
    hidden: int = 128
    samples: int = 100
    ensemble_size: int = 5
    dropout: float = 0.1
    seed: int = 0


def digits_splits(seed: int = 0) -> dict[str, Tensor]:
    """The digits data split as described in the module docstring.

    Returns:
        ``x_train`` (N, 64), ``y_train`` (N,), ``x_test`` (T, 64), ``y_test`` (T,), ``x_heldout`` (H, 64),
        ``x_permuted`` (T, 64); float32 inputs in [0, 1], int64 labels in [0, 8).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.int64)
    ind = y < IN_CLASSES
    xi, yi = x[ind].numpy(), y[ind].numpy()
    xtr, xte, ytr, yte = train_test_split(xi, yi, test_size=0.3, random_state=seed, stratify=yi)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(seed + 99))
    xte_t = torch.from_numpy(xte)
    return {
        "x_train": torch.from_numpy(xtr),
        "y_train": torch.from_numpy(ytr),
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
    model: nn.Module, x: Tensor, y: Tensor, cfg: ClsConfig, seed: int, bar: object | None = None
) -> torch.optim.Adam:
    """Mini-batch Adam (L2 weight decay) on the cross-entropy, in place; returns the optimizer (its second moment).

    Args:
        model: the classifier.
        x: (N, 64) inputs.
        y: (N,) labels.
        cfg: epochs, batch size, learning rate, weight decay.
        seed: seed of the mini-batch order.
        bar: optional tqdm-like bar, advanced once per epoch.
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
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        if bar is not None:
            bar.update(1)  # type: ignore[attr-defined]
    model.eval()
    return opt


def _scores(name: str, predict: Callable[[Tensor], Tensor], data: dict[str, Tensor]) -> dict[str, object]:
    with Timer() as t:
        p_in = predict(data["x_test"])
        p_held = predict(data["x_heldout"])
        p_perm = predict(data["x_permuted"])
    y = data["y_test"]
    h_in = entropy(p_in)
    return {
        "method": name,
        "acc": accuracy(p_in, y),
        "nll": categorical_nll(p_in, y),
        "ece": expected_calibration_error(p_in, y),
        "brier": brier_score(p_in, y),
        "auroc_heldout": auroc(h_in, entropy(p_held)),
        "auroc_permuted": auroc(h_in, entropy(p_perm)),
        "predict_s": t.s,
    }


def softmax_mean(logits: Tensor) -> Tensor:
    """(S, B, C) logits -> (B, C) mean of the softmax over samples."""
    return torch.softmax(logits.double(), -1).mean(0)


def run_classification(
    cfg: ClsConfig, *, bar: Callable[[str, int], object] | None = None
) -> tuple[list[dict[str, object]], list[str]]:
    """Trains and scores every method.

    Args:
        cfg: the budget.
        bar: ``bar(description, total)`` returning a tqdm-like object, or None.

    Returns:
        The table rows (keys of :data:`CLS_COLUMNS`) and notes to print under the table.
    """
    data = digits_splits(cfg.seed)
    x, y = data["x_train"], data["y_train"]
    n = x.shape[0]
    mk = bar or (lambda d, t: None)
    notes = [
        f"{n} training images of classes 0-7, {len(data['y_test'])} test images; OOD: "
        f"{len(data['x_heldout'])} images of 8 and 9, and the test images pixel-permuted. AUROC scores OOD by "
        "predictive entropy. Adam lr "
        f"{cfg.lr}, weight decay {cfg.weight_decay}, batch {cfg.batch_size}, {cfg.epochs} epochs; "
        f"{cfg.samples} predictive samples; L2M explicit: num_data={n}, batch_size={cfg.batch_size}, "
        "prior precision num_data x weight decay."
    ]
    rows: list[dict[str, object]] = []

    def close(b: object) -> None:
        if b is not None:
            b.close()  # type: ignore[attr-defined]

    # ensemble members; member 0 is the MAP network of the single-model methods
    members, opts, train_times = [], [], []
    b = mk("deep ensemble (Adam)", cfg.epochs * cfg.ensemble_size)
    for k in range(cfg.ensemble_size):
        torch.manual_seed(cfg.seed + 10 + k)
        m = digits_mlp(cfg)
        with Timer() as t:
            opts.append(train_classifier(m, x, y, cfg, cfg.seed + 100 + k, b))
        members.append(m)
        train_times.append(t.s)
    close(b)
    model, opt, t_map = members[0], opts[0], train_times[0]

    @torch.no_grad()
    def map_predict(xq: Tensor) -> Tensor:
        return torch.softmax(model(xq).double(), -1)

    rows.append({**_scores("MAP", map_predict, data), "train_s": t_map, "posthoc_s": 0.0, "posthoc_passes": 0})

    explicit = {"num_data": n, "batch_size": cfg.batch_size}
    for mode, options in (("paper", {}), ("explicit", explicit)):
        with Timer() as t:
            post = build_l2m(model, opt, mode, **options)
        pred = lambda xq, post=post: softmax_mean(l2m_samples(post, model, xq, cfg.samples, cfg.seed))
        rows.append(
            {**_scores(f"L2M ({mode} mode)", pred, data), "train_s": t_map, "posthoc_s": t.s, "posthoc_passes": 0}
        )

    torch.manual_seed(cfg.seed + 5)
    drop = digits_mlp(cfg, dropout=cfg.dropout)
    b = mk("MC dropout", cfg.epochs)
    with Timer() as t:
        train_classifier(drop, x, y, cfg, cfg.seed + 200, b)
    close(b)

    @torch.no_grad()
    def dropout_predict(xq: Tensor) -> Tensor:
        drop.train()
        torch.manual_seed(cfg.seed + 6)
        out = softmax_mean(torch.stack([drop(xq) for _ in range(cfg.samples)]))
        drop.eval()
        return out

    rows.append({**_scores("MC dropout", dropout_predict, data), "train_s": t.s, "posthoc_s": 0.0, "posthoc_passes": 0})

    @torch.no_grad()
    def ens_predict(xq: Tensor) -> Tensor:
        return softmax_mean(torch.stack([m(xq) for m in members]))

    t_ens = sum(train_times)
    rows.append(
        {
            **_scores(f"Deep ensemble (M={cfg.ensemble_size})", ens_predict, data),
            "train_s": t_ens,
            "posthoc_s": 0.0,
            "posthoc_passes": 0,
        }
    )

    with Timer() as t:
        posts = [build_l2m(m, o, "explicit", **explicit) for m, o in zip(members, opts)]
    per = max(1, cfg.samples // cfg.ensemble_size)

    def l2m_ens_predict(xq: Tensor) -> Tensor:
        return softmax_mean(
            torch.cat([l2m_samples(p, m, xq, per, cfg.seed + k) for k, (p, m) in enumerate(zip(posts, members))])
        )

    rows.append(
        {
            **_scores(f"L2M ensemble (explicit, M={cfg.ensemble_size})", l2m_ens_predict, data),
            "train_s": t_ens,
            "posthoc_s": t.s,
            "posthoc_passes": 0,
        }
    )
    rows.append(_laplace_row(model, x, y, cfg, data, t_map, notes))
    return [r for r in rows if r], notes


def _laplace_row(
    model: nn.Module, x: Tensor, y: Tensor, cfg: ClsConfig, data: dict[str, Tensor], t_map: float, notes: list[str]
) -> dict[str, object]:
    """laplace-torch's diagonal Laplace on a copy of the MAP network, or an empty row and a note."""
    try:
        from laplace import Laplace
    except Exception as e:  # noqa: BLE001 - any import failure means: skip with a note
        why = f"{type(e).__name__}: {e}"
        notes.append(f"laplace-torch diagonal Laplace skipped: laplace-torch is not importable ({why}).")
        return {}
    import copy

    net = copy.deepcopy(model)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=cfg.batch_size)
    with Timer() as t:
        la = Laplace(net, "classification", subset_of_weights="all", hessian_structure="diag")
        la.fit(loader)
        la.optimize_prior_precision(method="marglik")
    prior = la.prior_precision
    prior = float(prior.mean()) if isinstance(prior, Tensor) else float(prior)
    notes.append(
        f"laplace-torch diagonal Laplace: fit (one pass over the training data) and marginal-likelihood prior "
        f"precision ({prior:.3g}) in {t.s:.2f} s; predictive: GLM with probit link."
    )

    @torch.no_grad()
    def la_predict(xq: Tensor) -> Tensor:
        return la(xq, pred_type="glm", link_approx="probit").double()

    return {**_scores("laplace-torch diag", la_predict, data), "train_s": t_map, "posthoc_s": t.s, "posthoc_passes": 1}
