"""Large models on the CPU: building the posterior, its memory, one sample as fast as many, in-place contexts.

For P = 1e6, 1e7, 1e8 covered parameters, two models each: a stack of ``Linear`` layers (few large tensors)
and a transformer-like model of 146 tensors. AdamW state is filled in directly (a step's ``exp_avg_sq``),
so no time goes to training. Rows, all measured in one run with :mod:`l2m_fast.benchmarking`:

* ``build``: ``L2MPosterior.from_optimizer`` (snapshot) and with ``snapshot=False``, against a same-run copy
  of theta and v into fresh buffers (``torch.cat`` of the parameters and of the moments);
* ``peak extra memory``: in a fresh process, the peak resident memory of building the posterior and running
  one in-place context, above what the model and its optimizer state held, in copies of the covered
  parameters (float32), from ``VmHWM`` after resetting it (``/proc/self/clear_refs``);
* ``sample S``: ``post.sample(S, out=warm)`` for S = 1, 4, 16, in G samples/s, against ``torch.randn`` of the
  same size and a same-run copy of the output bytes;
* ``sampled()``: one ``with post.sampled(model, i, seed)`` enter + exit, and ``iter_sampled``'s time per
  sample, against a warm ``post.sample(1, out=)`` and the naive loop (``theta + sigma * randn`` then
  ``vector_to_parameters``).

Usage: ``python benchmarks/bench_large_model.py [--sizes 1e6 1e7 1e8] [--rounds 5]``; the table goes to
stdout (and to ``--out`` when given).
"""

from __future__ import annotations

import argparse
import gc
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import vector_to_parameters

from l2m_fast import L2MPosterior
from l2m_fast.benchmarking import run_header, sampler_backend, time_interleaved


def linear_stack(numel: int) -> nn.Module:
    """Square ``Linear`` layers (bias included) totalling about ``numel`` parameters."""
    d = {10**6: 1000, 10**7: 1024, 10**8: 4096}.get(numel) or int(math.sqrt(numel / 6))
    layers = max(1, round(numel / (d * d + d)))
    return nn.Sequential(*[nn.Linear(d, d) for _ in range(layers)])


def transformer_like(numel: int) -> nn.Module:
    """146 tensors: embeddings and 12 blocks of 12 tensors, the hidden width chosen for about ``numel``."""
    d = max(8, int(math.sqrt(numel / (12 * 12 + 4))))
    shapes: list[tuple[int, ...]] = [(4 * d, d), (d,)]
    for _ in range(12):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    module = nn.Module()
    for k, shape in enumerate(shapes):
        module.register_parameter(f"t{k:03d}", nn.Parameter(torch.randn(shape) * 0.02))
    return module


def with_adam_state(model: nn.Module) -> torch.optim.AdamW:
    """AdamW over the model with one step's state (``exp_avg_sq`` of a random gradient), no backward pass."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        grad = torch.randn(p.shape, generator=g)
        opt.state[p] = {
            "step": torch.tensor(1.0),
            "exp_avg": 0.1 * grad,
            "exp_avg_sq": 0.001 * grad.square(),
        }
    return opt


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _model(kind: str, size: int) -> nn.Module:
    return linear_stack(size) if kind == "linear" else transformer_like(size)


def memory_probe(kind: str, size: int, snapshot: bool) -> float:
    """In a fresh process: the peak resident memory of building the posterior, above what the model and its
    optimizer state already hold, in bytes (Linux: ``VmHWM`` after resetting it). A fresh process, so that
    no memory the allocator kept from earlier work hides the build's own."""
    tiny = nn.Linear(4, 4)  # first calls load the kernel and start its threads: not the build's memory
    tiny_post = L2MPosterior.from_optimizer(tiny, with_adam_state(tiny), snapshot=snapshot)
    with tiny_post.sampled(tiny, 0, seed=0):
        tiny_post.sample(2, seed=0)
    model = _model(kind, size)
    opt = with_adam_state(model)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    before = _rss_kib("VmRSS")
    post = L2MPosterior.from_optimizer(model, opt, snapshot=snapshot)
    post.sample(1, seed=0)  # and the work buffer of an in-place context
    with post.sampled(model, 0, seed=0):
        pass
    return (_rss_kib("VmHWM") - before) * 1024.0


