"""GPU benchmark of the fused sampler against the usual PyTorch ways of drawing the same samples.

Every figure comes from the project's harness (:mod:`l2m_fast.benchmarking`): times from
``time_interleaved`` (each method of a problem warmed up once, then timed round after round,
interleaved, median reported), bandwidth from ``sampler_bytes`` / ``gbs`` (theta and v read once,
the S rows written: ``8 P + S P itemsize`` bytes), the yardstick from ``copy_gbs`` (a same-run
device copy), labels from ``run_header`` and ``sampler_backend``.

Order (the most telling rows first, so a run cut short still has them):

1. flat, P = 1e8, S = 64, 16, 4, 1, float32 then bfloat16: ``fused`` (the registered op, precise
   math), ``fused fast-math``, ``batched torch`` (``addcmul(theta, randn(S, P), sigma)``), ``naive
   loop`` (one ``randn_like`` per sample), and the ``device copy`` yardstick;
2. the model cases, one sample into every live parameter of a 146-tensor transformer (``large``:
   d = 768, 87M parameters; ``small``: d = 32): ``one launch (segment table)`` vs ``per-tensor
   loop``, ``fused op per tensor`` and ``flat op into one buffer``;
3. flat, P = 1e6 (with the pure-PyTorch ``reference``);
4. ``torch.compile`` of the batched expression (Inductor), last: compiling is slow and the most
   likely to fail for reasons outside this package.

Each row goes to stdout and to ``$OUT/gpu_bench.md`` (else ``benchmarks/gpu_bench_latest.md``) the
moment it is measured; a method that fails becomes a row with its error as the note, the others
still run. ``x base`` divides the baseline's time (batched torch, or the per-tensor loop for the
model) by the method's.

Usage: ``python benchmarks/bench_gpu.py [--budget-s 150] [--no-compile] [--dry-run]``. ``--dry-run``
runs every path on the CPU in Triton's interpreter with tiny sizes (timings meaningless).
"""

from __future__ import annotations

import argparse
import math
import os
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
        case: problem family, e.g. "flat" or "model large (146 tensors)".
        method: what was timed.
        numel: P, elements per sample.
        num_samples: S.
        dtype: output dtype name.
        ms: median time in milliseconds (NaN when not measured).
        bytes_moved: bytes the GB/s figure counts (``sampler_bytes``).
        copy_gbps: same-run device copy bandwidth (None if not measured).
        note: why a method was not measured, or what it was.
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
        from l2m_fast.benchmarking import gbs

        return gbs(self.bytes_moved, self.ms * 1e-3) if self.ms > 0 else math.nan

    @property
    def key(self) -> tuple:
        return (self.case, self.numel, self.num_samples, self.dtype)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def table_header() -> str:
    """The markdown header of the rows :func:`format_row` writes."""
    return (
        "| case | method | P | S | dtype | ms (median) | GB/s | of copy | x base | note |\n"
        "|---|---|---:|---:|---|---:|---:|---:|---:|---|"
    )


def format_row(r: Row, baselines: dict[tuple, Row]) -> str:
    """One markdown line; ``baselines`` maps a problem key to its baseline row (for ``x base``)."""
    frac = r.gbps / r.copy_gbps if r.copy_gbps else math.nan
    base = baselines.get(r.key)
    speed = base.ms / r.ms if base is not None and r.ms > 0 else math.nan
    return (
        f"| {r.case} | {r.method} | {r.numel:,} | {r.num_samples} | {r.dtype} | {_fmt(r.ms)} | "
        f"{_fmt(r.gbps, 4)} | {_fmt(frac, 2)} | {_fmt(speed)} | {r.note} |"
    )


