"""Fused Triton sampler: one launch writes all S samples of all P elements (contract: :mod:`l2m_fast.ops.reference`).

**Work split.** A program owns ``BLOCK`` consecutive elements: it loads ``theta`` and ``v`` once,
computes ``sigma = 1 / sqrt(a_g v + b_g)`` once (IEEE, ``g`` by a branch-free binary search over
``bounds``), then for each *quad* ``q`` (four samples sharing one Philox call, counter
``(i lo, i hi, q, 0)``) turns the four words into four normals (Box-Muller) and stores the rows.
For S > 1 the grid is two-dimensional: axis 0 over element blocks, axis 1 over chunks of quads when
there are too few blocks to fill the GPU (P = 1e4, S = 1024 still gets about 16 programs per
multiprocessor). For S = 1 the grid is persistent: about 16 programs per multiprocessor, each
walking blocks ``pid, pid + programs, ...`` through straight-line code.

**No arithmetic for rows nobody stores.** Quads whose four rows all lie in ``[0, S)`` run an
unconditional loop; the (at most two) partial quads at the ends run a second body in which uniform
branches (the same for every thread) skip the second Box-Muller pair when rows ``4q+2, 4q+3`` are
outside ``[0, S)`` and the sine when row ``4q+1`` is; S = 1 computes one word pair and one
polynomial (cosine or sine, chosen per program) per element.

**Stores.** Rows are written with 16-byte vector stores (``st.global.cs.v4``) whenever the row
starts are 16-byte aligned: the launcher passes the row stride as ``stride_vec * VEC`` and the
element count as ``n_vec * VEC`` (``VEC`` = 16 bytes / output element size, a constexpr), so the
alignment is known to the compiler even when ``P % 16 != 0``; with S = 1 every ``P`` qualifies (an
aligned vector body, then a masked scalar tail). Rows that start off a 16-byte boundary (S > 1 and
``P % VEC != 0``, or an output that is not 16-byte aligned) take scalar stores, still coalesced:
vectors there would need data moved between threads. Every tensor of the sample loop has the
loads' layout (see ``triton_device.counter_words``): no layout conversion or barrier inside it.

**Numeric modes** (constexpr ``MATH``, launcher argument ``math_mode``; device code and
polynomials in :mod:`.triton_device`):

* ``"precise"`` (the default, GPU and interpreter): Triton-language arithmetic only.
  ``-2 ln ua`` by an exponent/mantissa split (``m`` in [2/3, 4/3)) and a degree-10 minimax
  polynomial; IEEE square root; ``cos``/``sin`` of the contract's very float32 argument
  ``ang = fl(ub * fl(2 pi))``, one reduction ``ang = x + k pi`` shared by both (first step exact),
  minimax polynomials on ``|x| <= pi/2``, ``(-1)^k`` folded into the radius. Every rounding is
  explicit (FMAs, IEEE square root and reciprocal), so the CPU interpreter computes the GPU's bits.
  Measured on the CPU over all 2^24 uniforms: ``-2 ln ua`` within 1.5e-7 relative, the radius within
  4.8e-7 of PyTorch's float32 ``sqrt(-2 log ua)`` (whose own square root is not correctly rounded;
  ours is), and at the largest radius (5.77) ``|z - z_ref| <= 9.6e-7`` over every angle; hence
  ``|z - z_ref| <= 1.5e-6`` everywhere (stated bound 2e-6).
* ``"fast"`` (NVIDIA only): the same radius, hardware ``sin.approx``/``cos.approx`` of
  ``2 pi ub - pi`` (absolute error <= 2^-20.9 on [-pi, pi]): ``|z - z_ref| <= 2e-5``.
* ``"portable"``: ``tl.log``/``tl.cos``/``tl.sin`` (numpy under the interpreter, the backend's own
  functions on GPU), stated bound 2e-6 against the reference.

**Launch configurations** (``BLOCK``, ``num_warps``) are tuned once per problem on CUDA by
:class:`Tuner`, which never times a candidate on data an output aliases: when ``out`` overlaps
``theta`` or ``v`` (in-place sampling at S = 1) the candidates run on a scratch output, and the
chosen one then runs once on the real output. Under the interpreter, while tracing or capturing a
CUDA graph, or with ``block=...``, a fixed configuration serves.

This module imports without Triton: :data:`HAS_TRITON` says whether it is usable.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "HAS_TRITON",
    "MATH_MODES",
    "TRITON_IMPORT_ERROR",
    "LaunchConfig",
    "Tuner",
    "interpret_mode",
    "math_constexpr",
    "launch_grid",
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

MATH_MODES = {"portable": 0, "precise": 1, "fast": 2}
_INTERPRET_BLOCK = 128
_INTERPRET_SMS = 2  # stand-in multiprocessor count under the interpreter: small, so sample chunks are exercised
_PROGRAMS_PER_SM = 16
_I32_LIMIT = (1 << 31) - 1


def interpret_mode() -> bool:
    """Whether this module's kernels were built for the CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(flat_kernel, InterpretedFunction)


