"""The benchmark harness: how every l2m_fast figure is timed, what its bandwidth means, how its machine is named.

``l2m-fast bench`` and every script under ``benchmarks/`` use this module, so their tables agree:

* **Timing** (:func:`time_interleaved`). Each callable runs once untimed (first-call costs: allocation,
  page faults, JIT compilation, autotuning), then all of them are timed round after round, interleaved,
  so that load from other processes hits every method alike and ratios come from one run. In a round a
  callable runs ``inner`` times back to back, ``inner`` chosen from its warm-up so that one measurement
  lasts at least ``min_time_s`` (short calls are not dominated by timer and launch overhead); the round
  records the mean time per call. On CUDA the device is synchronised before and after a measurement.
  The figure reported is the **median over rounds**; the minimum is kept too.
* **Bandwidth** (:func:`gbs`): bytes read plus bytes written by the operation, divided by its time, in
  GB/s (1e9 bytes). The sampler reads theta and v once and writes S rows, :func:`sampler_bytes`
  ``= 8 P + S P itemsize``; a copy of n bytes moves ``2 n``. "Of copy" is a method's GB/s over a
  same-run copy's (:func:`copy_gbs`), the memory-bound ceiling of the device.
* **Labels**: :func:`machine_label` (CPU model and threads, or GPU name; torch and Triton versions),
  :func:`run_header` (device, UTC date, commit, load average) and :func:`sampler_backend`, which names
  the implementation that actually ran (read back from the op after a call), not what is registered.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .ops import kernel_ran, sample_diag_gaussian

__all__ = [
    "Timing",
    "time_interleaved",
    "sampler_bytes",
    "gbs",
    "copy_gbs",
    "machine_label",
    "commit_label",
    "run_header",
    "sampler_backend",
    "bench_sampler",
    "format_bench",
]

_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Timing:
    """Per-call times of one callable, one per round, in seconds.

    Attributes:
        times: the mean time per call in each round.
        inner: calls per round.
    """

    times: tuple[float, ...]
    inner: int

    @property
    def median(self) -> float:
        """The figure to report: the median over rounds."""
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    *,
    device: torch.device | str = "cpu",
    rounds: int = 5,
    min_time_s: float | None = None,
    slow_s: float = 1.0,
    slow_rounds: int = 3,
) -> dict[str, Timing]:
    """Times callables the same way for every table (see the module docstring).

    Args:
        fns: label -> zero-argument callable.
        device: where they run (CUDA is synchronised around each measurement). Default CPU.
        rounds: timed rounds. Default 5.
        min_time_s: shortest measurement; a faster callable runs several times per round. Default
            None: 1 ms on CUDA (launch overhead), 0 on the CPU (one call per round).
        slow_s: a callable whose warm-up took longer than this ...
        slow_rounds: ... is timed in this many rounds only (the reference sampler on the CPU).

    Returns:
        label -> :class:`Timing`.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    dev = torch.device(device)
    sync = _sync(dev)
    if min_time_s is None:
        min_time_s = 1e-3 if dev.type == "cuda" else 0.0
    inner: dict[str, int] = {}
    for label, fn in fns.items():
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        warm = time.perf_counter() - t0
        inner[label] = 1 if warm >= min_time_s else min(1000, max(1, int(min_time_s / max(warm, 1e-7)) + 1))
        if warm > slow_s:
            inner[label] = -1  # marks a slow callable: fewer rounds
    times: dict[str, list[float]] = {label: [] for label in fns}
    for r in range(rounds):
        for label, fn in fns.items():
            n = inner[label]
            if n < 0 and r >= slow_rounds:
                continue
            n = max(n, 1)
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            times[label].append((time.perf_counter() - t0) / n)
    return {label: Timing(tuple(ts), max(inner[label], 1)) for label, ts in times.items()}