class Run:
    """Measures problems under a time budget and writes each row the moment it is measured."""

    def __init__(self, device: str, budget_s: float, target: Path, rounds: int) -> None:
        self.device, self.target, self.rounds = torch.device(device), target, rounds
        self.deadline = time.monotonic() + budget_s
        self.rows: list[Row] = []
        self.copy: dict[str, float] = {}

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def emit(self, text: str) -> None:
        print(text, flush=True)
        with open(self.target, "a") as f:
            f.write(text + "\n")

    def free_bytes(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            return float(torch.cuda.mem_get_info()[0])
        return 8e9

    def copy_rate(self, dtype: torch.dtype) -> float | None:
        """Same-run copy bandwidth (``copy_gbs``), once per dtype, at a size that fits beside the outputs."""
        name = str(dtype)
        if name not in self.copy:
            nbytes = int(min(2 << 30, self.free_bytes() / 8)) if self.device.type == "cuda" else 1 << 22
            try:
                from l2m_fast.benchmarking import copy_gbs

                self.copy[name] = copy_gbs(nbytes, self.device, rounds=self.rounds)
            except Exception as err:  # noqa: BLE001 - the yardstick failing must not stop the run
                self.emit(f"<!-- copy yardstick failed: {type(err).__name__}: {err} -->")
                self.copy[name] = math.nan
        rate = self.copy[name]
        return rate if math.isfinite(rate) else None

    def group(
        self,
        case: str,
        numel: int,
        s: int,
        dtype: torch.dtype,
        methods: dict[str, Callable[[], object] | str],
        base: str,
        moved: float,
    ) -> None:
        """Times one problem's methods together (interleaved); a str instead of a callable is a skip note."""
        from l2m_fast.benchmarking import time_interleaved

        dname = str(dtype).removeprefix("torch.")
        copy = self.copy_rate(dtype)
        rows: dict[str, Row] = {}
        live: dict[str, Callable[[], object]] = {}
        for name, fn in methods.items():
            if isinstance(fn, str) or self.out_of_time():
                rows[name] = Row(
                    case, name, numel, s, dname, math.nan, moved, copy, fn if isinstance(fn, str) else "time budget"
                )
                continue
            try:  # a failing method becomes its row's note
                fn()
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                live[name] = fn
            except Exception as err:  # noqa: BLE001
                rows[name] = Row(
                    case,
                    name,
                    numel,
                    s,
                    dname,
                    math.nan,
                    moved,
                    copy,
                    f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}",
                )
        timings = {}
        if live:
            try:
                timings = time_interleaved(live, device=self.device, rounds=self.rounds)
            except Exception as err:  # noqa: BLE001
                for name in live:
                    rows[name] = Row(case, name, numel, s, dname, math.nan, moved, copy, f"failed while timed: {err}")
        for name, t in timings.items():
            rows[name] = Row(case, name, numel, s, dname, t.median * 1e3, moved, copy)
        ordered = [rows[name] for name in methods]
        if copy is not None:
            ordered.append(Row(case, "device copy", numel, s, dname, moved / (copy * 1e6), moved, copy, "yardstick"))
        baselines = {r.key: r for r in ordered if r.method == base and math.isfinite(r.ms)}
        for r in ordered:
            self.rows.append(r)
            self.emit(format_row(r, baselines))


def flat_problem(run: Run, p: int, s: int, dtype: torch.dtype, with_reference: bool) -> None:
    """All methods for one (P, S, dtype) of the flat sampler."""
    from l2m_fast.benchmarking import sampler_bytes
    from l2m_fast.ops.reference import sample_diag_gaussian_ref
    from l2m_fast.ops.triton_kernel import interpret_mode, sample_diag_gaussian_triton

    dev = run.device
    gen = torch.Generator(device=dev).manual_seed(0)
    theta, v = torch.randn(p, device=dev, generator=gen), torch.rand(p, device=dev, generator=gen)
    a, b = torch.ones(1, device=dev), torch.full((1,), 0.5, device=dev)
    bounds = torch.tensor([0, p], dtype=torch.int64, device=dev)
    sigma = torch.rsqrt(a * v + b)
    esize = torch.empty((), dtype=dtype).element_size()
    moved = sampler_bytes(p, s, dtype)
    if s * p * esize > 0.8 * run.free_bytes():
        run.group("flat", p, s, dtype, {"fused": "does not fit"}, "batched torch", moved)
        return
    out = torch.empty(s, p, dtype=dtype, device=dev)
    op = torch.ops.l2m_fast.sample_diag_gaussian_out
    fast = "portable" if interpret_mode() else "fast"  # the interpreter has no hardware approximations

    def naive() -> None:
        for k in range(s):
            out[k] = theta + torch.randn_like(theta) * sigma

    batched_need = (4 + esize + (4 if dtype != torch.float32 else 0)) * s * p
    if dev.type != "cuda":  # the dry run: the op would take its CPU kernel; run the Triton launcher (interpreted)
        op = sample_diag_gaussian_triton
    methods: dict[str, Callable[[], object] | str] = {
        "fused": lambda: op(theta, v, a, b, bounds, 1, 0, 0, out),
        "fused fast-math": lambda: sample_diag_gaussian_triton(theta, v, a, b, bounds, 1, 0, 0, out, math_mode=fast),
        "batched torch": (lambda: torch.addcmul(theta, torch.randn(s, p, device=dev), sigma).to(dtype))
        if batched_need < 0.8 * run.free_bytes()
        else "does not fit",
        "naive loop": naive,
    }
    if with_reference:
        methods["reference"] = lambda: sample_diag_gaussian_ref(theta, v, a, b, bounds, 1, 0, 0, out)
    run.group("flat", p, s, dtype, methods, "batched torch", moved)


