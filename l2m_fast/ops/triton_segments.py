"""One launch for many separate tensors: the fused sampler over a pointer/segment table.

For live parameters of a large model (no flat copy), :func:`sample_into_segments` writes S samples
of every tensor ``k`` into its own output ``outs[k]`` (often the parameter itself, S = 1) in **one**
kernel launch, however many tensors there are. Samples follow the sampling contract
(:mod:`l2m_fast.ops.reference`) exactly as the flat op does: element ``e`` of tensor ``k`` has
global index ``element_offsets[k] + e``, and the device code is the flat kernel's
(:mod:`.triton_device`), so the two agree bit for bit.

**Program map.** Each program owns ``BLOCK`` consecutive elements of one tensor. A small int64 map,
built once per table and block size on the host and cached in the :class:`SegmentTable`, gives
program ``p`` its tensor's data pointers (advanced to the block), the global index of its first
element, its group, its element count and row stride: no per-element search. A tensor whose
``theta``, ``v`` and ``out`` start on 16-byte boundaries and whose size is a multiple of the output
vector (16 bytes) is *aligned*: its programs store 16-byte vectors; others store scalars. When
some tensors are aligned and some not, a uniform branch per program picks the path.

**Tuning.** On CUDA the launch configuration is tuned once per problem, on scratch outputs when an
output aliases an input (in-place sampling), so no parameter is written more than once.

Eager only: the table holds raw data pointers, which ``torch.compile`` cannot trace (the function
is excluded from compilation). Build the table once with :func:`segment_table` and pass it to
repeated calls to skip the host-side work.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .reference import sample_diag_gaussian_ref
from .sample import OUTPUT_DTYPES, _signed_seed
from .triton_kernel import (
    _INTERPRET_BLOCK,
    HAS_TRITON,
    TRITON_IMPORT_ERROR,
    LaunchConfig,
    Tuner,
    can_time,
    config_for_block,
    launch_grid,
    math_constexpr,
)

__all__ = ["SegmentTable", "segment_table", "sample_into_segments", "sample_into_segments_ref"]

_TABLE_COLUMNS = 5  # theta address, v address, out address, global element offset, group
_MAP_COLUMNS = 8  # theta, v, out addresses of the block; global index; group; elements / unit; stride / unit; aligned
# 4 elements per thread (at most about 90 registers); 256 divides the 768-wide tensors of a transformer.
SEG_CONFIGS = (LaunchConfig(512, 4), LaunchConfig(256, 2))
SEG_TUNER = Tuner(SEG_CONFIGS)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .triton_device import counter_words, inv_sqrt_rn, write_samples

    @triton.jit
    def _segment_block(
        entry,
        a_ptr,
        b_ptr,
        seed,
        s0,
        num_s,
        qa,
        qb,
        OUT_DTYPE: tl.constexpr,
        V: tl.constexpr,
        ONE_ROW: tl.constexpr,
        BLOCK: tl.constexpr,
        MATH: tl.constexpr,
    ):
        """The block of one map entry: ``V`` > 1 for an aligned tensor (16-byte vectors), 1 otherwise."""
        theta_ptr = tl.load(entry).to(tl.pointer_type(tl.float32))
        v_ptr = tl.load(entry + 1).to(tl.pointer_type(tl.float32))
        out_ptr = tl.load(entry + 2).to(tl.pointer_type(OUT_DTYPE))
        if V > 1:
            theta_ptr = tl.multiple_of(theta_ptr, 16)
            v_ptr = tl.multiple_of(v_ptr, 16)
            out_ptr = tl.multiple_of(out_ptr, 16)
        group = tl.load(entry + 4)
        n = tl.load(entry + 5) * V
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        theta = tl.load(theta_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first")
        v = tl.load(v_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first")
        sigma = inv_sqrt_rn(tl.fma(tl.load(a_ptr + group), v, tl.load(b_ptr + group)))
        c0, c1 = counter_words(tl.load(entry + 3) + offs, v)
        write_samples(
            out_ptr,
            offs,
            mask,
            mask,
            tl.load(entry + 6) * V,
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
            False,
            MATH,
        )

    @triton.jit(do_not_specialize=["seed", "sample_offset"])
    def segments_kernel(
        map_ptr,
        a_ptr,
        b_ptr,
        num_entries,
        num_samples,
        seed,
        sample_offset,
        quads_per_program,
        OUT_DTYPE: tl.constexpr,
        ALIGN: tl.constexpr,
        VEC: tl.constexpr,
        ONE_ROW: tl.constexpr,
        BLOCK: tl.constexpr,
        MATH: tl.constexpr,
    ):
        """Program ``(p, c)``: map entries ``p, p + programs, ...``, quad chunk ``c``.

        ``ALIGN``: 0 no tensor aligned, 1 all, 2 some (a uniform branch per entry). Reference:
        :func:`sample_into_segments_ref`.
        """
        s0 = tl.cast(sample_offset, tl.int64)
        num_s = tl.cast(num_samples, tl.int64)
        qa = (s0 >> 2) + tl.program_id(1) * tl.cast(quads_per_program, tl.int64)
        qb = tl.minimum(qa + quads_per_program, (s0 + num_s + 3) >> 2)
        args = (a_ptr, b_ptr, seed, s0, num_s, qa, qb)
        if ONE_ROW:  # persistent: program p walks entries p, p + programs, ...
            for k in range(tl.program_id(0), num_entries, tl.num_programs(0)):
                entry = map_ptr + tl.cast(k, tl.int64) * 8
                _segment_entry(entry, *args, OUT_DTYPE, ALIGN, VEC, ONE_ROW, BLOCK, MATH)
        else:
            entry = map_ptr + tl.program_id(0).to(tl.int64) * 8
            _segment_entry(entry, *args, OUT_DTYPE, ALIGN, VEC, ONE_ROW, BLOCK, MATH)

    @triton.jit
    def _segment_entry(
        entry,
        a_ptr,
        b_ptr,
        seed,
        s0,
        num_s,
        qa,
        qb,
        OUT_DTYPE: tl.constexpr,
        ALIGN: tl.constexpr,
        VEC: tl.constexpr,
        ONE_ROW: tl.constexpr,
        BLOCK: tl.constexpr,
        MATH: tl.constexpr,
    ):
        """One map entry, on the vector path when its tensor is aligned."""
        args = (entry, a_ptr, b_ptr, seed, s0, num_s, qa, qb)
        if ALIGN == 1:
            _segment_block(*args, OUT_DTYPE, VEC, ONE_ROW, BLOCK, MATH)
        elif ALIGN == 0:
            _segment_block(*args, OUT_DTYPE, 1, ONE_ROW, BLOCK, MATH)
        else:
            if tl.load(entry + 7) != 0:
                _segment_block(*args, OUT_DTYPE, VEC, ONE_ROW, BLOCK, MATH)
            else:
                _segment_block(*args, OUT_DTYPE, 1, ONE_ROW, BLOCK, MATH)

    _TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@dataclass(frozen=True)
class SegmentTable:
    """The tensors of one :func:`sample_into_segments` problem, as the device sees them (see :func:`segment_table`).

    Attributes:
        table: (T, 5) int64: theta, v and out data pointers, global element offset, group.
        starts: (T + 1,) int64 cumulative element counts of the non-empty tensors.
        num_elements: total elements, ``starts[-1]``.
        num_samples: S, rows of every output.
        out_dtype: dtype shared by the outputs.
        keep_alive: the tensors the pointers refer to.
        aligned: per non-empty tensor, whether its programs use 16-byte vector stores.
        aliased: whether some output overlaps some theta or v (tuning then runs on scratch outputs).
        maps: program maps by block size, built on first use (see :meth:`program_map`).
    """

    table: Tensor
    starts: Tensor
    num_elements: int
    num_samples: int
    out_dtype: torch.dtype
    keep_alive: tuple[Tensor, ...]
    aligned: tuple[bool, ...] = ()
    aliased: bool = False
    rows: tuple[tuple[int, ...], ...] = ()
    maps: dict[int, Tensor] = field(default_factory=dict, compare=False, repr=False)

    @property
    def vec(self) -> int:
        """Output elements per 16-byte vector."""
        return 16 // torch.empty((), dtype=self.out_dtype).element_size()

    @property
    def align_kind(self) -> int:
        """The kernel's ``ALIGN``: 0 no tensor aligned, 1 every tensor, 2 some."""
        return 1 if all(self.aligned) else (0 if not any(self.aligned) else 2)

    def program_map(self, block: int) -> Tensor:
        """(E, 8) int64, one row per program (entry) for ``block`` elements per program; cached.

        Row: theta, v, out addresses of the entry's first element; its global index; group;
        elements left in the tensor and row stride, both in units of ``vec`` (aligned) or 1; aligned.
        """
        if block not in self.maps:
            esize = torch.empty((), dtype=self.out_dtype).element_size()
            entries = []
            for (th, v, o, off, g, n), ok in zip(self.rows, self.aligned, strict=True):
                unit = self.vec if ok else 1
                for e in range(0, n, block):
                    left, stride = (n - e) // unit, n // unit
                    entries.append([th + 4 * e, v + 4 * e, o + esize * e, off + e, g, left, stride, int(ok)])
            self.maps[block] = torch.tensor(entries, dtype=torch.int64).reshape(-1, _MAP_COLUMNS).to(self.table.device)
        return self.maps[block]