def sampler_bytes(num_elements: int, num_samples: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the fused sampler moves: theta and v read once (float32), S rows of P written."""
    return 8 * num_elements + num_samples * num_elements * torch.empty((), dtype=dtype).element_size()


def gbs(nbytes: float, seconds: float) -> float:
    """Bandwidth in GB/s (1e9 bytes per second) of ``nbytes`` read plus written in ``seconds``."""
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")


def copy_gbs(nbytes: int, device: torch.device | str = "cpu", rounds: int = 5) -> float:
    """A same-run copy's bandwidth: ``dst.copy_(src)`` of ``nbytes`` (counted ``2 * nbytes``), warm buffers.

    Args:
        nbytes: bytes copied (the output size of the operation it is compared with).
        device: where.
        rounds: timed rounds (median).
    """
    n = max(nbytes // 4, 1)
    src = torch.ones(n, device=device)
    dst = torch.zeros_like(src)
    t = time_interleaved({"copy": lambda: dst.copy_(src)}, device=device, rounds=rounds)["copy"].median
    return gbs(2 * 4 * n, t)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_label(device: torch.device | str = "cpu") -> str:
    """The device in words: GPU name, or CPU model with its logical CPUs and torch threads; torch/Triton versions."""
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = f"{_cpu_model()}, {os.cpu_count()} logical CPU(s), {torch.get_num_threads()} torch thread(s)"
    versions = f"torch {torch.__version__}"
    try:
        import triton

        versions += f", triton {triton.__version__}"
    except ImportError:
        pass
    return f"{name}; {versions}"


def commit_label() -> str:
    """The git commit of the l2m_fast checkout in use (``+dirty`` with uncommitted changes), or "not a git checkout"."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if not sha:
            return "not a git checkout"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=_ROOT, capture_output=True, text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"


def run_header(device: torch.device | str = "cpu") -> str:
    """One line for the top of a table: machine, UTC date, commit, load average."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return f"device: {machine_label(device)}; date: {now}; commit: {commit_label()}; load average: {load}"


def sampler_backend(device: torch.device | str = "cpu") -> str:
    """The implementation that serves ``l2m_fast::sample_diag_gaussian_out`` on ``device``, from a call.

    Draws one tiny sample on ``device`` and reads back which kernel ran (``l2m_fast.ops.kernel_ran``).
    """
    dev = torch.device(device)
    theta = torch.zeros(4, device=dev)
    sample_diag_gaussian(theta, theta, 1, validate=False, b=1.0)
    return kernel_ran(dev.type) or "unknown"


def bench_sampler(
    params: int = 1_000_000, samples: int = 16, *, repeats: int = 5, device: str | None = None, seed: int = 0
) -> tuple[list[dict[str, object]], str]:
    """The fused sampler against batched PyTorch, the naive loop and a copy, timed by :func:`time_interleaved`.

    Args:
        params: P, parameters. Default 1e6.
        samples: S, samples. Default 16.
        repeats: timed rounds (the median is reported). Default 5.
        device: ``"cpu"``, ``"cuda"`` or None (cuda when available).
        seed: seed of the inputs and the sampler.

    Returns:
        Rows with ``variant``, ``ms`` (median), ``vs_fused`` (time / fused-into-out time), ``gb_s``
        (:func:`sampler_bytes` / time) and ``of_copy`` (that over the same-run copy's GB/s), and a header.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    g = torch.Generator(device="cpu").manual_seed(seed)
    theta = torch.randn(params, generator=g).to(dev)
    v = torch.rand(params, generator=g).to(dev) * 1e-3
    a, b = 1.0, 10.0
    out = torch.zeros(samples, params, device=dev)
    src = torch.ones(samples, params, device=dev)

    def fused_out() -> Tensor:
        return sample_diag_gaussian(theta, v, samples, a=a, b=b, seed=seed, out=out, validate=False)

    def fused_alloc() -> Tensor:
        return sample_diag_gaussian(theta, v, samples, a=a, b=b, seed=seed, validate=False)

    def batched() -> Tensor:
        sigma = torch.rsqrt(a * v + b)
        return torch.randn(samples, params, device=dev) * sigma + theta

    def loop() -> list[Tensor]:
        sigma = torch.rsqrt(a * v + b)
        return [theta + sigma * torch.randn(params, device=dev) for _ in range(samples)]

    copy_label = "copy_ of the output bytes"
    variants = {
        "fused op, out= (warm buffer)": fused_out,
        "fused op, allocating": fused_alloc,
        "PyTorch batched randn(S,P)*sigma+theta": batched,
        "naive per-sample loop": loop,
        copy_label: lambda: out.copy_(src),
    }
    backend = sampler_backend(dev)
    timings = time_interleaved(variants, device=dev, rounds=repeats)
    ref = timings["fused op, out= (warm buffer)"].median
    moved = sampler_bytes(params, samples)
    copy_rate = gbs(2 * samples * params * 4, timings[copy_label].median)
    rows = []
    for name, t in timings.items():
        rate = gbs(2 * samples * params * 4, t.median) if name == copy_label else gbs(moved, t.median)
        ms, vs = t.median * 1e3, t.median / ref
        rows.append({"variant": name, "ms": ms, "vs_fused": vs, "gb_s": rate, "of_copy": rate / copy_rate})
    header = (
        f"sampler, P={params:,}, S={samples}, float32 out, median of {repeats} interleaved rounds; "
        f"{run_header(dev)}; fused op backend: {backend}"
    )
    return rows, header


def format_bench(rows: list[dict[str, object]], header: str) -> str:
    """The bench rows as a markdown table under ``header``."""
    lines = [
        header,
        "",
        "| variant | ms (median) | time / fused out= | GB/s (read + written) | of copy |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['ms']:.3f} | {r['vs_fused']:.2f} | {r['gb_s']:.2f} | {r['of_copy']:.2f} |")
    return "\n".join(lines)