def model_shapes(kind: str) -> list[tuple[int, ...]]:
    """Parameter shapes of a transformer-like model: 12 blocks of 12 tensors plus embeddings (146 tensors)."""
    d = {"large": 768, "small": 32, "tiny": 8}[kind]
    shapes: list[tuple[int, ...]] = [(4 * d, d), (d,)]
    for _ in range(12):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes


def model_problem(run: Run, kind: str, dtype: torch.dtype) -> None:
    """One sample into every live parameter: the segment-table launch vs per-tensor alternatives."""
    from l2m_fast.benchmarking import sampler_bytes
    from l2m_fast.ops.triton_segments import sample_into_segments, segment_table

    dev = run.device
    shapes = model_shapes(kind)
    gen = torch.Generator(device=dev).manual_seed(1)
    snaps = [torch.randn(sh, device=dev, generator=gen) for sh in shapes]
    vs = [torch.rand(sh, device=dev, generator=gen) for sh in shapes]
    sigmas = [torch.rsqrt(v + 0.5) for v in vs]
    n = sum(t.numel() for t in snaps)
    op = torch.ops.l2m_fast.sample_diag_gaussian_out
    a, b = torch.ones(1, device=dev), torch.full((1,), 0.5, device=dev)
    bounds_k = [torch.tensor([0, t.numel()], device=dev) for t in snaps]
    flat_theta, flat_v = torch.cat([t.reshape(-1) for t in snaps]), torch.cat([t.reshape(-1) for t in vs])
    bounds = torch.tensor([0, n], device=dev)
    params = [torch.empty(sh, dtype=dtype, device=dev) for sh in shapes]
    flat_out = torch.empty(1, n, dtype=dtype, device=dev)
    table = segment_table(snaps, vs, params)

    def loop() -> None:
        for p_, th, sg in zip(params, snaps, sigmas, strict=True):
            p_.copy_(th + torch.randn_like(th) * sg)

    def op_per_tensor() -> None:
        offset = 0
        for p_, th, v, bk in zip(params, snaps, vs, bounds_k, strict=True):
            op(th.reshape(-1), v.reshape(-1), a, b, bk, 1, 0, offset, p_.view(1, -1))
            offset += th.numel()

    methods = {
        "one launch (segment table)": lambda: sample_into_segments(snaps, vs, params, a=a, b=b, seed=1, table=table),
        "per-tensor loop": loop,
        "fused op per tensor": op_per_tensor,
        "flat op into one buffer": lambda: op(flat_theta, flat_v, a, b, bounds, 1, 0, 0, flat_out),
    }
    case = f"model {kind} ({len(shapes)} tensors)"
    run.group(case, n, 1, dtype, methods, "per-tensor loop", sampler_bytes(n, 1, dtype))


