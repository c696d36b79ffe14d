"""Fuzzing the raw ops' metadata in a child process: no crash, no write outside ``out``.

The child calls the registered op (``torch.ops.l2m_fast.sample_diag_gaussian_out``, which runs the C++
kernel on the CPU) and the C++ op itself with random, mostly wrong, metadata: lengths of theta, v, a, b
and bounds, bound values, offsets at and past their limits, out shapes, strides and dtypes. ``out`` is a
window into a larger buffer whose guard regions hold a sentinel; after every call, raised or not, the
guards must be intact. A crash (segfault) shows as the child's exit status.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    r"""
    import json, random, sys
    import torch
    import l2m_fast.ops  # registers the op
    from l2m_fast.ops import cpu

    rng = random.Random(int(sys.argv[1]))
    n_cases = int(sys.argv[2])
    ops = [torch.ops.l2m_fast.sample_diag_gaussian_out]
    if cpu.load_ops() is not None:
        ops.append(torch.ops.l2m_fast_cpu.sample_diag_gaussian_out)
    SENTINEL, GUARD = 12345.0, 64
    stats = {"calls": 0, "raised": 0, "ok": 0, "guard_broken": 0, "nonfinite_ok": 0}
    errors = {}

    def pick(*xs):
        return xs[rng.randrange(len(xs))]

    for case in range(n_cases):
        s, p, g = pick(0, 1, 3, 5, 17), pick(0, 1, 7, 33, 64), pick(1, 2, 3)
        # valid metadata, then (three times in four) one thing wrong
        theta_n = v_n = p
        a_n = b_n = g
        cuts = sorted(rng.randrange(0, p + 1) for _ in range(g - 1))
        bounds = [0, *cuts, p]
        theta_dtype, out_dtype = torch.float32, pick(torch.float32, torch.bfloat16, torch.float16)
        theta_step, kind, bounds_dtype = 1, 0, torch.int64
        seed, s0, i0 = pick(0, 1, -1, 2**63 - 1, -(2**63)), pick(0, 3, 2**32 - s), pick(0, 5, 2**62, 2**63 - 1 - p)
        if rng.random() < 0.75:
            m = rng.randrange(14)
            if m == 0: theta_n += pick(1, -1) if p else 1
            elif m == 1: v_n += 2
            elif m == 2: a_n += 1
            elif m == 3: b_n = max(g - 1, 0) if g > 1 else 2
            elif m == 4: bounds = bounds[:-1]
            elif m == 5: bounds[rng.randrange(len(bounds))] = pick(-1, p + 1, 2**40)
            elif m == 6 and len(bounds) > 2: bounds[1], bounds[-2] = bounds[-2] + 1, max(bounds[1] - 1, 0)
            elif m == 7: theta_dtype = torch.float64
            elif m == 8: theta_step = 2  # non-contiguous theta
            elif m == 9: out_dtype = torch.float64
            elif m == 10: kind = pick(1, 2, 3)  # out non-contiguous, 1-D or 3-D
            elif m == 11: s0 = pick(-1, 2**32 - s + 1, 2**62)
            elif m == 12: i0 = pick(-3, 2**63 - p)
            else: bounds_dtype = torch.int32
        theta = torch.randn(theta_n * theta_step)[::theta_step].to(theta_dtype)
        v = torch.rand(v_n)
        a, b = torch.rand(a_n) + 0.5, torch.rand(b_n) + 0.5
        bt = torch.tensor(bounds, dtype=torch.int64)
        if bounds_dtype == torch.int32:
            bt = bt.clamp(max=2**31 - 1).to(torch.int32)
        buf = torch.full((2 * GUARD + max(s * p, 1) * 2,), SENTINEL, dtype=torch.float32)
        window = buf[GUARD : GUARD + s * p]
        if out_dtype != torch.float32:
            esz = torch.empty((), dtype=out_dtype).element_size()
            window = buf.view(torch.uint8)[GUARD * 4 : GUARD * 4 + s * p * esz].view(out_dtype)
        out = window.view(s, p)
        if kind == 1 and s > 1 and p > 1:
            out = buf[GUARD : GUARD + 2 * s * p].view(s, 2 * p)[:, ::2]  # non-contiguous
        elif kind == 2:
            out = window.view(-1)
        elif kind == 3:
            out = window.view(1, s, p)
        for op in ops:
            stats["calls"] += 1
            before = buf.clone()
            try:
                op(theta, v, a, b, bt, seed, s0, i0, out)
            except (RuntimeError, ValueError, TypeError, IndexError, OverflowError) as err:
                stats["raised"] += 1
                errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1
            else:
                stats["ok"] += 1
                if out.numel() and not bool(torch.isfinite(out.float()).all()):
                    stats["nonfinite_ok"] += 1
            # the bytes out may own: from its first element to its last; everything else must be untouched
            esz = out.element_size()
            start = out.storage_offset() * esz
            extent = (sum((d - 1) * st for d, st in zip(out.shape, out.stride())) + 1) * esz if out.numel() else 0
            byte_before, byte_after = before.view(torch.uint8), buf.view(torch.uint8)
            if not torch.equal(byte_before[:start], byte_after[:start]) or not torch.equal(
                byte_before[start + extent :], byte_after[start + extent :]
            ):
                stats["guard_broken"] += 1
    print(json.dumps({"stats": stats, "errors": errors}))
    """
)


@pytest.mark.parametrize("seed", [0, 1])
def test_raw_op_metadata_fuzz(seed: int) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run(
        [sys.executable, "-c", CHILD, str(seed), "600"], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0, f"the child crashed (status {res.returncode}): {res.stderr[-3000:]}"
    report = json.loads(res.stdout.strip().splitlines()[-1])
    stats = report["stats"]
    assert stats["guard_broken"] == 0, report
    assert stats["raised"] > 100 and stats["ok"] > 20, report  # both outcomes were exercised
    assert stats["nonfinite_ok"] == 0, report  # an accepted call wrote finite samples
