"""The sampler as a registered operator, ``torch.ops.l2m_fast.sample_diag_gaussian_out``.

One operator, dispatched by device through the PyTorch dispatcher. It is a
:func:`torch.library.triton_op`: its implementation launches the fused Triton kernel
(:mod:`l2m_fast.ops.triton_kernel`, through :func:`torch.library.wrap_triton`) on CUDA tensors and
runs the pure-PyTorch reference on every other device. Faster kernels for other devices register
themselves with ``sample_diag_gaussian_out.register_kernel(device)`` (:mod:`l2m_fast.ops.cpu` for
CPU) and take precedence in eager mode.

Under ``torch.compile`` (AOTAutograd's ``FunctionalTensorMode``) a ``triton_op`` is normally
decomposed into its implementation so that Inductor sees the Triton kernel. We keep that for CUDA
only: for any other device the op stays opaque (functionalized like any mutable custom op), so that
at run time the dispatcher picks the registered device kernel (e.g. the C++ CPU kernel) instead of
tracing the reference, and no Triton launch is ever attempted on a CPU tensor.

The public entry point :func:`sample_diag_gaussian` checks its arguments, allocates the output when
none is given and calls the operator.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import Tensor
from torch._subclasses.functional_tensor import FunctionalTensorMode

from .checks import check_segments, check_values
from .reference import sample_diag_gaussian_ref
from .triton_kernel import HAS_TRITON, sample_diag_gaussian_triton

__all__ = [
    "sample_diag_gaussian",
    "sample_diag_gaussian_out",
    "check_values",
    "OUTPUT_DTYPES",
    "MAX_SAMPLES",
    "kernel_ran",
]

OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_SAMPLES = 1 << 32  # sample indices are 32-bit (counter word 2 holds s >> 2)
_MAX_INDEX = (1 << 63) - 1
_U64 = 1 << 64


_RAN: dict[str, str] = {}  # device type -> label of the implementation that served the op's last call there


def record_ran(device_type: str, label: str) -> None:
    """Called by each implementation of the op as it runs (see :func:`kernel_ran`)."""
    _RAN[device_type] = label


def kernel_ran(device_type: str) -> str | None:
    """Which implementation served the op's last eager call on ``device_type`` (``"cpu"``, ``"cuda"``).

    Labels such as ``"C++ kernel (built at install, avx512)"``, ``"Triton"`` or ``"pure-PyTorch
    reference"``; None before the first call. Benchmarks read it so that a table names what ran.
    """
    return _RAN.get(device_type)


def _check_metadata(
    theta: Tensor, v: Tensor, a: Tensor, b: Tensor, bounds: Tensor, sample_offset: int, element_offset: int, out: Tensor
) -> None:
    """What the kernels rely on to stay in bounds, from metadata alone (so it also runs on fake tensors)."""
    if out.dim() != 2 or not out.is_contiguous() or out.dtype not in OUTPUT_DTYPES:
        got = f"{tuple(out.shape)} {out.dtype}"
        raise ValueError(f"out must be a contiguous (S, P) tensor of {OUTPUT_DTYPES}, got {got}")
    s, n = out.shape
    for name, t, dtype, numel in (
        ("theta", theta, torch.float32, n),
        ("v", v, torch.float32, n),
        ("a", a, torch.float32, a.numel()),
        ("b", b, torch.float32, a.numel()),
        ("bounds", bounds, torch.int64, a.numel() + 1),
    ):
        if t.dim() != 1 or t.dtype != dtype or t.numel() != numel or not t.is_contiguous():
            raise ValueError(
                f"{name} must be a contiguous 1-D {dtype} tensor of {numel} elements, "
                f"got {tuple(t.shape)} {t.dtype}{'' if t.is_contiguous() else ' (non-contiguous)'}"
            )
        if t.device != out.device:
            raise ValueError(f"{name} is on {t.device} but out on {out.device}: put every tensor on one device")
    if a.numel() < 1:
        raise ValueError("a, b need at least one segment")
    if sample_offset < 0 or sample_offset + s > MAX_SAMPLES:
        raise ValueError(f"samples {sample_offset}..{sample_offset + s - 1} leave the 2^32 sample indices")
    if element_offset < 0 or element_offset + n > _MAX_INDEX:
        raise ValueError(f"elements {element_offset}..{element_offset + n - 1} leave the 63-bit element index")


def _impl(
    theta: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    bounds: Tensor,
    seed: int,
    sample_offset: int,
    element_offset: int,
    out: Tensor,
) -> None:
    _check_metadata(theta, v, a, b, bounds, sample_offset, element_offset, out)
    if out.device.type == "cuda" and HAS_TRITON:
        record_ran("cuda", "Triton")
        sample_diag_gaussian_triton(theta, v, a, b, bounds, seed, sample_offset, element_offset, out)
    else:
        record_ran(out.device.type, "pure-PyTorch reference")
        sample_diag_gaussian_ref(theta, v, a, b, bounds, seed, sample_offset, element_offset, out)


@torch.library.triton_op("l2m_fast::sample_diag_gaussian_out", mutates_args=("out",))
def sample_diag_gaussian_out(
    theta: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    bounds: Tensor,
    seed: int,
    sample_offset: int,
    element_offset: int,
    out: Tensor,
) -> None:
    """Writes S samples of a diagonal Gaussian with precision ``a_g * v + b_g`` into ``out``.

    The raw operator: arguments are trusted to be checked (see :func:`sample_diag_gaussian`).

    Args:
        theta: (P,) float32, contiguous.
        v: (P,) float32, contiguous.
        a: (G,) float32.
        b: (G,) float32.
        bounds: (G + 1,) int64, segment boundaries over the P local elements.
        seed: the 64-bit seed as a signed int64 (bit pattern).
        sample_offset: global index of the first sample.
        element_offset: global flat index of ``theta[0]``.
        out: (S, P) float32, bfloat16 or float16, contiguous; written in place.
    """
    _impl(theta, v, a, b, bounds, seed, sample_offset, element_offset, out)


# triton_op registers the implementation itself as the fake kernel; the op returns nothing, so the
# fake kernel only checks the metadata (it must not trace the reference on fake CPU tensors).
@sample_diag_gaussian_out.register_fake
def _(theta, v, a, b, bounds, seed, sample_offset, element_offset, out) -> None:  # noqa: ANN001
    _check_metadata(theta, v, a, b, bounds, sample_offset, element_offset, out)


def _plain_decomposition(mode, op, types, args, kwargs):  # noqa: ANN001, ANN202
    with mode:
        return _impl(*args, **kwargs)


# triton_op's own rule (it also honours torch.export's switch that keeps the op whole); a private
# attribute, hence the fallback to the plain decomposition it performs.
_triton_decomposition = getattr(sample_diag_gaussian_out, "_torch_dispatch_fns", {}).get(
    FunctionalTensorMode, _plain_decomposition
)


def _out_arg(args: tuple, kwargs: dict) -> Tensor:
    return args[8] if len(args) > 8 else kwargs["out"]


@sample_diag_gaussian_out.register_torch_dispatch(FunctionalTensorMode)
def _(mode, op, types, args, kwargs):  # noqa: ANN001, ANN202
    """Decompose into the Triton launch on CUDA only; elsewhere keep the op opaque (see module doc)."""
    if _out_arg(args, kwargs).device.type == "cuda" and HAS_TRITON:
        return _triton_decomposition(mode, op, types, args, kwargs)
    return mode.__torch_dispatch__(op, types, args, kwargs)


def _as_segment_tensor(x: float | Sequence[float] | Tensor, name: str, device: torch.device) -> Tensor:
    t = torch.as_tensor(x, dtype=torch.float32, device=device).reshape(-1)
    if t.numel() == 0:
        raise ValueError(f"{name} is empty: give one value per segment (or a single float)")
    return t.contiguous()


def _check_float32_vector(t: Tensor, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {t.dtype}: pass {name}.float()")
    return t.reshape(-1).contiguous()


def int_or_none(value: object) -> int | None:
    """``value`` as a Python int if it is an integer scalar (an int, a NumPy integer, a 0-d integer tensor),
    else None; a bool (Python, NumPy or tensor) is not an integer here."""
    if isinstance(value, Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            return None
        return int(value.item())
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # Python's and NumPy's bools
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def as_int(value: object, name: str) -> int:
    """``value`` as a Python int (see :func:`int_or_none`).

    Raises:
        TypeError: ``value`` is not an integer scalar (naming ``name``).
    """
    found = int_or_none(value)
    if found is None:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return found


def _signed_seed(seed: int) -> int:
    seed = as_int(seed, "seed")
    if not 0 <= seed < _U64:
        raise ValueError(f"seed must lie in [0, 2^64), got {seed}")
    return seed - _U64 if seed >= 1 << 63 else seed


def sample_diag_gaussian(
    theta: Tensor,
    v: Tensor,
    num_samples: int | None = None,
    *,
    a: float | Sequence[float] | Tensor = 1.0,
    b: float | Sequence[float] | Tensor = 0.0,
    bounds: Sequence[int] | Tensor | None = None,
    seed: int = 0,
    sample_offset: int = 0,
    element_offset: int = 0,
    dtype: torch.dtype = torch.float32,
    out: Tensor | None = None,
    validate: bool = True,
) -> Tensor:
    """Draws ``out[s, j] = theta_j + z(seed, element_offset + j, sample_offset + s) / sqrt(a_g v_j + b_g)``.

    The generic fused sampler of the sampling contract (:mod:`l2m_fast.ops.reference`): any diagonal
    Gaussian whose precision is ``a * v + b`` per segment of elements. Samples depend only on
    ``(seed, global index, sample index)``, so chunks of samples or of elements drawn separately agree
    with one draw of the whole.

    Args:
        theta: (P,) float32 mean; other shapes are flattened, non-contiguous input is copied.
        v: (P,) float32 second moment, same number of elements as ``theta``.
        num_samples: S. May be omitted when ``out`` is given.
        a: per-segment scale of ``v`` in the precision: a float or (G,) values. Default 1.0.
        b: per-segment additive precision: a float or (G,) values. Default 0.0.
        bounds: (G + 1,) segment boundaries over the local elements, ``bounds[0] == 0`` and
            ``bounds[G] == P``. Default ``[0, P]`` (one segment).
        seed: 64-bit seed in [0, 2^64). Default 0.
        sample_offset: global index of the first sample drawn. Default 0.
        element_offset: global flat index of ``theta[0]`` (for shards and subsets). Default 0.
        dtype: output dtype, float32, bfloat16 or float16, when ``out`` is None. Default float32.
        out: optional (S, P) contiguous buffer to write into (its dtype is used).
        validate: check the values of ``v``, ``a``, ``b`` and ``bounds`` (:func:`check_values`). With
            the compiled CPU kernel the test of ``v`` rides on the sampling pass (no extra read), so on
            a ValueError ``out`` has been written; elsewhere it is one extra read of ``v`` before
            sampling. Callers that checked the values once, like :class:`~l2m_fast.L2MPosterior`, pass
            False.

    Returns:
        out: (S, P) samples.

    Raises:
        ValueError: with ``validate``, for a non-finite or negative ``v``, a precision ``a v + b`` that
            is not positive, or bad segments, naming the first offending element or segment.
    """
    theta = _check_float32_vector(theta, "theta")
    v = _check_float32_vector(v, "v")
    n = theta.numel()
    if v.numel() != n:
        raise ValueError(f"theta and v must have the same number of elements, got {n} and {v.numel()}")
    if v.device != theta.device:
        raise ValueError(f"theta is on {theta.device} but v on {v.device}: put them on one device")
    device = theta.device
    a_t = _as_segment_tensor(a, "a", device)
    b_t = _as_segment_tensor(b, "b", device)
    if bounds is None:
        if a_t.numel() != 1 or b_t.numel() != 1:
            raise ValueError("several segments in a or b need bounds: pass bounds=[0, ..., P]")
        bounds_t = torch.tensor([0, n], dtype=torch.int64, device=device)
    else:
        bounds_t = torch.as_tensor(bounds, dtype=torch.int64, device=device).reshape(-1).contiguous()
    g = max(a_t.numel(), b_t.numel())
    if a_t.numel() == 1 and g > 1:
        a_t = a_t.expand(g).contiguous()
    if b_t.numel() == 1 and g > 1:
        b_t = b_t.expand(g).contiguous()
    if a_t.numel() != b_t.numel():
        raise ValueError(f"a and b must give one value per segment, got {a_t.numel()} and {b_t.numel()}")
    if bounds_t.numel() != g + 1:
        raise ValueError(f"bounds must have G + 1 = {g + 1} entries for G={g} segments, got {bounds_t.numel()}")
    signed_seed = _signed_seed(seed)
    sample_offset, element_offset = as_int(sample_offset, "sample_offset"), as_int(element_offset, "element_offset")
    if sample_offset < 0:
        raise ValueError(f"sample_offset must be a non-negative int, got {sample_offset!r}")
    if element_offset < 0:
        raise ValueError(f"element_offset must be a non-negative int, got {element_offset!r}")
    if element_offset + n > _MAX_INDEX:
        raise ValueError(f"element_offset + P = {element_offset + n} overflows the 63-bit element index")
    if out is None:
        if num_samples is None:
            raise ValueError("give num_samples or an out buffer")
        if dtype not in OUTPUT_DTYPES:
            raise TypeError(f"dtype must be one of {OUTPUT_DTYPES}, got {dtype}")
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        out = torch.empty(num_samples, n, dtype=dtype, device=device)
        if device.type == "cpu" and not torch.compiler.is_compiling():
            from .cpu import advise_huge_pages  # imported here: cpu imports this module

            advise_huge_pages(out)
    else:
        if not isinstance(out, Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if out.dim() != 2 or out.shape[1] != n or (num_samples is not None and out.shape[0] != num_samples):
            want = f"({num_samples if num_samples is not None else 'S'}, {n})"
            raise ValueError(f"out must have shape {want}, got {tuple(out.shape)}")
        if out.dtype not in OUTPUT_DTYPES:
            raise TypeError(f"out must be one of {OUTPUT_DTYPES}, got {out.dtype}")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous: pass a fresh buffer or write into a contiguous one and copy")
        if out.device != device:
            raise ValueError(f"out is on {out.device} but theta on {device}")
    s = out.shape[0]
    if sample_offset + s > MAX_SAMPLES:
        raise ValueError(f"sample_offset + S = {sample_offset + s} exceeds the 2^32 sample indices of the contract")
    if validate and device.type == "cpu" and s > 0 and n > 0 and not torch.compiler.is_compiling():
        from .cpu import sample_checked  # imported here: cpu imports this module

        check_segments(v, a_t, b_t, bounds_t)
        found = sample_checked(theta, v, a_t, b_t, bounds_t, signed_seed, sample_offset, element_offset, out)
        if found is not None:  # the compiled kernel sampled and tested v in the same pass
            if found:
                check_values(v, a_t, b_t, bounds_t)  # names the first offending element
            return out
    if validate:
        check_values(v, a_t, b_t, bounds_t)
    sample_diag_gaussian_out(theta, v, a_t, b_t, bounds_t, signed_seed, sample_offset, element_offset, out)
    return out
