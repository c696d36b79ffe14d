"""Fused Triton sampler: one launch writes all S samples of all P elements (contract: :mod:`l2m_fast.ops.reference`).

Each program owns ``BLOCK`` consecutive elements: it loads ``theta`` and ``v`` once, finds each
element's segment by a branch-free binary search over ``bounds``, computes
``sigma = 1 / sqrt(a_g v + b_g)`` once, then walks the samples four at a time with **one**
``tl.philox`` call per element per four samples (counter ``(i lo, i hi, s >> 2, 0)``, key from the
64-bit seed) and Box-Muller on the four words. All index arithmetic is 64-bit. Rows outside
``[0, S)`` (a ``sample_offset`` or ``S`` that is not a multiple of four) are masked off.

Three numeric modes (constexpr ``MATH``, launcher argument ``math_mode``):

* ``"precise"`` (default on GPU): libdevice ``log``/``cos``/``sin`` and IEEE ``sqrt``; agrees with
  the reference to a few float32 ulp (``|z - z_ref| <= 2e-6``);
* ``"fast"`` (NVIDIA only): libdevice ``log``, hardware ``sin.approx``/``cos.approx`` on an argument
  kept in [-pi, pi) (``|z - z_ref| <= 2e-5``, stated and tested on GPU);
* ``"portable"``: ``tl.log``/``tl.cos``/``tl.sin``, the only mode of the CPU interpreter
  (``TRITON_INTERPRET=1``, where numpy evaluates them), which also skips autotuning.

This module imports without Triton: :data:`HAS_TRITON` says whether it is usable.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "HAS_TRITON",
    "MATH_MODES",
    "TRITON_IMPORT_ERROR",
    "interpret_mode",
    "math_constexpr",
    "sample_diag_gaussian_triton",
    "segment_steps",
]

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    TRITON_IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - exercised only where Triton is missing
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = f"Triton is not importable ({exc}); install triton to use the GPU sampler"

try:  # libdevice lives here in Triton >= 3.0; its absence only removes the precise path
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover
    libdevice = None

_TWO_NEG24 = 2.0**-24
_TWO_PI = 6.283185307179586
_INTERPRET_BLOCK = 128


def interpret_mode() -> bool:
    """Whether this module's kernels were built for the CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_sample_diag_gaussian_kernel, InterpretedFunction)


MATH_MODES = {"portable": 0, "precise": 1, "fast": 2}


def math_constexpr(math_mode: str | None) -> int:
    """The kernel's ``MATH`` constexpr for a mode name; None picks "precise", or "portable" when interpreted."""
    interp = interpret_mode()
    if math_mode is None:
        math_mode = "portable" if interp or libdevice is None else "precise"
    if math_mode not in MATH_MODES:
        raise ValueError(f"math_mode must be one of {sorted(MATH_MODES)}, got {math_mode!r}")
    if math_mode != "portable" and interp:
        raise ValueError(f"math_mode {math_mode!r} needs a GPU: the Triton interpreter runs only 'portable'")
    return MATH_MODES[math_mode]


def segment_steps(num_segments: int) -> int:
    """Binary-search steps that find the segment of an element among ``num_segments`` (0 for one)."""
    return max(num_segments - 1, 0).bit_length()