def _default_offsets(thetas: Sequence[Tensor], element_offsets: Sequence[int] | None) -> list[int]:
    if element_offsets is not None:
        if len(element_offsets) != len(thetas):
            raise ValueError(f"element_offsets needs one entry per tensor ({len(thetas)}), got {len(element_offsets)}")
        return [int(x) for x in element_offsets]
    offsets, acc = [], 0
    for t in thetas:
        offsets.append(acc)
        acc += t.numel()
    return offsets


def _check_lists(
    thetas: Sequence[Tensor], vs: Sequence[Tensor], outs: Sequence[Tensor], groups: Sequence[int] | None
) -> tuple[int, list[int]]:
    if not (len(thetas) == len(vs) == len(outs)) or len(thetas) == 0:
        raise ValueError(
            f"thetas, vs and outs must be non-empty lists of one length, got {len(thetas)}, {len(vs)}, {len(outs)}"
        )
    groups = [0] * len(thetas) if groups is None else [int(g) for g in groups]
    if len(groups) != len(thetas):
        raise ValueError(f"groups needs one entry per tensor ({len(thetas)}), got {len(groups)}")
    device, dtype = outs[0].device, outs[0].dtype
    if dtype not in OUTPUT_DTYPES:
        raise TypeError(f"outs must be one of {OUTPUT_DTYPES}, got {dtype}")
    num_samples = None
    for k, (th, v, o) in enumerate(zip(thetas, vs, outs, strict=True)):
        if th.dtype != torch.float32 or v.dtype != torch.float32:
            raise TypeError(f"thetas[{k}] and vs[{k}] must be float32, got {th.dtype} and {v.dtype}")
        if not (th.is_contiguous() and v.is_contiguous() and o.is_contiguous()):
            raise ValueError(f"tensor {k}: thetas, vs and outs must be contiguous")
        if th.numel() != v.numel():
            raise ValueError(f"tensor {k}: theta has {th.numel()} elements but v {v.numel()}")
        if o.dtype != dtype or th.device != device or v.device != device or o.device != device:
            raise ValueError(f"tensor {k}: all outs must share one dtype and all tensors one device")
        if th.numel() == 0:
            continue
        if o.numel() % th.numel():
            raise ValueError(f"tensor {k}: out has {o.numel()} elements, not a multiple of theta's {th.numel()}")
        s = o.numel() // th.numel()
        if num_samples is not None and s != num_samples:
            raise ValueError(f"tensor {k}: out holds {s} samples, earlier outs {num_samples}")
        num_samples = s
        if s > 1 and (o.data_ptr() == th.data_ptr() or o.data_ptr() == v.data_ptr()):
            raise ValueError(f"tensor {k}: out may alias theta only for one sample (S = 1)")
    return (0 if num_samples is None else num_samples), groups


