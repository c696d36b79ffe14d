"""One launch for many separate tensors: the fused sampler over a pointer/segment table.

For live parameters of a large model (no flat copy), :func:`sample_into_segments` writes S samples
of every tensor ``k`` into its own output ``outs[k]`` (often the parameter itself, S = 1) in **one**
kernel launch, however many tensors there are. A small int64 table holds, per tensor, the data
pointers of ``theta_k``, ``v_k`` and ``out_k``, its global element offset and its group; the launch
runs over the concatenation of all tensors and each element finds its tensor by a binary search over
the cumulative starts. Samples follow the sampling contract (:mod:`l2m_fast.ops.reference`) exactly as the flat op does:
element ``e`` of tensor ``k`` has global index ``element_offsets[k] + e``.

Eager only: the table holds raw data pointers, which ``torch.compile`` cannot trace (the function
is excluded from compilation). Build the table once with :func:`segment_table` and pass it to
repeated calls to skip the host-side work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .reference import sample_diag_gaussian_ref
from .sample import OUTPUT_DTYPES, _signed_seed
from .triton_kernel import (
    HAS_TRITON,
    TRITON_IMPORT_ERROR,
    interpret_mode,
    math_constexpr,
    segment_steps,
)

__all__ = ["SegmentTable", "segment_table", "sample_into_segments", "sample_into_segments_ref"]

_INTERPRET_BLOCK = 128
_TABLE_COLUMNS = 5  # theta address, v address, out address, global element offset, group

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .triton_kernel import AUTOTUNE_CONFIGS, _find_segment, _write_samples

    @triton.jit(do_not_specialize=["seed", "sample_offset"])
    def _sample_into_segments_kernel(
        table_ptr,
        starts_ptr,
        a_ptr,
        b_ptr,
        n_total,
        num_tensors,
        num_samples,
        seed,
        sample_offset,
        OUT_DTYPE: tl.constexpr,
        BLOCK: tl.constexpr,
        TAB_STEPS: tl.constexpr,
        MATH: tl.constexpr,
    ):
        j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = j < tl.cast(n_total, tl.int64)
        t = _find_segment(starts_ptr, j, num_tensors, TAB_STEPS)
        row = table_ptr + t * 5
        theta_addr = tl.load(row)
        v_addr = tl.load(row + 1)
        out_addr = tl.load(row + 2)
        global_offset = tl.load(row + 3)
        group = tl.load(row + 4)
        start = tl.load(starts_ptr + t)
        n_k = tl.load(starts_ptr + t + 1) - start
        local = j - start
        theta = tl.load(theta_addr.to(tl.pointer_type(tl.float32)) + local, mask=mask, other=0.0)
        v = tl.load(v_addr.to(tl.pointer_type(tl.float32)) + local, mask=mask, other=0.0)
        a = tl.load(a_ptr + group)
        b = tl.load(b_ptr + group, mask=mask, other=1.0)
        sigma = tl.div_rn(1.0, tl.sqrt_rn(a * v + b))
        base = out_addr.to(tl.pointer_type(OUT_DTYPE)) + local
        _write_samples(base, n_k, mask, theta, sigma, global_offset + local, seed, sample_offset, num_samples, MATH)

    _sample_into_segments_kernel_tuned = triton.autotune(configs=AUTOTUNE_CONFIGS, key=["n_total", "num_samples"])(
        _sample_into_segments_kernel
    )
    _TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@dataclass(frozen=True)
class SegmentTable:
    """The device-side table of one set of tensors (see :func:`segment_table`).

    Attributes:
        table: (T, 5) int64: theta, v and out data pointers, global element offset, group.
        starts: (T + 1,) int64 cumulative element counts of the non-empty tensors.
        num_elements: total elements, ``starts[-1]``.
        num_samples: S, rows of every output.
        out_dtype: dtype shared by the outputs.
        keep_alive: the tensors the pointers refer to.
    """

    table: Tensor
    starts: Tensor
    num_elements: int
    num_samples: int
    out_dtype: torch.dtype
    keep_alive: tuple[Tensor, ...]


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
    rows, starts, keep = [], [0], []
    for th, v, o, off, g in zip(thetas, vs, outs, offsets, groups, strict=True):
        if th.numel() == 0:
            continue
        rows.append([th.data_ptr(), v.data_ptr(), o.data_ptr(), off, g])
        starts.append(starts[-1] + th.numel())
        keep += [th, v, o]
    device = outs[0].device
    table = torch.tensor(rows, dtype=torch.int64).reshape(-1, _TABLE_COLUMNS).to(device)
    return SegmentTable(
        table, torch.tensor(starts, dtype=torch.int64).to(device), starts[-1], num_samples, outs[0].dtype, tuple(keep)
    )


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
        math_mode: "precise", "fast" or "portable" (see :mod:`.triton_kernel`). Default None: "precise",
            or "portable" under the interpreter.
        block: elements per program, bypassing autotuning. Default None.
    """
    if not HAS_TRITON:
        raise RuntimeError(TRITON_IMPORT_ERROR)
    if table is None:
        table = segment_table(thetas, vs, outs, groups=groups, element_offsets=element_offsets)
    if table.num_elements == 0 or table.num_samples == 0:
        return
    a_t, b_t = _segment_params(a, b, table.table.device)
    interp = interpret_mode()
    if block is None and interp:
        block = _INTERPRET_BLOCK
    t = table.table.shape[0]
    args = (
        table.table,
        table.starts,
        a_t,
        b_t,
        table.num_elements,
        t,
        table.num_samples,
        _signed_seed(seed),
        sample_offset,
    )
    consts = {
        "OUT_DTYPE": _TL_DTYPES[table.out_dtype],
        "TAB_STEPS": segment_steps(t),
        "MATH": math_constexpr(math_mode),
    }
    n = table.num_elements
    if block is None:
        _sample_into_segments_kernel_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](*args, **consts)
    else:
        _sample_into_segments_kernel[(triton.cdiv(n, block),)](*args, BLOCK=block, **consts)


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
