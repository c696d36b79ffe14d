"""Shared set-up of the Triton sampler tests (test_triton.py, test_triton_segments.py): devices, inputs, tolerances.

Without CUDA the kernels run on the CPU in Triton's interpreter, in a child pytest started with
``TRITON_INTERPRET=1`` (``test_triton.py::test_interpreter_subprocess``); with CUDA they run natively.
The interpreter must be on before triton is first imported (Triton's own @jit helpers such as
tl.philox are built at import), so in a plain ``pytest`` run the kernel tests are skipped in the
parent and run in the child.

Tolerances (stated against the reference, float32 output):
* Philox words and uniforms: bit-identical.
* normals ``z``, "precise" (default) and "portable": ``|z - z_ref| <= 2e-6``; "fast" (GPU only,
  hardware sin/cos approximations): ``|z - z_ref| <= 2e-5``. The precise mode is checked
  exhaustively (every 24-bit uniform) and computes the same bits on the CPU as on a GPU.
* samples ``theta + sigma z``: ``atol = z_atol * max(sigma) + 1e-6``, ``rtol = 1e-6``; bfloat16 and
  float16: one ulp of the output dtype (the float32 values may sit either side of a rounding tie).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from l2m_fast.ops import triton_kernel as tk
from l2m_fast.ops import triton_segments as ts

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
ROOT = Path(__file__).resolve().parents[1]
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
RUN_KERNELS = CUDA or INTERPRETED
needs_kernels = pytest.mark.skipif(
    not RUN_KERNELS, reason="runs in the TRITON_INTERPRET child (test_triton.py::test_interpreter_subprocess)"
)
parent_only = pytest.mark.skipif(INTERPRETED, reason="runs in the parent process")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")

U64 = 1 << 64
Z_ATOL = 2e-6
Z_ATOL_FAST = 2e-5
# dtype with its relative tolerance: float32 a few ulp; bfloat16 / float16 one output ulp
DTYPE_TOL = [(torch.float32, 1e-6), (torch.bfloat16, 2.0**-7), (torch.float16, 2.0**-10)]


def launch(*args: object, block: int = 128, **kwargs: object) -> None:
    """The flat launcher with a fixed block: one compilation per specialization on GPU, no tuning."""
    tk.sample_diag_gaussian_triton(*args, block=block, **kwargs)


def launch_segments(*args: object, **kwargs: object) -> None:
    """The segment launcher with a fixed block."""
    ts.sample_into_segments(*args, block=128, **kwargs)


def signed(seed: int) -> int:
    """A 64-bit seed as the signed int64 bit pattern the launchers take."""
    return seed - U64 if seed >= 1 << 63 else seed


def inputs(p: int, g: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """theta (P,), v (P,), a (G,), b (G,), bounds (G + 1,) on DEVICE, from a fixed seed."""
    gen = torch.Generator().manual_seed(seed + p)
    theta = torch.randn(p, generator=gen)
    v = torch.rand(p, generator=gen) * 2.0
    a = torch.rand(g, generator=gen) + 0.5
    b = torch.rand(g, generator=gen) + 0.1
    cuts = sorted(torch.randint(0, p + 1, (g - 1,), generator=gen).tolist())
    bounds = torch.tensor([0, *cuts, p], dtype=torch.int64)
    return tuple(t.to(DEVICE) for t in (theta, v, a, b, bounds))


def segment_inputs(shapes: list[tuple[int, ...]], num_samples: int, dtype: torch.dtype, seed: int = 0):
    """Lists thetas, vs (float32) and empty outs ``(S, *shape)`` of ``dtype`` on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    thetas = [torch.randn(sh, generator=gen).to(DEVICE) for sh in shapes]
    vs = [torch.rand(sh, generator=gen).to(DEVICE) for sh in shapes]
    outs = [torch.empty((num_samples, *sh), dtype=dtype, device=DEVICE) for sh in shapes]
    return thetas, vs, outs


def sigma_max(a: torch.Tensor, v: torch.Tensor, b: torch.Tensor) -> float:
    return float((1.0 / torch.sqrt(a.min() * v.min() + b.min())).max())


def assert_samples_close(
    out: torch.Tensor, ref: torch.Tensor, sigma: float, rtol: float, z_atol: float = Z_ATOL
) -> None:
    """Samples within ``z_atol * sigma + 1e-6`` (and ``rtol``) of the reference's."""
    torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), rtol=rtol, atol=z_atol * sigma + 1e-6)


class RepeatingBench:
    """Stands in for the tuner's benchmarker: launches a candidate ``reps`` times, as timing it would."""

    def __init__(self, reps: int = 3) -> None:
        self.reps, self.calls = reps, 0

    def __call__(self, fn: object) -> float:
        self.calls += 1
        for _ in range(self.reps):
            fn()
        return float(self.calls)  # the first candidate "wins"