def segment_table(
    thetas: Sequence[Tensor],
    vs: Sequence[Tensor],
    outs: Sequence[Tensor],
    *,
    groups: Sequence[int] | None = None,
    element_offsets: Sequence[int] | None = None,
) -> SegmentTable:
    """Builds the pointer/segment table of :func:`sample_into_segments` (host work, one copy to the device).

    Args:
        thetas: T tensors, float32 contiguous, any shapes; tensor ``k`` has ``n_k`` elements.
        vs: T tensors, float32 contiguous, ``n_k`` elements each.
        outs: T tensors, contiguous, one dtype (float32, bfloat16 or float16), ``S * n_k`` elements
            each, read as ``(S, n_k)``. ``outs[k]`` may be ``thetas[k]`` itself when S = 1.
        groups: group of each tensor (index into ``a`` and ``b``). Default None: all 0.
        element_offsets: global flat index of element 0 of each tensor. Default None: the running
            sum of ``n_k`` (the tensors laid out back to back, as the posterior's flat order).

    Returns:
        The table; it refers to the tensors' storage and stays valid while they are not reallocated.
    """
    num_samples, groups = _check_lists(thetas, vs, outs, groups)
    offsets = _default_offsets(thetas, element_offsets)
    rows, starts, keep, aligned = [], [0], [], []
    vec = 16 // outs[0].element_size()
    for th, v, o, off, g in zip(thetas, vs, outs, offsets, groups, strict=True):
        if th.numel() == 0:
            continue
        rows.append((th.data_ptr(), v.data_ptr(), o.data_ptr(), off, g))
        starts.append(starts[-1] + th.numel())
        keep += [th, v, o]
        aligned.append(th.numel() % vec == 0 and all(x.data_ptr() % 16 == 0 for x in (th, v, o)))
    device = outs[0].device
    table = torch.tensor([list(r) for r in rows], dtype=torch.int64).reshape(-1, _TABLE_COLUMNS).to(device)
    return SegmentTable(
        table,
        torch.tensor(starts, dtype=torch.int64).to(device),
        starts[-1],
        num_samples,
        outs[0].dtype,
        tuple(keep),
        aligned=tuple(aligned),
        aliased=_any_overlap([t for t in keep[0::3]] + [t for t in keep[1::3]], keep[2::3]),
        rows=tuple(r + (n,) for r, n in zip(rows, (b - a for a, b in zip(starts, starts[1:])), strict=True)),
    )