def math_constexpr(math_mode: str | None) -> int:
    """The kernels' ``MATH`` constexpr for a mode name; None picks "precise" (GPU and interpreter alike)."""
    if math_mode is None:
        math_mode = "precise"
    if math_mode not in MATH_MODES:
        raise ValueError(f"math_mode must be one of {sorted(MATH_MODES)}, got {math_mode!r}")
    if math_mode == "fast" and interpret_mode():
        raise ValueError("math_mode 'fast' needs a GPU (hardware sin/cos); the interpreter runs 'precise', 'portable'")
    return MATH_MODES[math_mode]


def segment_steps(num_segments: int) -> int:
    """Binary-search steps that find the segment of an element among ``num_segments`` (0 for one)."""
    return max(num_segments - 1, 0).bit_length()


@dataclass(frozen=True)
class LaunchConfig:
    """One launch configuration: elements per program and warps per program."""

    block: int
    num_warps: int


# The tuning candidates (the first is the default): 4 elements per thread (one 16-byte float32 vector)
# or 8 (one 16-byte bfloat16 vector, about 165 registers).
CONFIGS = (LaunchConfig(512, 4), LaunchConfig(1024, 4))


def config_for_block(block: int) -> LaunchConfig:
    """The configuration of a caller-fixed ``block``: 4 elements per thread, 1 to 8 warps."""
    return LaunchConfig(block, max(1, min(8, block // 128)))


def _bench_cuda(fn: Callable[[], None]) -> float:
    return float(triton.testing.do_bench(fn, warmup=2, rep=10, return_mode="median"))


class Tuner:
    """Chooses a :class:`LaunchConfig` per problem key by timing each candidate once, then remembers it.

    The caller hands :meth:`pick` a ``run(config)`` that launches on an output it may overwrite
    freely (the real output when nothing aliases it, else a scratch buffer), or None when it cannot
    tune (tracing, or an aliased call without scratch): then the default config serves, uncached.

    Attributes:
        configs: the candidates, the first one the default.
        bench: ``bench(fn) -> ms``; None times with ``triton.testing.do_bench`` (CUDA). Tests set a
            stand-in to tune under the interpreter.
        force: tune under the interpreter too (tests).
    """

    def __init__(self, configs: tuple[LaunchConfig, ...]) -> None:
        self.configs = configs
        self.cache: dict[Hashable, LaunchConfig] = {}
        self.bench: Callable[[Callable[[], None]], float] | None = None
        self.force = False

    def pick(self, key: Hashable, run: Callable[[LaunchConfig], None] | None) -> LaunchConfig:
        """The tuned config for ``key`` (timing the candidates through ``run`` on first use)."""
        if key in self.cache:
            return self.cache[key]
        if run is None:
            return self.configs[0]
        bench = self.bench or _bench_cuda
        times = {cfg: bench(lambda cfg=cfg: run(cfg)) for cfg in self.configs}
        best = min(self.configs, key=lambda cfg: times[cfg])
        self.cache[key] = best
        return best

    def active(self) -> bool:
        """Whether calls without a fixed block tune here (CUDA, or the interpreter when forced)."""
        return self.force or not interpret_mode()


FLAT_TUNER = Tuner(CONFIGS)
_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if interpret_mode() or device.type != "cuda" or not torch.cuda.is_available():
        return _INTERPRET_SMS if interpret_mode() else 132
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def launch_grid(num_blocks: int, num_samples: int, sample_offset: int, device: torch.device) -> tuple[int, int, int]:
    """The grid: ``(programs over blocks, quads per program, chunks of quads)``.

    S > 1: one program per element block, the quads of samples ``[s0, s0 + S)`` split into chunks
    (grid axis 1) only when there are too few blocks to give about 16 programs per multiprocessor.
    S = 1: a persistent grid of about 16 programs per multiprocessor, each walking blocks
    ``pid, pid + programs, ...`` (per-program set-up, such as the Philox key schedule, done once).
    """
    target = _PROGRAMS_PER_SM * _sm_count(device)
    if num_samples == 1:
        return min(num_blocks, target), 1, 1
    n_quads = ((sample_offset + num_samples + 3) >> 2) - (sample_offset >> 2)
    chunks = min(n_quads, max(1, -(-target // max(num_blocks, 1))))
    per = -(-n_quads // chunks)
    return num_blocks, per, -(-n_quads // per)


def real_tensor(t: Tensor) -> bool:
    """A tensor with storage we can read the address of (not fake, functional or traced)."""
    return (type(t) is torch.Tensor or type(t) is torch.nn.Parameter) and not torch.compiler.is_compiling()


def can_time(device: torch.device) -> bool:
    """Whether candidates may be launched and timed now (not while a CUDA graph is being captured)."""
    return device.type != "cuda" or not torch.cuda.is_current_stream_capturing()


def overlaps(x: Tensor, y: Tensor) -> bool:
    """Whether the memory of two real tensors intersects (by address ranges)."""
    if x.numel() == 0 or y.numel() == 0:
        return False
    x0, y0 = x.data_ptr(), y.data_ptr()
    return x0 < y0 + y.numel() * y.element_size() and y0 < x0 + x.numel() * x.element_size()


@dataclass(frozen=True)
class RowPlan:
    """How the rows of an ``(S, P)`` output are stored: ``P = n_vec * vec + n_rest``, stride ``stride_vec * vec``."""

    vec: int
    n_vec: int
    n_rest: int
    stride_vec: int


def row_plan(out: Tensor, num_samples: int, n: int, aligned_base: bool) -> RowPlan:
    """Vector width and strides for the rows of ``out`` (see the module doc, "Stores")."""
    vec = 16 // out.element_size()
    if aligned_base and n % vec == 0:
        return RowPlan(vec, n // vec, 0, n // vec)
    if aligned_base and num_samples == 1:  # one row: its stride is never used
        return RowPlan(vec, n // vec, n % vec, 0)
    return RowPlan(1, n, 0, n)


def base_aligned(out: Tensor) -> bool:
    """Whether ``out`` starts on a 16-byte boundary (from its storage offset while tracing)."""
    if real_tensor(out):
        return out.data_ptr() % 16 == 0
    return (out.storage_offset() * out.element_size()) % 16 == 0


if HAS_TRITON:
    from .triton_device import counter_words, inv_sqrt_rn, write_samples

    @triton.jit
    def _find_segment(starts_ptr, j, num_segments, STEPS: tl.constexpr):
        """Segment ``g`` with ``starts[g] <= j < starts[g + 1]`` (searchsorted right over starts[1:]).

        ``j`` is an int block; the answer lies in ``[0, num_segments - 1]`` for every lane (masked lanes too).
        """
        lo = (j * 0).to(tl.int64)
        hi = lo + (num_segments - 1)
        for _ in tl.static_range(STEPS):
            mid = (lo + hi) >> 1
            active = lo < hi
            edge = tl.load(starts_ptr + 1 + mid, mask=active, other=0)
            right = edge <= j
            lo = tl.where(active & right, mid + 1, lo)
            hi = tl.where(active & (edge > j), mid, hi)
        return lo

    @triton.jit(do_not_specialize=["seed", "sample_offset", "element_offset"])
    def flat_kernel(
        theta_ptr,
        v_ptr,
        a_ptr,
        b_ptr,
        bounds_ptr,
        out_ptr,
        n_vec,
        n_rest,
        stride_vec,
        num_samples,
        num_segments,
        seed,
        sample_offset,
        element_offset,
        quads_per_program,
        num_blocks,
        VEC: tl.constexpr,
        TAIL: tl.constexpr,
        ONE_ROW: tl.constexpr,
        WIDE: tl.constexpr,
        BLOCK: tl.constexpr,
        SEG_STEPS: tl.constexpr,
        MATH: tl.constexpr,
    ):
        """Program ``(p, c)`` writes the rows of quad chunk ``c`` for element blocks ``p, p + programs, ...``.

        ``P = n_vec * VEC + n_rest``; row ``s`` of ``out`` starts at ``s * stride_vec * VEC``.
        Reference: :func:`l2m_fast.ops.reference.sample_diag_gaussian_ref`.
        """
        n_body = tl.cast(n_vec, tl.int64) * VEC  # elements stored by vector stores
        n_all = n_body + n_rest
        row_stride = tl.cast(stride_vec, tl.int64) * VEC
        s0 = tl.cast(sample_offset, tl.int64)
        num_s = tl.cast(num_samples, tl.int64)
        qa = (s0 >> 2) + tl.program_id(1) * tl.cast(quads_per_program, tl.int64)
        qb = tl.minimum(qa + quads_per_program, (s0 + num_s + 3) >> 2)
        args = (
            theta_ptr,
            v_ptr,
            a_ptr,
            b_ptr,
            bounds_ptr,
            out_ptr,
            n_body,
            n_all,
            row_stride,
            num_segments,
            seed,
            s0,
            num_s,
            element_offset,
            qa,
            qb,
        )
        if ONE_ROW:  # persistent: program p walks blocks p, p + programs, ...
            for blk in range(tl.program_id(0), num_blocks, tl.num_programs(0)):
                _flat_block(blk, *args, TAIL, ONE_ROW, WIDE, BLOCK, SEG_STEPS, MATH)
        else:
            _flat_block(tl.program_id(0), *args, TAIL, ONE_ROW, WIDE, BLOCK, SEG_STEPS, MATH)

    @triton.jit
    def _flat_block(
        blk,
        theta_ptr,
        v_ptr,
        a_ptr,
        b_ptr,
        bounds_ptr,
        out_ptr,
        n_body,
        n_all,
        row_stride,
        num_segments,
        seed,
        s0,
        num_s,
        element_offset,
        qa,
        qb,
        TAIL: tl.constexpr,
        ONE_ROW: tl.constexpr,
        WIDE: tl.constexpr,
        BLOCK: tl.constexpr,
        SEG_STEPS: tl.constexpr,
        MATH: tl.constexpr,
    ):
        """Element block ``blk`` of :func:`flat_kernel`: loads, ``sigma``, counters, then its rows."""
        if WIDE:
            start = tl.cast(blk, tl.int64) * BLOCK
            offs = tl.arange(0, BLOCK).to(tl.int64)
        else:
            start = blk * BLOCK
            offs = tl.arange(0, BLOCK)
        emask = offs < n_all - start
        theta = tl.load(theta_ptr + start + offs, mask=emask, other=0.0, eviction_policy="evict_first")
        v = tl.load(v_ptr + start + offs, mask=emask, other=0.0, eviction_policy="evict_first")
        if SEG_STEPS == 0:
            a = tl.load(a_ptr)
            b = tl.load(b_ptr)
        else:
            g = _find_segment(bounds_ptr, start + offs, num_segments, SEG_STEPS)
            a = tl.load(a_ptr + g)
            b = tl.load(b_ptr + g, mask=emask, other=1.0)
        sigma = inv_sqrt_rn(tl.fma(a, v, b))
        c0, c1 = counter_words(tl.cast(element_offset, tl.int64) + start + offs, v)
        write_samples(
            out_ptr + start,
            offs,
            offs < n_body - start,
            (offs >= n_body - start) & emask,
            row_stride,
            theta,
            sigma,
            c0,
            c1,
            seed,
            s0,
            num_s,
            qa,
            qb,
            ONE_ROW,
            TAIL,
            MATH,
        )


def _launch_flat(
    args: tuple, plan: RowPlan, cfg: LaunchConfig, n: int, num_samples: int, sample_offset: int, consts: dict
) -> None:
    """One launch of :func:`flat_kernel` with ``cfg`` (``args``: the tensors and scalars before the plan)."""
    theta, v, a, b, bounds, out, seed, element_offset = args
    blocks = triton.cdiv(n, cfg.block)
    programs, per, chunks = launch_grid(blocks, num_samples, sample_offset, out.device)
    torch.library.wrap_triton(flat_kernel)[(programs, chunks)](
        theta,
        v,
        a,
        b,
        bounds,
        out,
        plan.n_vec,
        plan.n_rest,
        plan.stride_vec,
        num_samples,
        a.shape[0],
        seed,
        sample_offset,
        element_offset,
        per,
        blocks,
        VEC=plan.vec,
        TAIL=plan.n_rest > 0,
        ONE_ROW=num_samples == 1,
        WIDE=n + cfg.block > _I32_LIMIT,
        BLOCK=cfg.block,
        num_warps=cfg.num_warps,
        **consts,
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
    data-dependent Python; while tracing the config is the tuned one if known, else the default).
    Arguments are trusted (see ``l2m_fast.ops.sample_diag_gaussian``).

    Args:
        theta: (P,) float32, contiguous.
        v: (P,) float32, contiguous.
        a: (G,) float32.
        b: (G,) float32.
        bounds: (G + 1,) int64 segment boundaries over the P local elements.
        seed: the 64-bit seed as a signed int64 (bit pattern).
        sample_offset: global index of the first sample.
        element_offset: global flat index of ``theta[0]``.
        out: (S, P) float32, bfloat16 or float16, contiguous; written in place. May alias ``theta``
            (in-place sampling, S = 1).
        math_mode: "precise", "fast" or "portable" (see the module doc). Default None: "precise".
        block: fixed elements per program, bypassing tuning. Default None: tuned on CUDA, 128 under
            the interpreter.
    """
    if not HAS_TRITON:
        raise RuntimeError(TRITON_IMPORT_ERROR)
    num_samples, n = out.shape
    if num_samples == 0 or n == 0:
        return
    consts = {"SEG_STEPS": segment_steps(a.shape[0]), "MATH": math_constexpr(math_mode)}
    plan = row_plan(out, num_samples, n, base_aligned(out))
    args = (theta, v, a, b, bounds, out, seed, element_offset)
    if block is not None:
        cfg = config_for_block(block)
    elif not FLAT_TUNER.active():
        cfg = config_for_block(_INTERPRET_BLOCK)
    else:
        key = ("flat", n, num_samples, out.dtype, plan, a.shape[0] > 1, consts["MATH"])
        run = None
        if all(real_tensor(t) for t in (theta, v, out)) and can_time(out.device):
            # An output that aliases an input must not be written once per candidate: tune on scratch.
            target = torch.empty_like(out) if overlaps(out, theta) or overlaps(out, v) else out
            sub = (theta, v, a, b, bounds, target, seed, element_offset)
            run = lambda cfg: _launch_flat(sub, plan, cfg, n, num_samples, sample_offset, consts)  # noqa: E731
        cfg = FLAT_TUNER.pick(key, run)
    _launch_flat(args, plan, cfg, n, num_samples, sample_offset, consts)