if HAS_TRITON:

    @triton.jit
    def _find_segment(starts_ptr, j, num_segments, STEPS: tl.constexpr):
        """Segment ``g`` with ``starts[g] <= j < starts[g + 1]`` (searchsorted right over starts[1:]).

        ``j`` is int64; the answer lies in ``[0, num_segments - 1]`` for every lane (masked lanes too).
        """
        lo = tl.zeros_like(j)
        hi = tl.zeros_like(j) + (num_segments - 1)
        for _ in tl.static_range(STEPS):
            mid = (lo + hi) >> 1
            active = lo < hi
            edge = tl.load(starts_ptr + 1 + mid, mask=active, other=0)
            right = edge <= j
            lo = tl.where(active & right, mid + 1, lo)
            hi = tl.where(active & (edge > j), mid, hi)
        return lo

    @triton.jit
    def _philox_quad(seed, i, q):
        """Contract step 1: Philox4x32-10 words of global elements ``i`` (int64 block) for quad ``q = s >> 2``.

        Key ``(seed lo, seed hi)`` (``tl.philox`` splits the 64-bit seed), counter ``(i lo, i hi, q, 0)``.
        """
        c0 = i.to(tl.uint32)  # low word (truncation)
        c1 = (i >> 32).to(tl.uint32)
        return tl.philox(tl.cast(seed, tl.int64), c0, c1, q.to(tl.uint32), c0 * 0)

    @triton.jit
    def _sincos_approx(x):
        """Hardware ``sin.approx``/``cos.approx`` (NVIDIA only): |error| <= 2^-20.9 on [-pi, pi]."""
        s = tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
        c = tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
        return s, c

    @triton.jit
    def _box_muller(r_a, r_b, MATH: tl.constexpr):
        """Two standard normals from two uint32 words, exactly as the contract's steps 2-3.

        ``MATH``: 0 portable ``tl.*`` functions (the interpreter), 1 libdevice (precise),
        2 libdevice log with hardware sin/cos approximations (fast, NVIDIA only).
        """
        ua = ((r_a >> 8) + 1).to(tl.float32) * 5.9604644775390625e-08  # 2^-24, in (0, 1]
        ub = (r_b >> 8).to(tl.float32) * 5.9604644775390625e-08  # [0, 1)
        if MATH == 1:
            rad = tl.sqrt_rn(-2.0 * libdevice.log(ua))
            ang = ub * 6.283185307179586
            c = libdevice.cos(ang)
            s = libdevice.sin(ang)
        elif MATH == 2:
            rad = tl.sqrt_rn(-2.0 * libdevice.log(ua))
            # cos/sin(2 pi ub) = -cos/-sin(2 pi (ub - 1/2)): keeps the argument in [-pi, pi)
            s, c = _sincos_approx((ub - 0.5) * 6.283185307179586)
            s = -s
            c = -c
        else:
            rad = tl.sqrt_rn(-2.0 * tl.log(ua))
            ang = ub * 6.283185307179586
            c = tl.cos(ang)
            s = tl.sin(ang)
        return rad * c, rad * s

    @triton.jit
    def _store_row(base, row, stride, num_samples, mask, val):
        """Stores ``val`` at ``base + row * stride`` where ``0 <= row < num_samples`` (``row``: int64 block)."""
        ok = mask & (row >= 0) & (row < num_samples)
        tl.store(
            base + row * stride,
            val.to(base.dtype.element_ty),
            mask=ok,
            cache_modifier=".cs",  # streaming store (PTX st.global.cs; cannot be combined with evict_first)
        )

    @triton.jit
    def _write_samples(base, stride, mask, theta, sigma, i, seed, sample_offset, num_samples, MATH: tl.constexpr):
        """Rows ``0..S-1`` of ``base + row * stride`` for global element indices ``i`` (int64 block).

        One Philox call per element per four samples: counter ``(i lo, i hi, s >> 2, 0)``.
        """
        zero = (i * 0).to(tl.uint32)
        s0 = tl.cast(sample_offset, tl.int64)  # tl.cast: an int arg equal to 1 arrives as a constexpr
        num_s = tl.cast(num_samples, tl.int64)
        for q in range(s0 >> 2, (s0 + num_s + 3) >> 2):
            qv = zero + q  # the quad index as a block (a Python int under the interpreter)
            r0, r1, r2, r3 = _philox_quad(seed, i, qv)
            z0, z1 = _box_muller(r0, r1, MATH)
            z2, z3 = _box_muller(r2, r3, MATH)
            row = qv.to(tl.int64) * 4 - s0
            _store_row(base, row, stride, num_s, mask, theta + sigma * z0)
            _store_row(base, row + 1, stride, num_s, mask, theta + sigma * z1)
            _store_row(base, row + 2, stride, num_s, mask, theta + sigma * z2)
            _store_row(base, row + 3, stride, num_s, mask, theta + sigma * z3)

    @triton.jit(do_not_specialize=["seed", "sample_offset", "element_offset"])
    def _sample_diag_gaussian_kernel(
        theta_ptr,
        v_ptr,
        a_ptr,
        b_ptr,
        bounds_ptr,
        out_ptr,
        n_elements,
        num_samples,
        num_segments,
        seed,
        sample_offset,
        element_offset,
        BLOCK: tl.constexpr,
        SEG_STEPS: tl.constexpr,
        MATH: tl.constexpr,
    ):
        n = tl.cast(n_elements, tl.int64)
        j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = j < n
        theta = tl.load(theta_ptr + j, mask=mask, other=0.0, eviction_policy="evict_first")
        v = tl.load(v_ptr + j, mask=mask, other=0.0, eviction_policy="evict_first")
        g = _find_segment(bounds_ptr, j, num_segments, SEG_STEPS)
        a = tl.load(a_ptr + g)
        b = tl.load(b_ptr + g, mask=mask, other=1.0)
        sigma = tl.div_rn(1.0, tl.sqrt_rn(a * v + b))

        i = tl.cast(element_offset, tl.int64) + j
        _write_samples(out_ptr + j, n, mask, theta, sigma, i, seed, sample_offset, num_samples, MATH)

    AUTOTUNE_CONFIGS = [
        triton.Config({"BLOCK": block}, num_warps=warps) for block, warps in ((512, 4), (1024, 4), (1024, 8), (2048, 8))
    ]
    # Autotuned per (P, S): in-place writes are idempotent, so re-running a config is harmless.
    _sample_diag_gaussian_kernel_tuned = triton.autotune(configs=AUTOTUNE_CONFIGS, key=["n_elements", "num_samples"])(
        _sample_diag_gaussian_kernel
    )