def _any_overlap(inputs: Sequence[Tensor], outputs: Sequence[Tensor]) -> bool:
    """Whether some output's memory intersects some input's (sorted address ranges, O((m + n) log m))."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in inputs if t.numel())
    lows = [lo for lo, _ in spans]
    reach, ends = 0, []  # ends[i]: the furthest end among spans[:i + 1]
    for _, hi in spans:
        reach = max(reach, hi)
        ends.append(reach)
    for o in outputs:
        lo, hi = o.data_ptr(), o.data_ptr() + o.numel() * o.element_size()
        k = bisect.bisect_left(lows, hi)  # spans starting before the output ends
        if o.numel() and k > 0 and ends[k - 1] > lo:
            return True
    return False


def _segment_params(
    a: float | Sequence[float] | Tensor, b: float | Sequence[float] | Tensor, device: torch.device
) -> tuple[Tensor, Tensor]:
    a_t = torch.as_tensor(a, dtype=torch.float32, device=device).reshape(-1).contiguous()
    b_t = torch.as_tensor(b, dtype=torch.float32, device=device).reshape(-1).contiguous()
    if a_t.numel() != b_t.numel():
        g = max(a_t.numel(), b_t.numel())
        a_t = a_t.expand(g).contiguous() if a_t.numel() == 1 else a_t
        b_t = b_t.expand(g).contiguous() if b_t.numel() == 1 else b_t
    if a_t.numel() != b_t.numel() or a_t.numel() == 0:
        raise ValueError(f"a and b must give one value per group, got {a_t.numel()} and {b_t.numel()}")
    return a_t, b_t


@torch.compiler.disable
def sample_into_segments(
    thetas: Sequence[Tensor],
    vs: Sequence[Tensor],
    outs: Sequence[Tensor],
    *,
    a: float | Sequence[float] | Tensor = 1.0,
    b: float | Sequence[float] | Tensor = 0.0,
    groups: Sequence[int] | None = None,
    seed: int = 0,
    sample_offset: int = 0,
    element_offsets: Sequence[int] | None = None,
    table: SegmentTable | None = None,
    math_mode: str | None = None,
    block: int | None = None,
) -> None:
    """Writes ``outs[k][s, e] = thetas[k][e] + z(seed, off_k + e, s0 + s) / sqrt(a_g v + b_g)`` in one launch.

    Args:
        thetas: T tensors, float32 contiguous; tensor ``k`` has ``n_k`` elements.
        vs: T tensors, float32 contiguous, ``n_k`` elements each.
        outs: T tensors, contiguous, one dtype, ``S * n_k`` elements each, read as ``(S, n_k)``;
            written in place. ``outs[k]`` may be ``thetas[k]`` when S = 1 (in-place sampling).
        a: per-group scale of ``v`` in the precision, a float or (G,). Default 1.0.
        b: per-group additive precision, a float or (G,). Default 0.0.
        groups: group of each tensor. Default None: all 0.
        seed: 64-bit seed in [0, 2^64). Default 0.
        sample_offset: global index of the first sample. Default 0.
        element_offsets: global flat index of element 0 of each tensor. Default None: running sum.
        table: a table from :func:`segment_table` for these very tensors (skips rebuilding it;
            ``groups`` and ``element_offsets`` are then taken from the table). Default None.
        math_mode: "precise", "fast" or "portable" (see :mod:`.triton_kernel`). Default None: "precise".
        block: elements per program, bypassing tuning. Default None: tuned on CUDA (on scratch outputs
            when an output aliases an input), 128 under the interpreter.
    """
    if not HAS_TRITON:
        raise RuntimeError(TRITON_IMPORT_ERROR)
    if table is None:
        table = segment_table(thetas, vs, outs, groups=groups, element_offsets=element_offsets)
    if table.num_elements == 0 or table.num_samples == 0:
        return
    a_t, b_t = _segment_params(a, b, table.table.device)
    seed, math = _signed_seed(seed), math_constexpr(math_mode)
    if block is not None:
        cfg = config_for_block(block)
    elif not SEG_TUNER.active():
        cfg = config_for_block(_INTERPRET_BLOCK)
    else:
        key = ("segments", table.num_elements, table.num_samples, table.out_dtype, len(table.rows), table.align_kind)
        run = None
        if key + (math,) not in SEG_TUNER.cache and can_time(table.table.device):
            scratch = table
            if table.aliased:  # never time candidates on parameters being sampled: scratch outputs
                scratch = segment_table(thetas, vs, [torch.empty_like(o) for o in outs], groups=groups)
            run = lambda cfg: _launch_segments(scratch, a_t, b_t, seed, sample_offset, math, cfg)  # noqa: E731
        cfg = SEG_TUNER.pick(key + (math,), run)
    _launch_segments(table, a_t, b_t, seed, sample_offset, math, cfg)


def _launch_segments(
    table: SegmentTable, a: Tensor, b: Tensor, seed: int, sample_offset: int, math: int, cfg: LaunchConfig
) -> None:
    """One launch of the segment kernel over ``table``'s program map for ``cfg.block``."""
    pmap = table.program_map(cfg.block)
    programs, per, chunks = launch_grid(pmap.shape[0], table.num_samples, sample_offset, pmap.device)
    segments_kernel[(programs, chunks)](
        pmap,
        a,
        b,
        pmap.shape[0],
        table.num_samples,
        seed,
        sample_offset,
        per,
        OUT_DTYPE=_TL_DTYPES[table.out_dtype],
        ALIGN=table.align_kind,
        VEC=table.vec,
        ONE_ROW=table.num_samples == 1,
        BLOCK=cfg.block,
        MATH=math,
        num_warps=cfg.num_warps,
    )