def peak_extra_bytes(kind: str, size: int, snapshot: bool) -> float:
    """:func:`memory_probe` in a child process; NaN where it cannot run."""
    cmd = [sys.executable, __file__, "--memory-probe", kind, str(size), "1" if snapshot else "0"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
        return float(res.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return math.nan


def bench_model(name: str, kind: str, size: int, model: nn.Module, rounds: int) -> list[dict[str, object]]:
    """Every row for one model."""
    opt = with_adam_state(model)
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    copy_bytes = 4 * numel
    rows: list[dict[str, object]] = []

    def build() -> L2MPosterior:
        return L2MPosterior.from_optimizer(model, opt)

    def build_live() -> L2MPosterior:
        return L2MPosterior.from_optimizer(model, opt, snapshot=False)

    def copy_theta_v() -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.cat([p.detach().reshape(-1) for p in params]),
            torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for p in params]),
        )

    t = time_interleaved({"build": build, "build live": build_live, "copy": copy_theta_v}, rounds=rounds)
    peak, peak_live = peak_extra_bytes(kind, size, True), peak_extra_bytes(kind, size, False)
    post = build()
    copy_s = t["copy"].median
    rows.append(
        {
            "model": name,
            "P": numel,
            "row": "from_optimizer (snapshot)",
            "ms": t["build"].median * 1e3,
            "vs": f"{t['build'].median / copy_s:.2f}x copy",
            "memory": f"{peak / copy_bytes:.2f} copies",
        }
    )
    rows.append(
        {
            "model": name,
            "P": numel,
            "row": "from_optimizer (snapshot=False)",
            "ms": t["build live"].median * 1e3,
            "vs": f"{t['build live'].median / copy_s:.2f}x copy",
            "memory": f"{peak_live / copy_bytes:.2f} copies",
        }
    )
    rows.append(
        {
            "model": name,
            "P": numel,
            "row": "copy of theta and v (fresh buffers)",
            "ms": copy_s * 1e3,
            "vs": "1.00x copy",
            "memory": "",
        }
    )

    # one sample as fast as many: post.sample(S, out=warm)
    fns: dict[str, Callable[[], object]] = {}
    bufs = {s: torch.zeros(s, numel) for s in (1, 4, 16)}
    for s, buf in bufs.items():
        fns[f"sample {s}"] = lambda s=s, buf=buf: post.sample(s, seed=1, out=buf)
    randn_out = torch.zeros(numel)
    fns["randn (P,)"] = lambda: torch.randn(numel, out=randn_out)
    src = torch.ones(numel)
    fns["copy (P,)"] = lambda: randn_out.copy_(src)
    t = time_interleaved(fns, rounds=rounds)
    for s in (1, 4, 16):
        ms = t[f"sample {s}"].median * 1e3
        rows.append(
            {
                "model": name,
                "P": numel,
                "row": f"post.sample({s}, out=warm)",
                "ms": ms,
                "vs": f"{s * numel / (ms * 1e6):.2f} G samples/s; {t['randn (P,)'].median * 1e3 * s / ms:.2f}x "
                "randn of the same size",
                "memory": "",
            }
        )
    rows.append(
        {
            "model": name,
            "P": numel,
            "row": "torch.randn(P)",
            "ms": t["randn (P,)"].median * 1e3,
            "vs": f"{numel / (t['randn (P,)'].median * 1e9):.2f} G samples/s",
            "memory": "",
        }
    )
    rows.append(
        {
            "model": name,
            "P": numel,
            "row": "copy of P floats",
            "ms": t["copy (P,)"].median * 1e3,
            "vs": "",
            "memory": "",
        }
    )
    del bufs
    gc.collect()

    # in-place contexts against a warm sample(1, out=) and the naive loop
    warm = torch.zeros(1, numel)
    sigma = post.variance().sqrt()
    theta = post.theta
    counter = iter(range(10**9))

    def context() -> None:
        with post.sampled(model, next(counter), seed=1):
            pass

    it_box: list = []

    def iterator_step() -> None:
        if not it_box or len(it_box[0]) == 0:
            if it_box:
                it_box[0].close()
            it_box[:] = [post.iter_sampled(model, 10**6, seed=1)]
        next(it_box[0])

    def naive() -> None:
        with torch.no_grad():
            vector_to_parameters(theta + sigma * torch.randn(numel), params)

    keep = torch.cat([p.detach().reshape(-1) for p in params])
    t = time_interleaved(
        {
            "sample(1)": lambda: post.sample(1, seed=1, out=warm),
            "sampled()": context,
            "iter_sampled": iterator_step,
            "naive": naive,
        },
        rounds=rounds,
    )
    if it_box:
        it_box[0].close()
    with torch.no_grad():
        vector_to_parameters(keep, params)
    base = t["sample(1)"].median
    for label, row in (
        ("sampled()", "sampled() enter + exit"),
        ("iter_sampled", "iter_sampled, per sample"),
        ("naive", "naive loop (randn, vector_to_parameters)"),
        ("sample(1)", "post.sample(1, out=warm)"),
    ):
        rows.append(
            {
                "model": name,
                "P": numel,
                "row": row,
                "ms": t[label].median * 1e3,
                "vs": f"{t[label].median / base:.2f}x sample(1, out=)",
                "memory": "",
            }
        )
    return rows


def format_rows(rows: list[dict[str, object]]) -> str:
    """The rows as a markdown table."""
    out = ["| model | P | what | ms (median) | against | peak extra memory |", "|---|---:|---|---:|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['P']:,} | {r['row']} | {r['ms']:.2f} | {r['vs']} | {r['memory']} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--memory-probe":
        print(memory_probe(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7, 1e8])
    ap.add_argument("--models", nargs="+", default=["linear", "transformer"], choices=["linear", "transformer"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    head = f"{run_header('cpu')}; sampler: {sampler_backend('cpu')}; median of {args.rounds} interleaved rounds"
    print(head, flush=True)
    rows: list[dict[str, object]] = []
    for size in args.sizes:
        for kind in args.models:
            model = _model(kind, int(size))
            name = f"{kind} ({len(list(model.parameters()))} tensors)"
            part = bench_model(name, kind, int(size), model, args.rounds)
            print(format_rows(part), flush=True)
            rows += part
            del model
            gc.collect()
    table = head + "\n\n" + format_rows(rows) + "\n"
    if args.out is not None:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
