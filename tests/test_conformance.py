"""One conformance suite for the sampling contract, run over every backend present.

Backends: the pure-PyTorch reference; the C++ kernel on each instruction set this CPU has
(``sample_variant`` with the ISA forced); the op as registered for CPU tensors; and the Triton kernel,
natively on CUDA or on the CPU in Triton's interpreter (``TRITON_INTERPRET=1`` must be set before
Triton is imported, so a plain run starts a child pytest for it: ``test_triton_interpreter_conforms``).

What every backend must do (the contract in ``l2m_fast.ops.reference``):

* Philox words: the Random123 known answers, bit for bit (backends that expose their words);
* normals within the backend's stated tolerance of the reference (:data:`Z_TOL`), bounded by 5.77;
* samples ``theta + sigma z`` with per-segment ``(a, b)``, rounded once to float32, bfloat16 or
  float16 (one output ulp of slack for the rounding of values within ``Z_TOL`` of a tie);
* exact invariance, within the backend, to the chunking of samples (``sample_offset``) and of elements
  (``element_offset``): drawing in pieces gives the same bits as one draw.

The interpreter is slow, so the cases are small.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import KNOWN_ANSWERS, seed_of, signed

from l2m_fast._env import env_flag
from l2m_fast.ops import cpu as cpu_backend
from l2m_fast.ops.reference import normals_ref, philox4x32_ref, sample_diag_gaussian_ref
from l2m_fast.ops.sample import sample_diag_gaussian_out

ROOT = Path(__file__).resolve().parents[1]
INTERPRETED = env_flag("TRITON_INTERPRET")
CUDA = torch.cuda.is_available()

SampleFn = Callable[..., None]  # the op's signature: (theta, v, a, b, bounds, seed, s0, i0, out)
WordsFn = Callable[[torch.Tensor, int], torch.Tensor]  # (N, 4) int64 counters, signed seed -> (N, 4) words

Z_TOL: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    # |z - z_ref| allowed, as a function of z_ref
    "reference": lambda z: torch.zeros_like(z),
    "cpp": lambda z: 4 * torch.finfo(torch.float32).eps * z.abs().clamp(min=1.0),  # 4 ulp, stated in csrc/
    "op-cpu": lambda z: 4 * torch.finfo(torch.float32).eps * z.abs().clamp(min=1.0),
    "triton": lambda z: torch.full_like(z, 2e-6),  # stated in l2m_fast/ops/triton_kernel.py
}
OUT_ULP = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _backends() -> dict[str, tuple[str, SampleFn, WordsFn | None]]:
    """name -> (tolerance family, sampler with the op's signature, Philox words or None)."""
    if INTERPRETED or CUDA:
        from l2m_fast.ops.triton_kernel import HAS_TRITON, sample_diag_gaussian_triton

        found: dict[str, tuple[str, SampleFn, WordsFn | None]] = {}
        if HAS_TRITON:
            found["triton"] = ("triton", sample_diag_gaussian_triton, None)
        if INTERPRETED:
            return found
    else:
        found = {}

    def ref_words(counters: torch.Tensor, seed: int) -> torch.Tensor:
        u = seed % (1 << 64)
        return torch.stack(philox4x32_ref(*counters.unbind(1), (u & 0xFFFFFFFF, u >> 32)), dim=1)

    found["reference"] = ("reference", sample_diag_gaussian_ref, ref_words)
    found["op-cpu"] = ("op-cpu", sample_diag_gaussian_out, None)
    ops = cpu_backend.load_ops()
    if ops is not None:
        names = {0: "x86-64", 1: "avx2", 2: "avx512"}
        for isa in range(int(ops.best_isa()) + 1):

            def sample(*args: object, isa: int = isa) -> None:
                ops.sample_variant(*args, isa, 0)

            def words(counters: torch.Tensor, seed: int, isa: int = isa) -> torch.Tensor:
                return ops.philox4x32(counters, seed, isa)

            found[f"cpp-{names[isa]}"] = ("cpp", sample, words)
    return found


BACKENDS = _backends()
DEVICE = "cuda" if CUDA and "triton" in BACKENDS else "cpu"


def _on(name: str, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    dev = DEVICE if name == "triton" else "cpu"
    return tuple(t.to(dev) for t in tensors)


def _problem(p: int, g: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(p, generator=gen)
    v = torch.rand(p, generator=gen) * 3.0
    a = torch.rand(g, generator=gen) + 0.5
    b = torch.rand(g, generator=gen) + 0.1
    cuts = sorted(torch.randint(0, p + 1, (g - 1,), generator=gen).tolist())
    return theta, v, a, b, torch.tensor([0, *cuts, p], dtype=torch.int64)


def _draw(name: str, p: int, s: int, seed: int, s0: int, i0: int, dtype: torch.dtype, g: int = 3) -> torch.Tensor:
    _, fn, _ = BACKENDS[name]
    args = _on(name, *_problem(p, g, p + g))
    out = torch.full((s, p), float("nan"), dtype=dtype, device=args[0].device)
    fn(*args, signed(seed), s0, i0, out)
    return out.cpu()


def _expected(p: int, s: int, seed: int, s0: int, i0: int, g: int = 3) -> tuple[torch.Tensor, ...]:
    """The reference's float32 samples, its normals and each element's sigma."""
    theta, v, a, b, bounds = _problem(p, g, p + g)
    z = normals_ref(p, s, seed, s0, i0)
    seg = torch.searchsorted(bounds[1:], torch.arange(p), right=True)
    sigma = 1.0 / torch.sqrt(a[seg] * v + b[seg])
    return torch.addcmul(theta.unsqueeze(0), z, sigma.unsqueeze(0)), z, sigma


@pytest.mark.skipif(INTERPRETED or CUDA, reason="the parent process starts this child")
def test_triton_interpreter_conforms() -> None:
    """The Triton kernel passes this whole suite on the CPU, in Triton's interpreter (a child pytest)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


def test_backends_present() -> None:
    if INTERPRETED:
        assert "triton" in BACKENDS
    else:
        assert "reference" in BACKENDS and "op-cpu" in BACKENDS
        if cpu_backend.backend() != "reference":
            assert "cpp-x86-64" in BACKENDS  # every x86-64 CPU runs the baseline kernel


@pytest.mark.parametrize("name", [n for n, (_, _, w) in BACKENDS.items() if w is not None])
@pytest.mark.parametrize(("key", "counter", "words"), KNOWN_ANSWERS)
def test_philox_known_answers(name: str, key, counter, words) -> None:
    got = BACKENDS[name][2](torch.tensor([counter], dtype=torch.int64), signed(seed_of(key)))
    assert [w & 0xFFFFFFFF for w in got[0].tolist()] == list(words)


@pytest.mark.parametrize("name", list(BACKENDS))
@pytest.mark.parametrize(("p", "s", "s0", "i0"), [(33, 8, 0, 0), (7, 5, 3, (1 << 32) - 3), (1, 3, 6, (1 << 62) + 1)])
def test_normals_within_stated_tolerance(name: str, p: int, s: int, s0: int, i0: int) -> None:
    seed = 0xDEADBEEF12345678
    _, fn, _ = BACKENDS[name]
    zero, one = torch.zeros(p), torch.ones(1)
    args = _on(name, zero, zero, torch.zeros(1), one, torch.tensor([0, p], dtype=torch.int64))
    out = torch.full((s, p), float("nan"), device=args[0].device)
    fn(*args, signed(seed), s0, i0, out)
    z_ref = normals_ref(p, s, seed, s0, i0)
    err = (out.cpu() - z_ref).abs()
    assert bool((err <= Z_TOL[BACKENDS[name][0]](z_ref)).all()), f"max |dz| {float(err.max()):.3g}"
    assert float(out.abs().max()) <= 5.78


@pytest.mark.parametrize("name", list(BACKENDS))
@pytest.mark.parametrize("dtype", list(OUT_ULP))
@pytest.mark.parametrize(("p", "s", "s0", "i0"), [(1, 1, 0, 0), (7, 2, 1, 17), (33, 5, 3, (1 << 32) - 2)])
def test_samples_follow_the_contract(name: str, dtype: torch.dtype, p: int, s: int, s0: int, i0: int) -> None:
    seed = 42
    got = _draw(name, p, s, seed, s0, i0, dtype).float()
    ref, z, sigma = _expected(p, s, seed, s0, i0)
    assert not bool(got.isnan().any()), "an element was not written"
    tol = Z_TOL[BACKENDS[name][0]](z) * sigma + torch.finfo(torch.float32).eps * ref.abs()
    tol = tol + OUT_ULP[dtype] * ref.abs().clamp(min=torch.finfo(dtype).tiny)
    assert bool(((got - ref).abs() <= tol).all()), f"max excess {float(((got - ref).abs() - tol).max()):.3g}"


@pytest.mark.parametrize("name", list(BACKENDS))
def test_chunks_of_samples_and_of_elements_are_one_draw(name: str) -> None:
    """Bit-exact within a backend: samples [0, 9) at once == [0, 3) + [3, 9); elements likewise."""
    p, s, seed, i0 = 21, 9, 7, 1 << 33
    _, fn, _ = BACKENDS[name]
    theta, v, a, b, bounds = _problem(p, 1, 5)
    whole = _draw_args(name, fn, (theta, v, a, b, bounds), seed, 0, i0, s)
    rows = torch.cat([
        _draw_args(name, fn, (theta, v, a, b, bounds), seed, 0, i0, 3),
        _draw_args(name, fn, (theta, v, a, b, bounds), seed, 3, i0, 6),
    ])
    assert torch.equal(rows, whole)
    m = 8
    left = _draw_args(name, fn, (theta[:m], v[:m], a, b, torch.tensor([0, m])), seed, 0, i0, s)
    right = _draw_args(name, fn, (theta[m:], v[m:], a, b, torch.tensor([0, p - m])), seed, 0, i0 + m, s)
    assert torch.equal(torch.cat([left, right], dim=1), whole)


def _draw_args(name: str, fn: SampleFn, args: tuple[torch.Tensor, ...], seed: int, s0: int, i0: int, s: int):  # noqa: ANN202
    args = _on(name, *(t.contiguous() for t in args))
    out = torch.empty(s, args[0].numel(), device=args[0].device)
    fn(*args, signed(seed), s0, i0, out)
    return out.cpu()