def sample_into_segments_ref(
    thetas: Sequence[Tensor],
    vs: Sequence[Tensor],
    outs: Sequence[Tensor],
    *,
    a: float | Sequence[float] | Tensor = 1.0,
    b: float | Sequence[float] | Tensor = 0.0,
    groups: Sequence[int] | None = None,
    seed: int = 0,
    sample_offset: int = 0,
    element_offsets: Sequence[int] | None = None,
) -> None:
    """Reference for :func:`sample_into_segments`: a plain loop of the flat reference over the tensors.

    Args:
        thetas: T tensors, float32 contiguous; tensor ``k`` has ``n_k`` elements.
        vs: T tensors, float32 contiguous, ``n_k`` elements each.
        outs: T tensors, contiguous, one dtype, ``S * n_k`` elements each; written in place.
        a: per-group scale of ``v``, a float or (G,). Default 1.0.
        b: per-group additive precision, a float or (G,). Default 0.0.
        groups: group of each tensor. Default None: all 0.
        seed: 64-bit seed in [0, 2^64). Default 0.
        sample_offset: global index of the first sample. Default 0.
        element_offsets: global flat index of element 0 of each tensor. Default None: running sum.
    """
    num_samples, groups = _check_lists(thetas, vs, outs, groups)
    offsets = _default_offsets(thetas, element_offsets)
    a_t, b_t = _segment_params(a, b, outs[0].device)
    seed = _signed_seed(seed)
    for th, v, o, off, g in zip(thetas, vs, outs, offsets, groups, strict=True):
        n = th.numel()
        if n == 0:
            continue
        bounds = torch.tensor([0, n], dtype=torch.int64, device=o.device)
        sample_diag_gaussian_ref(
            th.reshape(-1),
            v.reshape(-1),
            a_t[g : g + 1],
            b_t[g : g + 1],
            bounds,
            seed,
            sample_offset,
            off,
            o.view(num_samples, n),
        )
