"""The fused C++ CPU kernel of ``l2m_fast::sample_diag_gaussian_out``: loading and registration.

Importing this module only registers a CPU kernel on the op (cheap). The compiled code is loaded on
the first call (or on :func:`backend`), in this order:

1. ``compiled``: the extension ``l2m_fast._C`` built by ``setup.py`` at install time;
2. ``jit``: the sources in ``csrc/`` compiled with ninja by ``torch.utils.cpp_extension.load`` and
   cached (in ``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``);
3. ``reference``: the pure-PyTorch reference, with one warning saying why and how to fix it.

``L2M_FAST_FORCE_REFERENCE=1`` forces the reference (no warning).
"""

from __future__ import annotations

import importlib
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor

from .._build_config import CFLAGS, KERNEL_SOURCES
from .._env import env_flag
from .reference import sample_diag_gaussian_ref
from .sample import record_ran, sample_diag_gaussian_out

__all__ = ["CFLAGS", "backend", "backend_detail", "load_ops", "advise_huge_pages", "sample_checked"]

_ENV_FORCE_REFERENCE = "L2M_FAST_FORCE_REFERENCE"
_JIT_NAME = "l2m_fast_cpu_jit"

_lock = threading.Lock()
_state: SimpleNamespace | None = None  # kind: "compiled" | "jit" | "reference"; detail: why; ops; label
_ISA_NAMES = {0: "x86-64", 1: "avx2", 2: "avx512"}


def _source_dir() -> Path | None:
    """Where the C++ sources are: shipped in the package (``_csrc``) or the source tree (``csrc``)."""
    here = Path(__file__).resolve().parent
    for d in (here.parent / "_csrc", here.parents[1] / "csrc"):
        if all((d / f).is_file() for f in KERNEL_SOURCES):
            return d
    return None


def _try_compiled() -> str | None:
    """Imports ``l2m_fast._C``; returns None on success, else why it failed."""
    try:
        importlib.import_module("l2m_fast._C")
    except Exception as e:  # ImportError, or an undefined symbol from a torch of another version
        return f"l2m_fast._C not importable ({type(e).__name__}: {e})"
    if not hasattr(torch.ops.l2m_fast_cpu, "sample_diag_gaussian_out"):
        return "l2m_fast._C loaded but registered no l2m_fast_cpu operators"
    return None


