"""CPU sampler benchmark: the fused C++ kernel against PyTorch baselines, same-run fill_/copy_ and its variants.

Run as a script for the tables (``python benchmarks/bench_cpu_sampler.py``), or with pytest-benchmark
(``pytest benchmarks/bench_cpu_sampler.py``). Timing, bandwidth and labels come from the project's
harness :mod:`l2m_fast.benchmarking`: every method of a table runs once untimed, then all are timed
round after round, interleaved (so load from other processes hits them alike); the figure is the
median over rounds. GB/s counts bytes read plus written (:func:`~l2m_fast.benchmarking.sampler_bytes`
for the sampler, twice the bytes for a copy).

Sampler table, per (P, S), all writing S samples of P float32 elements into a buffer touched
beforehand unless said otherwise (``sigma = 1/sqrt(a v + b)`` computed inside each):

* ``fused op``: ``l2m_fast.ops.sample_diag_gaussian(..., out=, validate=False)``; ``validated``: the
  same with ``validate=True`` (the value check fused into the kernel's pass over v); ``allocating``: a
  fresh output each call (its page faults included);
* ``baseline kernel``: with ``--baseline REV``, the C++ kernel of git revision REV built aside
  (its library renamed ``l2m_fast_cpu_baseline``), the same call through the raw op;
* ``batched``: ``torch.randn(S, P)`` then ``addcmul``; ``naive loop``: per sample ``randn`` + ``addcmul``;
* ``torch.randn``: ``torch.randn(S * P)`` into the buffer (normals alone, no Gaussian);
* ``fill_`` / ``copy_``: the output bytes written once / copied (the store and copy ceilings);
* ``kernel variant``: the fused kernel with one part dropped (``sample_variant``), to find the limit.

Validated-copy table (P = 1e8 by default): ``l2m_fast.ops.copy_checked_`` against ``dst.copy_(src)``
for float32 and bfloat16 sources, into a warm destination and into a fresh ``torch.empty``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from l2m_fast.benchmarking import gbs, run_header, sampler_backend, sampler_bytes, time_interleaved
from l2m_fast.ops import copy_checked_, sample_diag_gaussian
from l2m_fast.ops import cpu as cpu_backend

_ROOT = Path(__file__).resolve().parents[1]
_VARIANTS = {1: "no Box-Muller", 2: "no Philox", 3: "no stores", 4: "stores only"}
_BASELINE_LIB = "l2m_fast_cpu_baseline"
FUSED = "fused op, out= (warm)"


def build_baseline(rev: str, build_dir: str) -> object:
    """Builds the C++ kernel of git revision ``rev`` aside and loads it as ``torch.ops.l2m_fast_cpu_baseline``.

    The sources of ``csrc/`` at ``rev`` are copied with their library and C++ namespace renamed (so that
    both kernels live in one process) and compiled with the flags of this checkout.

    Args:
        rev: a git revision of this repository (e.g. ``main`` or a commit).
        build_dir: where to build (created if needed).

    Returns:
        ``torch.ops.l2m_fast_cpu_baseline``.
    """
    from torch.utils.cpp_extension import load

    from l2m_fast.ops.cpu import CFLAGS

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=_ROOT, capture_output=True, text=True, check=True).stdout

    dest = Path(build_dir)
    dest.mkdir(parents=True, exist_ok=True)
    names = [Path(p).name for p in git("ls-tree", "--name-only", rev, "csrc/").split()]
    for name in names:
        text = git("show", f"{rev}:csrc/{name}").replace("l2m_fast_cpu", _BASELINE_LIB)
        (dest / name).write_text(text)
    sources = [str(dest / n) for n in ("sampler_op.cpp", "sampler_kernels.cpp") if n in names]
    openmp = ["-fopenmp"] if torch._C.has_openmp else []
    load(name=_BASELINE_LIB, sources=sources, extra_cflags=[*CFLAGS, *openmp], extra_ldflags=openmp,
         build_directory=str(dest), is_python_module=False, verbose=False)
    return getattr(torch.ops, _BASELINE_LIB)


def _problem(num_elements: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(num_elements, generator=g)
    v = torch.rand(num_elements, generator=g)
    return dict(theta=theta, v=v, a=torch.ones(1), b=torch.full((1,), 0.1), bounds=torch.tensor([0, num_elements]))


def make_cases(num_elements: int, num_samples: int, *, baselines: bool = True, variants: bool = True,
               baseline_ops: object | None = None) -> dict[str, Callable[[], object]]:
    """Zero-argument callables per method, each producing S x P float32 samples (or writing that many bytes)."""
    p = _problem(num_elements)
    theta, v, a, b, bounds = p["theta"], p["v"], p["a"], p["b"], p["bounds"]
    out = torch.empty(num_samples, num_elements).fill_(0)
    src = torch.ones_like(out)

    def fused(buf: torch.Tensor | None, validate: bool) -> torch.Tensor:
        return sample_diag_gaussian(theta, v, num_samples, a=a, b=b, bounds=bounds, seed=1, out=buf, validate=validate)

    cases: dict[str, Callable[[], object]] = {
        FUSED: lambda: fused(out, False),
        "fused op, out=, validated": lambda: fused(out, True),
        "fused op, allocating": lambda: fused(None, False),
    }
    if baseline_ops is not None:
        cases["baseline kernel, out= (warm)"] = lambda: baseline_ops.sample_diag_gaussian_out(
            theta, v, a, b, bounds, 1, 0, 0, out)
    if baselines:
        tmp = torch.empty(num_samples, num_elements)
        row = torch.empty(num_elements)

        def batched() -> None:
            torch.randn(num_samples, num_elements, out=tmp)
            torch.addcmul(theta, tmp, torch.rsqrt(a * v + b), out=out)

        def naive() -> None:
            sigma = torch.rsqrt(a * v + b)
            for s in range(num_samples):
                torch.randn(num_elements, out=row)
                torch.addcmul(theta, row, sigma, out=out[s])

        cases["PyTorch batched randn(S,P)*sigma+theta"] = batched
        cases["naive per-sample loop"] = naive
    flat = out.view(-1)
    cases["torch.randn(S*P) into out"] = lambda: torch.randn(flat.numel(), out=flat)
    cases["fill_ of out"] = lambda: out.fill_(1.0)
    cases["copy_ into out"] = lambda: out.copy_(src)
    ops = cpu_backend.load_ops()
    if variants and ops is not None:
        for variant, name in _VARIANTS.items():
            cases[f"kernel variant: {name}"] = lambda variant=variant: ops.sample_variant(
                theta, v, a, b, bounds, 1, 0, 0, out, -1, variant)
    return cases


def measure_sampler(num_elements: int, num_samples: int, rounds: int, **kw: object) -> list[dict[str, object]]:
    """Rows (method, median and min ms, G samples/s, GB/s, time / fused) from one interleaved run."""
    cases = make_cases(num_elements, num_samples, **kw)
    timings = time_interleaved(cases, rounds=rounds)
    fused_t = timings[FUSED].median
    out_bytes = 4 * num_samples * num_elements
    rows = []
    for name, t in timings.items():
        if name.startswith("copy_"):
            moved = 2 * out_bytes
        elif name.startswith(("fill_", "torch.randn")):
            moved = out_bytes
        else:
            moved = sampler_bytes(num_elements, num_samples)
        rows.append(dict(P=num_elements, S=num_samples, method=name, ms=t.median * 1e3, min_ms=t.min * 1e3,
                         gsamples=num_samples * num_elements / t.median / 1e9, gb_s=gbs(moved, t.median),
                         vs_fused=t.median / fused_t))
    return rows


def measure_copy(num_elements: int, rounds: int) -> list[dict[str, object]]:
    """copy_checked_ against Tensor.copy_ (float32 and bfloat16 sources; warm and fresh destinations)."""
    g = torch.Generator().manual_seed(1)
    src32 = torch.rand(num_elements, generator=g)
    srcs = {"float32": src32, "bfloat16": src32.bfloat16()}
    warm = torch.empty(num_elements).fill_(0)
    cases: dict[str, Callable[[], object]] = {}
    for name, src in srcs.items():
        cases[f"{name}: dst.copy_(src), warm dst"] = lambda src=src: warm.copy_(src)
        cases[f"{name}: copy_checked_, warm dst"] = lambda src=src: copy_checked_(warm, src, check_moment=True)
        cases[f"{name}: torch.empty + copy_"] = lambda src=src: torch.empty(num_elements).copy_(src)
        cases[f"{name}: torch.empty + copy_checked_"] = lambda src=src: copy_checked_(
            torch.empty(num_elements), src, check_moment=True)
    timings = time_interleaved(cases, rounds=rounds)
    rows = []
    for name, t in timings.items():
        nbytes = num_elements * (4 + srcs[name.split(":")[0]].element_size())
        rows.append(dict(P=num_elements, method=name, ms=t.median * 1e3, min_ms=t.min * 1e3,
                         gb_s=gbs(nbytes, t.median)))
    return rows


def format_sampler(rows: list[dict[str, object]]) -> str:
    lines = ["| P | S | method | ms (median) | ms (min) | G samples/s | GB/s | time / fused |",
             "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['P']:.0e} | {r['S']} | {r['method']} | {r['ms']:.2f} | {r['min_ms']:.2f} | "
                     f"{r['gsamples']:.2f} | {r['gb_s']:.1f} | {r['vs_fused']:.2f} |")
    return "\n".join(lines)


def format_copy(rows: list[dict[str, object]]) -> str:
    lines = ["| P | method | ms (median) | ms (min) | GB/s (read + written) |", "|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['P']:.0e} | {r['method']} | {r['ms']:.2f} | {r['min_ms']:.2f} | {r['gb_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=10**7, help="P of the sampler table (default 1e7)")
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 4, 16], help="S values (default 1 4 16)")
    parser.add_argument("--large-elements", type=int, default=10**8,
                        help="P of the S = 1 row and of the copy table (default 1e8; 0: skip)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--baseline", metavar="REV", help="also time the C++ kernel of git revision REV")
    parser.add_argument("--baseline-dir", help="build directory of --baseline (default: a temporary one)")
    args = parser.parse_args()
    baseline_ops = None
    if args.baseline:
        build_dir = args.baseline_dir or tempfile.mkdtemp(prefix="l2m_baseline_")
        try:
            baseline_ops = build_baseline(args.baseline, build_dir)
        finally:
            if not args.baseline_dir:
                shutil.rmtree(build_dir, ignore_errors=True)  # the loaded library stays mapped
    print(f"{run_header()}; sampler backend: {sampler_backend()}; median of {args.rounds} interleaved rounds"
          + (f"; baseline kernel: {args.baseline}" if args.baseline else ""))
    rows = []
    for s in args.samples:
        rows += measure_sampler(args.elements, s, args.rounds, baseline_ops=baseline_ops)
    if args.large_elements:
        rows += measure_sampler(args.large_elements, 1, args.rounds, baselines=False, variants=False,
                                baseline_ops=baseline_ops)
    print(format_sampler(rows))
    if args.large_elements:
        print()
        print(format_copy(measure_copy(args.large_elements, args.rounds)))
    print(f"\nend: {run_header()}")


# ---------------------------------------------------------------- pytest-benchmark

try:
    import pytest
except ImportError:  # script use without pytest
    pytest = None

if pytest is not None:
    _P = 10**7

    @pytest.mark.parametrize("num_samples", [1, 4, 16])
    @pytest.mark.parametrize("case", [FUSED, "fused op, out=, validated", "fused op, allocating",
                                      "PyTorch batched randn(S,P)*sigma+theta", "torch.randn(S*P) into out",
                                      "fill_ of out", "copy_ into out"])
    def test_bench_cpu_sampler(benchmark, case: str, num_samples: int) -> None:
        """One method at P = 10^7 (compare within one pytest-benchmark run)."""
        fn = make_cases(_P, num_samples, variants=False)[case]
        benchmark.extra_info.update(elements=_P, samples=num_samples, backend=sampler_backend())
        benchmark.pedantic(fn, rounds=3, warmup_rounds=1)


if __name__ == "__main__":
    main()