def compile_problem(run: Run, p: int, s: int, dtype: torch.dtype, compiled: Callable) -> None:
    """``torch.compile`` of the batched expression, timed with the fused op (``x base`` of fused: compile / fused)."""
    from l2m_fast.benchmarking import sampler_bytes

    dev = run.device
    gen = torch.Generator(device=dev).manual_seed(0)
    theta, v = torch.randn(p, device=dev, generator=gen), torch.rand(p, device=dev, generator=gen)
    a, b = torch.ones(1, device=dev), torch.full((1,), 0.5, device=dev)
    bounds = torch.tensor([0, p], dtype=torch.int64, device=dev)
    sigma = torch.rsqrt(a * v + b)
    esize = torch.empty((), dtype=dtype).element_size()
    out = torch.empty(s, p, dtype=dtype, device=dev)
    fits = (4 + 2 * esize) * s * p < 0.8 * run.free_bytes()
    from l2m_fast.ops.triton_kernel import sample_diag_gaussian_triton

    op = torch.ops.l2m_fast.sample_diag_gaussian_out if dev.type == "cuda" else sample_diag_gaussian_triton
    methods: dict[str, Callable[[], object] | str] = {
        "fused": lambda: op(theta, v, a, b, bounds, 1, 0, 0, out),
        "torch.compile (batched)": (lambda: compiled(theta, sigma, s, dtype)) if fits else "does not fit",
    }
    run.group("flat", p, s, dtype, methods, "torch.compile (batched)", sampler_bytes(p, s, dtype))


def batched_expr(theta: torch.Tensor, sigma: torch.Tensor, s: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.addcmul(theta, torch.randn(s, theta.shape[0], device=theta.device), sigma).to(dtype)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; returns the process exit code."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU under TRITON_INTERPRET")
    ap.add_argument("--budget-s", type=float, default=150.0, help="start no new measurement after this")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    args = ap.parse_args(argv)
    if args.dry_run:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--dry-run must start a fresh process (TRITON_INTERPRET=1 before triton is imported)")
        os.environ["TRITON_INTERPRET"] = "1"
        device, big, small, rounds = "cpu", 1000, 300, 2
        samples, kinds = [4, 1], ["tiny"]
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --dry-run to check the script on the CPU", file=sys.stderr)
            return 2
        device, big, small, rounds = "cuda", 100_000_000, 1_000_000, 5
        samples, kinds = [64, 16, 4, 1], ["large", "small"]
    sys.path.insert(0, str(ROOT))
    from l2m_fast.benchmarking import run_header, sampler_backend

    if os.environ.get("OUT"):
        target = Path(os.environ["OUT"]) / "gpu_bench.md"
    elif device == "cuda":
        target = ROOT / "benchmarks" / "gpu_bench_latest.md"
    else:
        target = Path(tempfile.gettempdir()) / "l2m_fast_gpu_bench_dryrun.md"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("")
    run = Run(device, args.budget_s, target, rounds)
    note = "" if device == "cuda" else " (CPU dry run under TRITON_INTERPRET: timings meaningless)"
    run.emit(f"{run_header(device)}; fused op backend: {sampler_backend(device)}{note}")
    run.emit(
        "GB/s = (8 P + S P itemsize) / time (l2m_fast.benchmarking.sampler_bytes); 'of copy' = that / same-run "
        "device copy GB/s (copy_gbs); 'x base' = baseline time / method time.\n"
    )
    run.emit(table_header())
    dtypes = [torch.float32, torch.bfloat16]
    plan: list[tuple[str, tuple]] = [("flat", (big, s, dt, device != "cuda")) for dt in dtypes for s in samples]
    plan += [("model", (kind, dt)) for kind in kinds for dt in dtypes]
    plan += [("flat", (small, s, dt, True)) for dt in dtypes for s in samples]
    for what, params in plan:
        if run.out_of_time():
            run.emit(f"<!-- time budget reached before {what} {params} -->")
            break
        try:
            if what == "flat":
                flat_problem(run, *params)
            else:
                model_problem(run, *params)
        except Exception as err:  # noqa: BLE001 - one problem failing must not lose the others
            run.emit(f"<!-- {what} {params} failed: {type(err).__name__}: {err} -->")
    if not args.no_compile:
        compiled = torch.compile(batched_expr, dynamic=True)
        for p, s, dt in [
            (big, samples[1], torch.float32),
            (big, samples[1], torch.bfloat16),
            (small, samples[1], torch.float32),
        ]:
            if run.out_of_time():
                break
            try:
                compile_problem(run, p, s, dt, compiled)
            except Exception as err:  # noqa: BLE001
                run.emit(f"<!-- torch.compile {p} {s} {dt} failed: {type(err).__name__}: {err} -->")
    run.emit(
        f"\nrows: {len(run.rows)}; full table: {target}"
        + (" (time budget reached: partial)" if run.out_of_time() else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
