"""Sampler timing for ``l2m-fast bench``: the fused op against batched PyTorch, the naive loop and a copy.

All variants draw S samples of a P-parameter diagonal Gaussian with precision ``a * v + b`` (the
standard deviation computed inside each timed call, as the fused op does). The ``copy_`` row writes
the same output bytes from a same-sized source, the memory-bound floor on this device.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from .ops import sample_diag_gaussian

__all__ = ["device_label", "sampler_backend", "bench_sampler", "format_bench"]


def device_label(device: torch.device) -> str:
    """A human label of the device: GPU name, or CPU model and thread count, and the torch version."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
        except OSError:
            pass
        name = f"{name}, {torch.get_num_threads()} thread(s)"
    return f"{name}; torch {torch.__version__}"


def sampler_backend(device: torch.device) -> str:
    """Which implementation of ``l2m_fast::sample_diag_gaussian_out`` serves ``device``."""
    key = "CUDA" if device.type == "cuda" else "CPU"
    if torch._C._dispatch_has_kernel_for_dispatch_key("l2m_fast::sample_diag_gaussian_out", key):
        return f"compiled {key} kernel"
    return "pure-PyTorch reference (no device kernel registered)"


def _time(fn: Callable[[], object], device: torch.device, repeats: int, slow_s: float = 1.0) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    fn()  # warm-up (first-call costs, allocator, page faults of the out buffer)
    sync()
    if time.perf_counter() - t0 > slow_s:
        repeats = min(repeats, 3)  # a slow variant (the reference sampler on CPU): median of at most 3
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_sampler(
    params: int = 1_000_000, samples: int = 16, *, repeats: int = 5, device: str | None = None, seed: int = 0
) -> tuple[list[dict[str, object]], str]:
    """Times the sampler variants; each row is the median of ``repeats`` calls after one warm-up.

    A variant whose warm-up call takes over a second is timed at most 3 times.

    Args:
        params: P, parameters. Default 1e6.
        samples: S, samples. Default 16.
        repeats: timed calls per variant. Default 5.
        device: ``"cpu"``, ``"cuda"`` or None (cuda when available).
        seed: seed of the inputs and the sampler.

    Returns:
        Rows with ``variant``, ``ms``, ``vs_fused`` (time / fused-into-out time), ``gb_s`` (output bytes
        ``S * P * 4`` per second) and ``of_copy`` (copy time / variant time), and the header line.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    g = torch.Generator(device="cpu").manual_seed(seed)
    theta = torch.randn(params, generator=g).to(dev)
    v = torch.rand(params, generator=g).to(dev) * 1e-3
    a, b = 1.0, 10.0
    out = torch.empty(samples, params, device=dev)
    src = torch.randn(samples, params, generator=g).to(dev)

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

    variants: list[tuple[str, Callable[[], object]]] = [
        ("fused op, out= (warm buffer)", fused_out),
        ("fused op, allocating", fused_alloc),
        ("PyTorch batched randn(S,P)*sigma+theta", batched),
        ("naive per-sample loop", loop),
        ("copy_ of the output bytes", lambda: out.copy_(src)),
    ]
    times = {name: _time(fn, dev, repeats) for name, fn in variants}
    ref, floor = times[variants[0][0]], times[variants[-1][0]]
    nbytes = samples * params * 4
    rows = [
        {
            "variant": name,
            "ms": t * 1e3,
            "vs_fused": t / ref,
            "gb_s": nbytes / t / 1e9,
            "of_copy": floor / t,
        }
        for name, t in times.items()
    ]
    header = (
        f"sampler, P={params:,}, S={samples}, float32 out, median of {repeats} (at most 3 for variants over 1 s); "
        f"device: {device_label(dev)}; fused op backend: {sampler_backend(dev)}"
    )
    return rows, header


def format_bench(rows: list[dict[str, object]], header: str) -> str:
    """The bench rows as a markdown table under ``header``."""
    lines = [
        header,
        "",
        "| variant | ms | time / fused out= | output GB/s | copy time / time |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['ms']:.2f} | {r['vs_fused']:.2f} | {r['gb_s']:.2f} | {r['of_copy']:.2f} |")
    return "\n".join(lines)
