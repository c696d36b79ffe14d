"""CPU sampler benchmark: the fused C++ kernel against PyTorch baselines and same-run fill_/copy_.

Run as a script for the table (``python benchmarks/bench_cpu_sampler.py [--elements P] [--samples S]``)
or with pytest-benchmark (``pytest benchmarks/bench_cpu_sampler.py``).

Methods, all writing S samples of P elements (``sigma = 1/sqrt(a v + b)`` computed inside each):

* ``fused``: ``l2m_fast.ops.sample_diag_gaussian`` (the C++ kernel; ``validate=False``);
* ``naive loop``: per sample ``torch.randn_like(theta) * sigma + theta``;
* ``batched``: ``torch.randn(S, P) * sigma + theta``;
* ``reference``: the pure-PyTorch reference, timed at P = 2^18 (one chunk of its loop, default) and
  scaled linearly to P;
* ``fill_`` / ``copy_``: the output buffer's bytes written once (the store bandwidth ceiling);
* ``kernel variant``s (float32): the fused kernel with one part dropped, to find what limits it.

``alloc`` rows allocate the output on each call (page faults included), ``warm`` rows write into a
buffer allocated and touched beforehand. Repetitions are interleaved across methods and the best
time kept, so that ratios come from one run under the same machine load.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from l2m_fast.ops import cpu as cpu_backend
from l2m_fast.ops import sample_diag_gaussian, sample_diag_gaussian_ref

_VARIANTS = {1: "no Box-Muller", 2: "no Philox", 3: "no stores", 4: "stores only"}


def _problem(num_elements: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(num_elements, generator=g)
    v = torch.rand(num_elements, generator=g)
    return dict(theta=theta, v=v, a=torch.ones(1), b=torch.full((1,), 0.1), bounds=torch.tensor([0, num_elements]))


def _sigma(p: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.rsqrt(p["v"] * p["a"] + p["b"])


def make_cases(num_elements: int, num_samples: int, dtype: torch.dtype, ref_elements: int) -> dict[str, Callable]:
    """Zero-argument callables per (method, mode), each producing S x P samples of ``dtype``."""
    p = _problem(num_elements)
    theta, v = p["theta"], p["v"]
    out = torch.empty(num_samples, num_elements, dtype=dtype).fill_(0)
    src = torch.ones_like(out)
    tmp = torch.empty(num_samples, num_elements)
    row = torch.empty(num_elements)

    def fused(buf: torch.Tensor | None) -> None:
        sample_diag_gaussian(theta, v, num_samples, a=p["a"], b=p["b"], bounds=p["bounds"], seed=1, dtype=dtype,
                             out=buf, validate=False)

    def naive_alloc() -> None:
        sigma = _sigma(p)
        samples = [(torch.randn_like(theta) * sigma + theta).to(dtype) for _ in range(num_samples)]
        del samples

    def naive_warm() -> None:
        sigma = _sigma(p)
        for s in range(num_samples):
            torch.randn(num_elements, out=row)
            torch.addcmul(theta, row, sigma, out=out[s])

    def batched_alloc() -> None:
        (torch.randn(num_samples, num_elements) * _sigma(p) + theta).to(dtype)

    def batched_warm() -> None:
        torch.randn(num_samples, num_elements, out=tmp)
        torch.addcmul(theta, tmp, _sigma(p), out=out)

    pr = _problem(ref_elements)
    ref_out = torch.empty(num_samples, ref_elements, dtype=dtype)

    def reference() -> None:
        sample_diag_gaussian_ref(pr["theta"], pr["v"], pr["a"], pr["b"], pr["bounds"], 1, 0, 0, ref_out)

    cases: dict[str, Callable] = {
        "fused|warm": lambda: fused(out),
        "fused|alloc": lambda: fused(None),
        "batched|warm": batched_warm,
        "batched|alloc": batched_alloc,
        "naive loop|warm": naive_warm,
        "naive loop|alloc": naive_alloc,
        f"reference (P={ref_elements}, scaled)|warm": reference,
        "fill_|warm": lambda: out.fill_(1.0),
        "copy_|warm": lambda: out.copy_(src),
    }
    ops = cpu_backend.load_ops()
    if ops is not None and dtype == torch.float32:
        for variant, name in _VARIANTS.items():
            cases[f"kernel variant: {name}|warm"] = (
                lambda variant=variant: ops.sample_variant(theta, v, p["a"], p["b"], p["bounds"], 1, 0, 0, out, -1,
                                                           variant))

        def fused_one_thread() -> None:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                fused(out)
            finally:
                torch.set_num_threads(threads)

        cases["fused, 1 thread|warm"] = fused_one_thread
    return cases


def measure(num_elements: int, num_samples: int, dtype: torch.dtype, reps: int, ref_elements: int) -> list[dict]:
    """Best time of ``reps`` interleaved repetitions per case; rows with time, throughput and ratios."""
    cases = make_cases(num_elements, num_samples, dtype, ref_elements)
    best = {k: float("inf") for k in cases}
    for fn in cases.values():  # warm-up: first touches, thread pool, JIT
        fn()
    for _ in range(reps):
        for key, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - t0)
    for key in best:
        if key.startswith("reference"):
            best[key] *= num_elements / ref_elements
    out_bytes = num_samples * num_elements * torch.empty((), dtype=dtype).element_size()
    fused_warm, fill = best["fused|warm"], best["fill_|warm"]
    rows = []
    for key, t in best.items():
        method, mode = key.split("|")
        rows.append(dict(dtype=str(dtype).replace("torch.", ""), method=method, mode=mode, ms=t * 1e3,
                         gsamples=num_samples * num_elements / t / 1e9, gbs=out_bytes / t / 1e9,
                         vs_fused=t / fused_warm, of_fill=fill / t))
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of :func:`measure` rows."""
    lines = ["| out dtype | method | buffer | time (ms) | Gsamples/s | GB/s written | time / fused warm | "
             "throughput / fill_ |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['method']} | {r['mode']} | {r['ms']:.1f} | {r['gsamples']:.2f} | "
                     f"{r['gbs']:.1f} | {r['vs_fused']:.2f} | {r['of_fill']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=10**7)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--ref-elements", type=int, default=1 << 18)
    args = parser.parse_args()
    print(f"backend: {cpu_backend.backend()} ({cpu_backend.backend_detail()}); threads: {torch.get_num_threads()}; "
          f"P = {args.elements}, S = {args.samples}, best of {args.reps} interleaved repetitions")
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        rows += measure(args.elements, args.samples, dtype, args.reps, args.ref_elements)
    print(format_table(rows))


# ---------------------------------------------------------------- pytest-benchmark

try:
    import pytest
except ImportError:  # script use without pytest
    pytest = None

if pytest is not None:
    _P, _S = 10**7, 16

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
    @pytest.mark.parametrize("case", ["fused|warm", "fused|alloc", "batched|warm", "batched|alloc",
                                      "naive loop|warm", "fill_|warm", "copy_|warm"])
    def test_bench_cpu_sampler(benchmark, case: str, dtype: torch.dtype) -> None:
        """One method at P = 10^7, S = 16 (compare within one pytest-benchmark run)."""
        fn = make_cases(_P, _S, dtype, ref_elements=10**4)[case]
        benchmark.extra_info.update(elements=_P, samples=_S, backend=cpu_backend.backend())
        benchmark.pedantic(fn, rounds=3, warmup_rounds=1)


if __name__ == "__main__":
    main()
