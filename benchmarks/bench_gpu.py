"""GPU benchmark of the fused sampler against the usual PyTorch ways of drawing the same samples.

Times (``triton.testing.do_bench``, median) for P in {1e6, 1e8}, S in {1, 4, 16, 64}, float32 and
bfloat16 output:

* ``fused``: the registered op (one Triton launch, precise transcendentals);
* ``fused fast-math``: the same kernel with hardware sin/cos approximations (math_mode="fast");
* ``naive loop``: ``out[s] = theta + randn_like(theta) * sigma`` per sample;
* ``batched torch``: ``addcmul(theta, randn(S, P), sigma)``;
* ``torch.compile``: the batched expression compiled by Inductor (dynamic shapes, one compile per dtype);
* ``reference``: the pure-PyTorch contract (P = 1e6 only: it is far too slow beyond);
* ``device copy``: a same-run copy of the output's size, the bandwidth yardstick;

and a model with many parameter tensors (one sample written into the live parameters): the
segment-table single launch vs a per-tensor PyTorch loop, the op per tensor, and the flat op.

GB/s counts the useful traffic, reading theta and v once and writing the output (``8 P + S P b``),
so every method of a row group moves the same bytes; "of copy" divides by the copy's GB/s.

Usage: ``python benchmarks/bench_gpu.py [--budget-s 170] [--dry-run]``. ``--dry-run`` runs every
code path on the CPU in Triton's interpreter with tiny sizes (a wall-clock timer replaces
``do_bench``) to check the script without a GPU. The full table goes to ``$OUT/gpu_bench.md`` if
``OUT`` is set, else ``benchmarks/gpu_bench_latest.md``; a summary table is printed.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Row:
    """One timed method on one problem.

    Attributes:
        case: problem family, e.g. "flat" or "model (150 tensors)".
        method: what was timed.
        numel: P, elements per sample.
        num_samples: S.
        dtype: output dtype name.
        ms: median time in milliseconds (NaN when skipped).
        bytes_moved: bytes the GB/s figure counts.
        copy_gbps: same-run device copy bandwidth for this output size (None if not measured).
        note: why a method was skipped, if it was.
    """

    case: str
    method: str
    numel: int
    num_samples: int
    dtype: str
    ms: float
    bytes_moved: float
    copy_gbps: float | None = None
    note: str = ""

    @property
    def gbps(self) -> float:
        return self.bytes_moved / (self.ms * 1e6) if self.ms > 0 else math.nan


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def _group_key(r: Row) -> tuple:
    return (r.case, r.numel, r.num_samples, r.dtype)


def format_table(rows: Sequence[Row], title: str) -> str:
    """Full markdown table: one line per method and problem, ratios against the naive loop of its group.

    Args:
        rows: timed rows.
        title: heading line.

    Returns:
        Markdown text.
    """
    naive = {_group_key(r): r.ms for r in rows if r.method in ("naive loop", "per-tensor loop")}
    out = [
        f"### {title}",
        "",
        "| case | method | P | S | dtype | ms (median) | GB/s | of copy | x naive | note |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        frac = r.gbps / r.copy_gbps if r.copy_gbps else math.nan
        speed = naive.get(_group_key(r), math.nan) / r.ms if r.ms > 0 else math.nan
        out.append(
            f"| {r.case} | {r.method} | {r.numel:,} | {r.num_samples} | {r.dtype} | {_fmt(r.ms)} | "
            f"{_fmt(r.gbps, 4)} | {_fmt(frac, 2)} | {_fmt(speed)} | {r.note} |"
        )
    return "\n".join(out) + "\n"


def format_summary(rows: Sequence[Row], title: str) -> str:
    """One line per problem: the fused kernel's time, bandwidth, fraction of copy and speed-ups.

    Args:
        rows: timed rows.
        title: heading line.

    Returns:
        Markdown text.
    """
    groups: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        groups.setdefault(_group_key(r), {})[r.method] = r
    out = [
        f"### {title}",
        "",
        "| case | P | S | dtype | fused ms | GB/s | of copy | x naive | x batched | x compile |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (case, numel, s, dt), m in groups.items():
        fused = m.get("fused") or m.get("one launch (segment table)")
        if fused is None:
            continue
        frac = fused.gbps / fused.copy_gbps if fused.copy_gbps else math.nan

        def ratio(name: str, fused: Row = fused, m: dict = m) -> float:
            return m[name].ms / fused.ms if name in m else math.nan

        naive = ratio("naive loop") if "naive loop" in m else ratio("per-tensor loop")
        out.append(
            f"| {case} | {numel:,} | {s} | {dt} | {_fmt(fused.ms)} | {_fmt(fused.gbps, 4)} | {_fmt(frac, 2)} | "
            f"{_fmt(naive)} | {_fmt(ratio('batched torch'))} | {_fmt(ratio('torch.compile'))} |"
        )
    return "\n".join(out) + "\n"


class Bencher:
    """Times callables: ``do_bench`` median on CUDA, a wall-clock median in the dry run; keeps a time budget."""

    def __init__(self, device: str, budget_s: float) -> None:
        self.device = device
        self.deadline = time.monotonic() + budget_s

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def ms(self, fn: Callable[[], object]) -> float:
        if self.device == "cuda":
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def free_bytes(self) -> float:
        if self.device == "cuda":
            return float(torch.cuda.mem_get_info()[0])
        return 8e9


def _copy_gbps(b: Bencher, nbytes: int, device: str) -> float:
    n = max(min(nbytes, 4 << 30) // 4, 1)
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = b.ms(lambda: dst.copy_(src))
    return 2 * n * 4 / (ms * 1e6)


def _flat_case(
    b: Bencher,
    tensors: tuple[torch.Tensor, ...],
    s: int,
    dtype: torch.dtype,
    compiled: Callable | None,
    with_reference: bool,
) -> list[Row]:
    """All methods for one (P, S, dtype)."""
    from l2m_fast.ops.reference import sample_diag_gaussian_ref
    from l2m_fast.ops.triton_kernel import interpret_mode, sample_diag_gaussian_triton

    theta, v, a, bb, bounds, sigma = tensors
    p, dev = theta.shape[0], theta.device
    op = torch.ops.l2m_fast.sample_diag_gaussian_out
    esize = torch.empty((), dtype=dtype).element_size()
    nbytes = s * p * esize
    moved = 8 * p + nbytes
    dname = str(dtype).removeprefix("torch.")
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # mem_get_info does not count the caching allocator's free blocks
    if nbytes > 0.8 * b.free_bytes():
        return [Row("flat", "fused", p, s, dname, math.nan, moved, note="does not fit")]
    out = torch.empty(s, p, dtype=dtype, device=dev)
    copy = _copy_gbps(b, nbytes, str(dev)) if 2 * min(nbytes, 4 << 30) < 0.8 * b.free_bytes() else None
    rows: list[Row] = []

    def add(method: str, fn: Callable[[], object] | None, need: float = 0.0, note: str = "") -> None:
        if fn is None or b.out_of_time():
            rows.append(Row("flat", method, p, s, dname, math.nan, moved, copy, note or "time budget"))
        elif need > 0.8 * b.free_bytes():
            rows.append(Row("flat", method, p, s, dname, math.nan, moved, copy, "does not fit"))
        else:
            rows.append(Row("flat", method, p, s, dname, b.ms(fn), moved, copy, note))

    def naive() -> None:
        for k in range(s):
            out[k] = theta + torch.randn_like(theta) * sigma

    def batched() -> torch.Tensor:
        return torch.addcmul(theta, torch.randn(s, p, device=dev), sigma).to(dtype)

    add("fused", lambda: op(theta, v, a, bb, bounds, 1, 0, 0, out))
    fast = "portable" if interpret_mode() else "fast"  # the interpreter has no hardware approximations
    add(
        "fused fast-math",
        lambda: sample_diag_gaussian_triton(theta, v, a, bb, bounds, 1, 0, 0, out, math_mode=fast),
        note="" if fast == "fast" else "portable (dry run)",
    )
    add("naive loop", naive, need=3 * 4 * p)
    add("batched torch", batched, need=(8 + esize) * s * p)
    add(
        "torch.compile",
        (lambda: compiled(theta, sigma, s, dtype)) if compiled else None,
        need=esize * s * p,
        note="" if compiled else "compile disabled",
    )
    add(
        "reference",
        (lambda: sample_diag_gaussian_ref(theta, v, a, bb, bounds, 1, 0, 0, out)) if with_reference else None,
        note="" if with_reference else "too slow at this size",
    )
    if copy is not None:  # the yardstick: a copy moving the useful bytes at the measured copy rate
        rows.append(Row("flat", "device copy", p, s, dname, moved / (copy * 1e6), moved, copy, "yardstick"))
    return rows


def _batched_expr(theta: torch.Tensor, sigma: torch.Tensor, s: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.addcmul(theta, torch.randn(s, theta.shape[0], device=theta.device), sigma).to(dtype)


def bench_flat(
    b: Bencher,
    sizes: Sequence[int],
    samples: Sequence[int],
    dtypes: Sequence[torch.dtype],
    reference_max_p: int,
    compile_ok: bool,
) -> list[Row]:
    """The flat sampler against the PyTorch ways of drawing the same samples."""
    dev = b.device
    rows: list[Row] = []
    compiled = torch.compile(_batched_expr, dynamic=True) if compile_ok else None
    for p in sizes:
        gen = torch.Generator(device=dev).manual_seed(0)
        theta = torch.randn(p, device=dev, generator=gen)
        v = torch.rand(p, device=dev, generator=gen)
        a, bb = torch.ones(1, device=dev), torch.full((1,), 0.5, device=dev)
        bounds = torch.tensor([0, p], dtype=torch.int64, device=dev)
        tensors = (theta, v, a, bb, bounds, torch.rsqrt(a * v + bb))
        for dtype in dtypes:
            for s in samples:
                if b.out_of_time():
                    return rows
                rows += _flat_case(b, tensors, s, dtype, compiled, p <= reference_max_p)
    return rows


def _model_shapes(kind: str) -> list[tuple[int, ...]]:
    """Parameter shapes of a transformer-like model: 12 blocks of 12 tensors plus embeddings (146 tensors)."""
    d = {"large": 768, "small": 32, "tiny": 8}[kind]
    shapes: list[tuple[int, ...]] = [(4 * d, d), (d,)]
    for _ in range(12):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes


def bench_model(b: Bencher, kind: str, dtypes: Sequence[torch.dtype]) -> list[Row]:
    """One sample into every live parameter: the segment-table launch vs per-tensor alternatives."""
    from l2m_fast.ops.triton_segments import sample_into_segments, segment_table

    dev = b.device
    shapes = _model_shapes(kind)
    gen = torch.Generator(device=dev).manual_seed(1)
    snaps = [torch.randn(sh, device=dev, generator=gen) for sh in shapes]
    vs = [torch.rand(sh, device=dev, generator=gen) for sh in shapes]
    sigmas = [torch.rsqrt(v + 0.5) for v in vs]
    n = sum(t.numel() for t in snaps)
    case = f"model {kind} ({len(shapes)} tensors)"
    op = torch.ops.l2m_fast.sample_diag_gaussian_out
    a, bb = torch.ones(1, device=dev), torch.full((1,), 0.5, device=dev)
    bounds_k = [torch.tensor([0, t.numel()], device=dev) for t in snaps]
    flat_theta, flat_v = torch.cat([t.reshape(-1) for t in snaps]), torch.cat([t.reshape(-1) for t in vs])
    bounds = torch.tensor([0, n], device=dev)
    rows: list[Row] = []
    for dtype in dtypes:
        if b.out_of_time():
            break
        dname = str(dtype).removeprefix("torch.")
        params = [torch.empty(sh, dtype=dtype, device=dev) for sh in shapes]
        moved = 8 * n + n * params[0].element_size()
        copy = _copy_gbps(b, n * params[0].element_size(), dev)
        table = segment_table(snaps, vs, params)
        flat_out = torch.empty(1, n, dtype=dtype, device=dev)

        def loop(params: list = params) -> None:
            for p_, th, sg in zip(params, snaps, sigmas, strict=True):
                p_.copy_(th + torch.randn_like(th) * sg)

        def op_per_tensor(params: list = params) -> None:
            offset = 0
            for p_, th, v, bk in zip(params, snaps, vs, bounds_k, strict=True):
                op(th.reshape(-1), v.reshape(-1), a, bb, bk, 1, 0, offset, p_.view(1, -1))
                offset += th.numel()

        timed = [
            (
                "one launch (segment table)",
                lambda table=table, params=params: sample_into_segments(
                    snaps, vs, params, a=a, b=bb, seed=1, table=table
                ),
            ),
            ("per-tensor loop", loop),
            ("fused op per tensor", op_per_tensor),
            (
                "flat op into one buffer",
                lambda flat_out=flat_out: op(flat_theta, flat_v, a, bb, bounds, 1, 0, 0, flat_out),
            ),
        ]
        for method, fn in timed:
            rows.append(Row(case, method, n, 1, dname, b.ms(fn), moved, copy))
    return rows


def _header(device: str) -> str:
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    import triton

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (TRITON_INTERPRET dry run, timings meaningless)"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"device: {name}; date: {now}; commit: {commit}; torch {torch.__version__}; triton {triton.__version__}\n"
        f"GB/s = (8 P + S P bytes_per_output) / time; 'of copy' = that / same-run device copy GB/s "
        f"(copy counts read + write); 'x naive' = naive time / method time.\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; returns the process exit code."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU under TRITON_INTERPRET")
    ap.add_argument("--budget-s", type=float, default=170.0, help="stop starting new measurements after this")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = ap.parse_args(argv)
    if args.dry_run:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--dry-run must start a fresh process (TRITON_INTERPRET=1 before triton is imported)")
        os.environ["TRITON_INTERPRET"] = "1"
        device, sizes, samples, kinds = "cpu", [1000, 3000], [1, 4], ["tiny"]
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --dry-run to check the script on the CPU", file=sys.stderr)
            return 2
        device, sizes, samples, kinds = "cuda", [100_000_000, 1_000_000], [1, 4, 16, 64], ["small", "large"]
    sys.path.insert(0, str(ROOT))
    import l2m_fast.ops  # noqa: F401  (registers the op)

    b = Bencher(device, args.budget_s)
    dtypes = [torch.float32, torch.bfloat16]
    rows: list[Row] = []
    for kind in kinds:
        rows += bench_model(b, kind, dtypes)
    rows += bench_flat(
        b,
        sizes,
        samples,
        dtypes,
        reference_max_p=1_000_000 if device == "cuda" else 10**9,
        compile_ok=not args.no_compile,
    )
    header = _header(device)
    full = (
        header
        + "\n"
        + format_table(rows, "l2m_fast sampler, all methods")
        + "\n"
        + format_summary(rows, "summary: fused kernel vs baselines")
    )
    if os.environ.get("OUT"):
        target = Path(os.environ["OUT"]) / "gpu_bench.md"
    elif device == "cuda":
        target = ROOT / "benchmarks" / "gpu_bench_latest.md"
    else:
        target = Path(tempfile.gettempdir()) / "l2m_fast_gpu_bench_dryrun.md"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(full)
    print(header)
    print(format_summary(rows, "summary: fused kernel vs baselines"))
    print(f"full table: {target}" + ("" if not b.out_of_time() else " (time budget reached: partial)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