def _try_jit() -> str | None:
    """Compiles ``csrc/`` with ninja (cached); returns None on success, else why it failed."""
    src = _source_dir()
    if src is None:
        return "the C++ sources (csrc/ or l2m_fast/_csrc/) were not found"
    try:
        from torch.utils.cpp_extension import load, verify_ninja_availability

        verify_ninja_availability()
        openmp = ["-fopenmp"] if torch._C.has_openmp else []
        load(
            name=_JIT_NAME,
            sources=[str(src / f) for f in KERNEL_SOURCES],
            extra_cflags=[*CFLAGS, *openmp],
            extra_ldflags=openmp,
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, a compile error
        return f"JIT compilation failed ({type(e).__name__}: {str(e).strip()[-500:]})"
    if not hasattr(torch.ops.l2m_fast_cpu, "sample_diag_gaussian_out"):
        return "JIT module loaded but registered no l2m_fast_cpu operators"
    return None


def _loaded(kind: str, detail: str) -> SimpleNamespace:
    _register_fakes()
    ops = torch.ops.l2m_fast_cpu
    how = "built at install" if kind == "compiled" else "JIT-compiled"
    label = f"C++ kernel ({how}, {_ISA_NAMES.get(int(ops.best_isa()), '?')})"
    return SimpleNamespace(kind=kind, detail=detail, ops=ops, label=label)


def _reference(detail: str) -> SimpleNamespace:
    return SimpleNamespace(kind="reference", detail=detail, ops=None, label=f"pure-PyTorch reference ({detail})")


def _load() -> SimpleNamespace:
    if env_flag(_ENV_FORCE_REFERENCE):
        return _reference(f"{_ENV_FORCE_REFERENCE} is set")
    why_compiled = _try_compiled()
    if why_compiled is None:
        return _loaded("compiled", "l2m_fast._C built at install")
    why_jit = _try_jit()
    if why_jit is None:
        return _loaded("jit", f"JIT-compiled from csrc/ with ninja because {why_compiled}")
    detail = f"{why_compiled}; {why_jit}"
    warnings.warn(
        f"l2m_fast: the fused CPU sampler is unavailable, using the slow PyTorch reference. Why: {detail}. "
        "Fix: reinstall with torch present at build time (pip install --no-build-isolation -e .), or install "
        "ninja and a C++17 compiler (g++) for the JIT build; set L2M_FAST_FORCE_REFERENCE=1 to silence this.",
        RuntimeWarning,
        stacklevel=3,
    )
    return _reference(detail)


def _get() -> SimpleNamespace:
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = _load()
    return _state


def backend() -> str:
    """Which CPU implementation runs: ``"compiled"``, ``"jit"`` or ``"reference"`` (loads it if needed)."""
    return _get().kind


def backend_detail() -> str:
    """Why :func:`backend` is what it is (the load errors when it is ``"reference"``)."""
    return _get().detail


def load_ops() -> object | None:
    """``torch.ops.l2m_fast_cpu`` once the compiled kernel is loaded; None when the reference runs."""
    return _get().ops


def advise_huge_pages(t: Tensor) -> None:
    """Asks Linux to back a large, not yet written CPU buffer with transparent huge pages.

    Its first-touch page faults then cost several times less (one per 2 MiB instead of per 4 KiB).
    Advice only: a no-op for small, non-contiguous or non-CPU tensors, other systems, and without the
    compiled kernel.

    Args:
        t: a freshly allocated tensor, any shape.
    """
    if t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
        return
    ops = _get().ops
    if ops is not None:
        ops.advise_huge_pages(t)


def sample_checked(
    theta: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    bounds: Tensor,
    seed: int,
    sample_offset: int,
    element_offset: int,
    out: Tensor,
) -> int | None:
    """The compiled CPU sampler with the value check fused into its pass over ``v`` (S > 0).

    Arguments as in ``sample_diag_gaussian_out`` (checked metadata, bounds valid). Returns the flags of
    what it found (1: a non-finite ``v``, 2: a negative ``v``, 4: ``a v + b`` not positive; 0: none), or
    None when the compiled kernel is unavailable (nothing was done). With nonzero flags ``out`` holds
    the samples of the offending values; :func:`~l2m_fast.ops.check_values` names the first of them.
    """
    state = _get()
    if state.ops is None:
        return None
    record_ran("cpu", state.label)
    return int(state.ops.sample_checked(theta, v, a, b, bounds, seed, sample_offset, element_offset, out))


@sample_diag_gaussian_out.register_kernel("cpu")
def _sample_diag_gaussian_out_cpu(
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
    """CPU kernel of the op: the fused C++ sampler (shapes as in ``sample_diag_gaussian_out``)."""
    state = _get()
    record_ran("cpu", state.label)
    ops = state.ops
    if ops is None:
        sample_diag_gaussian_ref(theta, v, a, b, bounds, seed, sample_offset, element_offset, out)
    else:
        ops.sample_diag_gaussian_out(theta, v, a, b, bounds, seed, sample_offset, element_offset, out)


def _fake_sample(theta: Tensor, v: Tensor, a: Tensor, b: Tensor, bounds: Tensor, *args: object) -> None:
    """Fake kernel of the C++ ops: no output, but mixed devices are an error as in the real kernel."""
    out = next(t for t in args if isinstance(t, Tensor))
    devices = {t.device for t in (theta, v, a, b, bounds, out)}
    if len(devices) > 1:
        raise RuntimeError(f"l2m_fast_cpu: all tensors must be on one device, got {sorted(map(str, devices))}")


def _register_fakes() -> None:
    """Fake implementations of the C++ ops, for opcheck and torch.compile; registered after loading."""
    for name in ("sample_diag_gaussian_out", "sample_variant"):
        torch.library.register_fake(f"l2m_fast_cpu::{name}")(_fake_sample)
