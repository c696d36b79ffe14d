"""Value checks of the sampler's inputs, and the validated copy that builds a posterior's flat tensors.

* :func:`check_values`: finite non-negative second moments ``v`` and a positive precision
  ``a_g v + b_g`` everywhere, raising a ValueError that names the first offending element.
* :func:`copy_checked_`: ``dst = float32(src)`` in one pass, optionally testing ``src`` as a second
  moment on the way, raising :class:`BadValueError` (a ValueError carrying ``index`` and ``value``).

On the CPU both run compiled one-pass loops (``torch.ops.l2m_fast_cpu.scan_values`` and
``copy_checked_``: parallel, no temporaries); elsewhere, or when only the pure-PyTorch reference is
available, they run :func:`first_bad_values_ref` and :func:`copy_checked_ref`, which are also the
tests' oracles.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "BadValueError",
    "check_segments",
    "check_values",
    "copy_checked_",
    "copy_checked_ref",
    "first_bad_values_ref",
    "COPY_SOURCE_DTYPES",
]

COPY_SOURCE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class BadValueError(ValueError):
    """A value that must not be in a second moment: non-finite or negative.

    Attributes:
        index: flat (row-major) index of the first such element in the source.
        value: that element as stored in float32.
        reason: ``"non-finite"`` or ``"negative"``.
    """

    def __init__(self, index: int, value: float, reason: str) -> None:
        self.index = index
        self.value = value
        self.reason = reason
        super().__init__(f"{reason} value {value} at element {index}")


def _compiled_ops() -> object | None:
    from . import cpu  # imported here: cpu imports the op module, which imports this one

    return cpu.load_ops()


def first_bad_values_ref(v: Tensor, a: Tensor | None = None, b: Tensor | None = None,
                         bounds: Tensor | None = None) -> tuple[int, int, int]:
    """Reference of the compiled scans: first non-finite, first negative, first non-positive precision.

    Args:
        v: (P,) float32 values (any device).
        a: (G,) float32 segment scales, or None to skip the precision test.
        b: (G,) float32 segment offsets.
        bounds: (G + 1,) int64 segment boundaries over the P elements.

    Returns:
        Three flat indices, -1 where no element qualifies. The precision is ``a_g * v + b_g`` in
        float32 (no fused multiply-add), as the sampler computes it.
    """
    def first(mask: Tensor) -> int:
        hit = mask.nonzero()
        return int(hit[0, 0]) if hit.numel() else -1

    v = v.reshape(-1)
    non_finite = first(~torch.isfinite(v))
    negative = first(v < 0)
    non_positive = -1
    if a is not None and b is not None and bounds is not None and v.numel():
        j = torch.arange(v.numel(), device=v.device)
        seg = torch.searchsorted(bounds[1:].contiguous(), j, right=True)
        non_positive = first(~(a[seg] * v + b[seg] > 0))
    return non_finite, negative, non_positive


def check_segments(v: Tensor, a: Tensor, b: Tensor, bounds: Tensor) -> None:
    """The per-segment part of :func:`check_values` (no pass over ``v``): bounds, finite ``a, b``, ``a >= 0``.

    Args:
        v: (P,) values (only its size is used).
        a: (G,) float32.
        b: (G,) float32.
        bounds: (G + 1,) int64.

    Raises:
        ValueError: naming what is wrong.
    """
    n = v.numel()
    bl = bounds.tolist()
    if len(bl) != a.numel() + 1 or bl[0] != 0 or bl[-1] != n or any(x > y for x, y in zip(bl, bl[1:])):
        raise ValueError(
            f"bounds must be non-decreasing, start at 0 and end at P={n} with one more entry than a "
            f"(G={a.numel()}); got {bl if len(bl) <= 8 else bl[:8] + ['...']}"
        )
    if not bool(torch.isfinite(a).all()) or not bool(torch.isfinite(b).all()):
        raise ValueError("a and b must be finite")
    if bool((a < 0).any()):
        raise ValueError(f"a must be non-negative, got {a.tolist()[:8]}")


def _segment_of(bounds: Tensor, j: int) -> int:
    return int(torch.searchsorted(bounds[1:].contiguous(), torch.tensor([j], device=bounds.device), right=True))


def check_values(v: Tensor, a: Tensor, b: Tensor, bounds: Tensor) -> None:
    """Checks the values the sampler trusts: finite non-negative ``v``, a positive precision everywhere.

    One pass over ``v``: on the CPU a compiled parallel scan without temporaries, elsewhere torch ops.

    Args:
        v: (P,) float32.
        a: (G,) float32.
        b: (G,) float32.
        bounds: (G + 1,) int64.

    Raises:
        ValueError: naming the first offending element (and its segment for a non-positive precision):
            a non-finite ``v`` anywhere is reported before a negative one, and both before the precision.
    """
    check_segments(v, a, b, bounds)
    ops = _compiled_ops() if v.device.type == "cpu" else None
    compiled = ops is not None and all(
        t.dtype == torch.float32 and t.dim() == 1 and t.is_contiguous() for t in (v, a, b)
    ) and bounds.dtype == torch.int64 and bounds.is_contiguous()
    if compiled:
        non_finite, negative, non_positive = ops.scan_values(v, a, b, bounds)
    else:
        check_prec = bool((b <= 0).any())  # a >= 0, v >= 0 and b > 0 make the precision positive
        non_finite, negative, non_positive = first_bad_values_ref(v, *((a, b, bounds) if check_prec else ()))
    if non_finite >= 0:
        raise ValueError(
            f"v has a non-finite value at element {non_finite} ({float(v[non_finite])}): second moments must be finite"
        )
    if negative >= 0:
        raise ValueError(
            f"v has a negative value at element {negative} ({float(v[negative])}): second moments must be >= 0"
        )
    if non_positive >= 0:
        raise ValueError(
            f"precision a*v + b is not positive at element {non_positive} (segment "
            f"{_segment_of(bounds, non_positive)}): give a positive prior precision b"
        )


def _check_copy_args(dst: Tensor, src: Tensor) -> None:
    if not isinstance(dst, Tensor) or not isinstance(src, Tensor):
        raise TypeError(f"dst and src must be tensors, got {type(dst).__name__} and {type(src).__name__}")
    if dst.dtype != torch.float32 or dst.dim() != 1 or not dst.is_contiguous():
        raise ValueError(
            f"dst must be a contiguous 1-D float32 tensor (or a slice of one), got {tuple(dst.shape)} {dst.dtype}"
            f"{'' if dst.is_contiguous() else ' (non-contiguous)'}"
        )
    if src.dtype not in COPY_SOURCE_DTYPES:
        raise TypeError(f"src must be one of {COPY_SOURCE_DTYPES}, got {src.dtype}: convert it with .float()")
    if src.numel() != dst.numel():
        raise ValueError(f"src has {src.numel()} elements but dst {dst.numel()}: give dst src.numel() elements")
    if src.device != dst.device:
        raise ValueError(f"src is on {src.device} but dst on {dst.device}: copy within one device")


def copy_checked_ref(dst: Tensor, src: Tensor, *, check_moment: bool) -> tuple[int, int]:
    """Reference of :func:`copy_checked_` (torch ops, any device): copies, then scans ``dst``.

    Args:
        dst: (P,) float32, contiguous.
        src: any shape with P elements, floating dtype.
        check_moment: scan the copied values.

    Returns:
        (first non-finite, first negative) flat indices of ``dst``, -1 where none (both -1 without the scan).
    """
    dst.view(src.shape).copy_(src)
    if not check_moment:
        return -1, -1
    non_finite, negative, _ = first_bad_values_ref(dst)
    return non_finite, negative


def copy_checked_(dst: Tensor, src: Tensor, *, check_moment: bool) -> None:
    """Copies ``src`` into ``dst`` as float32 in one pass; with ``check_moment``, tests it as a second moment.

    On the CPU one parallel compiled pass reads ``src`` (any floating dtype, shape and strides) once,
    writes ``dst`` once and tests the values on the way, without temporaries; a large destination is
    first advised to use transparent huge pages (Linux), which makes the page faults of a freshly
    allocated ``dst`` several times cheaper. Elsewhere ``dst.copy_(src)`` then a reduction. Conversion
    rounds to nearest as ``Tensor.copy_`` does; the test is on the float32 values written (a float64
    beyond float32's range becomes inf and is reported).

    Args:
        dst: (P,) float32, contiguous (a slice of a larger flat tensor is fine); written in place.
        src: P elements of float32, float64, bfloat16 or float16, any shape and strides, on dst's device.
        check_moment: raise on a non-finite or negative value (``dst`` is fully written either way).

    Raises:
        BadValueError: the first non-finite element if any, else the first negative one (flat row-major
            index into ``src``); the caller adds which tensor it was.
        ValueError, TypeError: unusable arguments.
    """
    _check_copy_args(dst, src)
    if dst.numel() == 0:
        return
    with torch.no_grad():
        ops = _compiled_ops() if dst.device.type == "cpu" else None
        if ops is not None:
            non_finite, negative = ops.copy_checked_(dst.detach(), src.detach(), bool(check_moment))
        else:
            non_finite, negative = copy_checked_ref(dst.detach(), src.detach(), check_moment=check_moment)
    if non_finite >= 0:
        raise BadValueError(non_finite, float(dst[non_finite]), "non-finite")
    if negative >= 0:
        raise BadValueError(negative, float(dst[negative]), "negative")
