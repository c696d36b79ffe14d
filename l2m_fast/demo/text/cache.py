"""Token states of the frozen lower layers, computed once per article and kept under the output folder.

Case (a) fine-tunes the last block on what the frozen layers make of each article; those states do not
change, so they are computed once (one forward of the embeddings and the first L - 1 layers, float32, no
dropout) and stored in ``<out>/cache/`` as float16 (N, T, H) with the attention mask. The cache is built
lazily: a run computes the articles it needs and have not been computed yet (``--quick`` a few, a full
run the rest) and saves the file; later runs reuse it. Its name carries a fingerprint of the corpus
texts, the checkpoint's weights, the maximum length and the number of frozen layers, so a change of any
of them computes a new one.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .data import BBCCorpus

__all__ = ["CACHE_VERSION", "tokenize", "frozen_states", "model_fingerprint", "FeatureCache", "CacheReport"]

CACHE_VERSION = 1


def tokenize(tokenizer: Any, texts: list[str] | tuple[str, ...], max_length: int) -> tuple[Tensor, Tensor]:
    """WordPiece token ids, truncated and padded to ``max_length``.

    Returns:
        input_ids (N, T) int64 and attention_mask (N, T) int64 (1 for tokens, 0 for padding), T = max_length.
    """
    enc = tokenizer(list(texts), max_length=max_length, truncation=True, padding="max_length", return_tensors="pt")
    return enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)


@torch.no_grad()
def frozen_states(bert: nn.Module, input_ids: Tensor, mask: Tensor, layers: int) -> Tensor:
    """The token states after the embeddings and the first ``layers`` layers (eval mode, no dropout).

    Args:
        bert: a ``transformers`` BERT encoder.
        input_ids: (B, T) int64.
        mask: (B, T) attention mask.
        layers: how many of its layers to run.

    Returns:
        (B, T, H) float32.
    """
    was = bert.training
    full = bert.encoder.layer
    bert.eval()
    bert.encoder.layer = nn.ModuleList(list(full)[:layers])
    try:
        return bert(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
    finally:
        bert.encoder.layer = full
        bert.train(was)


def model_fingerprint(folder: Path) -> str:
    """A hash of the checkpoint's config and weights files."""
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        with (folder / name).open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:16]


@dataclass
class CacheReport:
    """What a run did with the cache.

    Attributes:
        path: the cache file.
        reused: articles read from the file.
        computed: articles computed in this run.
        seconds: time spent computing them (tokenising included).
        rebuilt: why an existing file was not used ("" when it was, or none existed).
    """

    path: Path
    reused: int = 0
    computed: int = 0
    seconds: float = 0.0
    rebuilt: str = ""

    def __str__(self) -> str:
        what = f"frozen-layer cache {self.path}: {self.reused} articles reused, {self.computed} computed"
        if self.computed:
            what += f" in {self.seconds:.1f} s"
        return what + (f" ({self.rebuilt})" if self.rebuilt else "")


class FeatureCache:
    """The frozen layers' token states for every article of a corpus, on disk, computed on demand.

    Args:
        folder: where the cache file lives (created if needed).
        corpus: the corpus (its order indexes the cache).
        bert: the pretrained encoder.
        tokenizer: its tokenizer.
        model_folder: the checkpoint folder (for the fingerprint).
        max_length: T, tokens per article. Default 128.
        layers: frozen layers (default: all but the last).
        batch_size: articles per forward when computing.
    """

    def __init__(
        self,
        folder: Path,
        corpus: BBCCorpus,
        bert: nn.Module,
        tokenizer: Any,
        model_folder: Path,
        *,
        max_length: int = 128,
        layers: int | None = None,
        batch_size: int = 32,
    ) -> None:
        self.corpus, self.bert, self.tokenizer = corpus, bert, tokenizer
        self.max_length = int(max_length)
        self.layers = len(bert.encoder.layer) - 1 if layers is None else int(layers)
        self.batch_size = batch_size
        fp = hashlib.sha256(
            f"{CACHE_VERSION}|{corpus.fingerprint()}|{model_fingerprint(model_folder)}|{self.max_length}|"
            f"{self.layers}".encode()
        ).hexdigest()[:16]
        self.fingerprint = fp
        self.path = Path(folder) / f"minilm_frozen{self.layers}_len{self.max_length}_{fp}.pt"
        self.report = CacheReport(self.path)
        n, h = len(corpus), int(bert.config.hidden_size)
        self._states: Tensor | None = None
        self._mask: Tensor | None = None
        self._done = torch.zeros(n, dtype=torch.bool)
        self._shape = (n, self.max_length, h)
        self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        try:
            st = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            ok = (
                isinstance(st, dict)
                and st.get("version") == CACHE_VERSION
                and st.get("fingerprint") == self.fingerprint
                and tuple(st["states"].shape) == self._shape
                and tuple(st["done"].shape) == self._shape[:1]
            )
        except Exception as err:  # noqa: BLE001 - a damaged file is rebuilt, whatever the damage
            self.report.rebuilt = f"the existing file was unreadable ({type(err).__name__}), rebuilt"
            return
        if not ok:
            self.report.rebuilt = "the existing file did not match, rebuilt"
            return
        # memory-mapped copy-on-write: reading touches only the articles asked for, writing leaves the file as is
        self._states, self._mask, self._done = st["states"], st["mask"], st["done"].clone()

    def missing(self, indices: Tensor) -> Tensor:
        """(k,) the corpus indices among ``indices`` not computed yet."""
        idx = torch.unique(indices)
        return idx[~self._done[idx]]

    def ensure(self, indices: Tensor, bar: Callable[[str, int], Any] | None = None) -> CacheReport:
        """Computes the articles among ``indices`` not in the cache yet, then saves the file.

        Args:
            indices: (k,) corpus indices.
            bar: ``bar(description, total)`` returning a tqdm-like object, or None.
        """
        todo = self.missing(indices)
        self.report.reused += int(len(torch.unique(indices)) - len(todo))
        if len(todo) == 0:
            return self.report
        t0 = time.perf_counter()
        if self._states is None:
            self._states = torch.zeros(self._shape, dtype=torch.float16)
            self._mask = torch.zeros(self._shape[:2], dtype=torch.int8)
        ids, mask = tokenize(self.tokenizer, [self.corpus.texts[i] for i in todo.tolist()], self.max_length)
        b = bar(f"frozen layers 1-{self.layers} (cached once)", len(todo)) if bar else None
        for s in range(0, len(todo), self.batch_size):
            sl = slice(s, s + self.batch_size)
            states = frozen_states(self.bert, ids[sl], mask[sl], self.layers)
            self._states[todo[sl]] = states.to(torch.float16)
            self._mask[todo[sl]] = mask[sl].to(torch.int8)
            if b is not None:
                b.update(len(states))
        if b is not None:
            b.close()
        self._done[todo] = True
        self._save()
        self.report.computed += len(todo)
        self.report.seconds += time.perf_counter() - t0
        return self.report

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        state = {"version": CACHE_VERSION, "fingerprint": self.fingerprint, "states": self._states,
                 "mask": self._mask, "done": self._done}
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def get(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """The cached states of ``indices`` (all must be computed: :meth:`ensure` first).

        Returns:
            hidden (k, T, H) float32 and mask (k, T) int64.
        """
        if self._states is None or not bool(self._done[indices].all()):
            raise RuntimeError("some articles are not in the cache yet: call ensure(indices) first")
        return self._states[indices].float(), self._mask[indices].to(torch.int64)