def sample_diag_gaussian_triton(
    theta: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    bounds: Tensor,
    seed: int,
    sample_offset: int,
    element_offset: int,
    out: Tensor,
    math_mode: str | None = None,
    block: int | None = None,
) -> None:
    """Launches the fused sampler once for all elements and samples (arguments as the op's).

    Traceable by ``torch.compile`` through :func:`torch.library.wrap_triton` (no host syncs, no
    data-dependent Python). Arguments are trusted (see ``l2m_fast.ops.sample_diag_gaussian``).

    Args:
        theta: (P,) float32, contiguous.
        v: (P,) float32, contiguous.
        a: (G,) float32.
        b: (G,) float32.
        bounds: (G + 1,) int64 segment boundaries over the P local elements.
        seed: the 64-bit seed as a signed int64 (bit pattern).
        sample_offset: global index of the first sample.
        element_offset: global flat index of ``theta[0]``.
        out: (S, P) float32, bfloat16 or float16, contiguous; written in place.
        math_mode: "precise", "fast" or "portable" (see the module doc). Default None: "precise",
            or "portable" under the interpreter.
        block: fixed elements per program, bypassing autotuning. Default None: autotuned on GPU,
            128 under the interpreter.
    """
    if not HAS_TRITON:
        raise RuntimeError(TRITON_IMPORT_ERROR)
    num_samples, n = out.shape
    if num_samples == 0 or n == 0:
        return
    interp = interpret_mode()
    g = a.shape[0]
    args = (theta, v, a, b, bounds, out, n, num_samples, g, seed, sample_offset, element_offset)
    consts = {"SEG_STEPS": segment_steps(g), "MATH": math_constexpr(math_mode)}
    if block is None and interp:
        block = _INTERPRET_BLOCK
    if block is None:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)
        torch.library.wrap_triton(_sample_diag_gaussian_kernel_tuned)[grid](*args, **consts)
    else:
        grid = (triton.cdiv(n, block),)
        torch.library.wrap_triton(_sample_diag_gaussian_kernel)[grid](*args, BLOCK=block, **consts)
