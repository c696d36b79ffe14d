"""How the predictive evaluates the samples: vmap or a loop, and how many samples per chunk.

**The loop-vs-vmap rule** (``method="auto"``, the default):

1. *loop* when vmap cannot be right or cannot run: a module in training mode that mutates state or
   draws random numbers (batch norm updating running statistics, dropout); and, as a safety net, when
   the first vmapped chunk raises (an op vmap cannot batch): a ``RuntimeWarning`` says so and the loop
   takes over (remembered for that model and input shapes). A result is never silently wrong.
2. Otherwise *measured*: which is faster depends on the model, the batch and the machine (the
   project's benchmarks record cases of each). So the first chunk is vmapped (a warm-up: its
   first-touch allocations would bias the timing), the second vmapped and timed, and the next few
   samples (a quarter of a chunk, at least 2) looped and timed; the faster per sample evaluates the
   rest, and the choice is cached for the model, input shapes and arguments, so later calls do not
   measure again. Every sample is used, so the trial
   costs nothing beyond the slower method's share of it.
3. When S is at most two chunks there is too little to compare on: *vmap*, unless a cached
   measurement chose the loop. Likewise under an initialised ``torch.distributed`` process group,
   where a timing could differ between ranks whose forwards communicate: *vmap* (or the loop of 1.).

``method="vmap"`` or ``"loop"`` overrides the rule (``"vmap"`` then raises rather than falls back).
The plan (method, chunk size) is cached per model, input shapes, train/eval modes and arguments, so
repeated calls skip the probe forward.

**Chunk size**: ``chunk_size`` when given, else the largest that keeps the chunk's working set under
``max_memory`` bytes and the data it streams through under :data:`CACHE_BYTES` (smaller chunks stay
in cache). The working set per sample is estimated from one probe forward at the MAP: the sample row
(P elements), plus, for vmap, the bytes of every op output of one forward (an upper bound
on what is alive at once), the inputs (a batched matmul may materialise them per sample) and four
times the output (float64 reductions). Kept samples (``keep_samples=True``) are not counted.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..ops.sample import OUTPUT_DTYPES

if TYPE_CHECKING:
    from ..posterior import L2MPosterior

__all__ = [
    "PredictPlan",
    "plan_predict",
    "plan_key",
    "remember_plan",
    "sample_dtype",
    "as_args",
    "DEFAULT_MAX_MEMORY",
    "CACHE_BYTES",
    "Task",
    "Method",
    "OutputFn",
]

DEFAULT_MAX_MEMORY = 256 << 20
"""Default memory budget of one chunk, in bytes (256 MiB)."""

CACHE_BYTES = 16 << 20
"""Soft cap on the data one chunk streams through when the chunk size is chosen for you: a vmapped
chunk's activations, or a looped chunk's sample rows (chunks that stay in cache ran faster on the
benchmark models, see benchmarks/RESULTS.md)."""

Task = Literal["regression", "classification"]
Method = Literal["auto", "vmap", "loop"]
OutputFn = Callable[[Any], "Tensor | tuple[Tensor, Tensor]"]


@dataclass(frozen=True)
class PredictPlan:
    """How :func:`predict` evaluates the samples (see the module docstring for the rule).

    Attributes:
        method: ``"vmap"`` or ``"loop"``.
        chunk_size: samples per chunk.
        reason: why this method.
        flops_per_sample: flops of one forward (0 when not probed; for information).
        bytes_per_sample: estimated working set of one sample in a chunk.
    """

    method: str
    chunk_size: int
    reason: str
    flops_per_sample: int
    bytes_per_sample: int
    measured: bool = False


# ---------------------------------------------------------------------------------------------- probing


class _OutputBytes(TorchDispatchMode):
    """Sums the bytes of every new tensor each op returns (views of its inputs are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        seen = {_storage_ptr(t) for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and _storage_ptr(t) not in seen:
                self.total += t.numel() * t.element_size()
        return out


def _storage_ptr(t: Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage
        return -1


def as_args(inputs: Any) -> tuple[Any, ...]:
    """The forward's positional arguments: a tuple or list as given, anything else as one argument."""
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _nbytes(tree: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(tree) if isinstance(t, Tensor))


_STATEFUL_IN_TRAINING = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
_RANDOM_IN_TRAINING = (nn.modules.dropout._DropoutNd, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _vmap_blocker(model: nn.Module) -> str | None:
    for name, m in model.named_modules():
        if not m.training:
            continue
        if isinstance(m, _STATEFUL_IN_TRAINING) and getattr(m, "track_running_stats", False):
            return f"{name or 'model'} ({type(m).__name__}) updates running statistics in training mode"
        if isinstance(m, _RANDOM_IN_TRAINING) and getattr(m, "p", 0) > 0:
            return f"{name or 'model'} ({type(m).__name__}) is random in training mode"
    return None


_PLANS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, PredictPlan]] = weakref.WeakKeyDictionary()
_MAX_PLANS = 16


def plan_key(params: Mapping[str, nn.Parameter], model: nn.Module, args: tuple[Any, ...], *rest: Any) -> tuple:
    """What a cached plan depends on: the covered parameters (names, shapes, dtypes), the inputs' shapes, the
    modules' train/eval modes and the caller's arguments."""
    leaves = tuple((tuple(t.shape), t.dtype, t.device) if isinstance(t, Tensor) else repr(t) for t in tree_leaves(args))
    modes = tuple(m.training for m in model.modules())
    covered = tuple((n, tuple(p.shape), p.dtype) for n, p in params.items())
    return (covered, leaves, modes, *rest)


def plan_predict(
    posterior: L2MPosterior,
    model: nn.Module,
    inputs: Any,
    num_samples: int,
    *,
    method: Method = "auto",
    chunk_size: int | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
    output_fn: OutputFn | None = None,
) -> PredictPlan:
    """Chooses vmap or loop and the chunk size, as :func:`predict` would (arguments as there)."""
    if method not in ("auto", "vmap", "loop"):
        raise ValueError(f"method must be 'auto', 'vmap' or 'loop', got {method!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if max_memory <= 0:
        raise ValueError(f"max_memory must be positive, got {max_memory}")
    s = max(num_samples, 1)
    params = posterior.parameters_of(model)
    row_bytes = posterior.num_params * sample_dtype(params).itemsize
    if method != "auto" and chunk_size is not None:
        return PredictPlan(method, min(chunk_size, s), "chosen by the caller", 0, 0)
    if method == "auto":
        blocker = _vmap_blocker(model)
        if blocker is not None and chunk_size is not None:
            return PredictPlan("loop", min(chunk_size, s), blocker, 0, 0)
    else:
        blocker = None
    if blocker is not None or method == "loop":
        # a loop holds one sample row per chunk entry: no probe forward, which would also update batch
        # norm statistics or draw dropout masks once more than the samples do
        if chunk_size is None:
            chunk_size = max(1, min(s, max_memory // max(row_bytes, 1), CACHE_BYTES // max(row_bytes, 1)))
        return PredictPlan("loop", min(chunk_size, s), blocker or "chosen by the caller", 0, row_bytes)
    args = as_args(inputs)
    key = plan_key(params, model, args, num_samples, method, chunk_size, max_memory, output_fn)
    cached = _PLANS.get(model, {}).get(key)
    if cached is not None:
        return cached
    plan = _probe_plan(model, args, s, row_bytes, method, chunk_size, max_memory, output_fn, blocker)
    remember_plan(model, key, plan)
    return plan


def remember_plan(model: nn.Module, key: tuple, plan: PredictPlan) -> None:
    """Caches a plan, keeping the newest :data:`_MAX_PLANS` per model (keys hold ``output_fn`` objects)."""
    plans = _PLANS.setdefault(model, {})
    plans.pop(key, None)
    plans[key] = plan
    while len(plans) > _MAX_PLANS:
        plans.pop(next(iter(plans)))


def _probe_plan(
    model: nn.Module,
    args: tuple[Any, ...],
    s: int,
    row_bytes: int,
    method: str,
    chunk_size: int | None,
    max_memory: int,
    output_fn: OutputFn | None,
    blocker: str | None,
) -> PredictPlan:
    """One forward at the MAP under a flop counter and an output-bytes counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = _OutputBytes()
    flops = FlopCounterMode(display=False)
    with torch.no_grad(), flops, counter:
        out = model(*args)
        if output_fn is not None:
            out = output_fn(out)
    nflops = int(flops.get_total_flops())
    if blocker is not None:
        chosen, reason = "loop", blocker
    elif method != "auto":
        chosen, reason = method, "chosen by the caller"
    else:
        chosen, reason = "vmap", "not measured yet: predict times vmap against a loop on its first chunks"
    per_sample = row_bytes
    hot = row_bytes  # what one sample adds to the data a chunk streams through
    if chosen == "vmap":
        per_sample += counter.total + _nbytes(args) + 4 * _nbytes(out)
        hot = counter.total
    if chunk_size is None:
        chunk_size = max(1, min(s, max_memory // max(per_sample, 1), CACHE_BYTES // max(hot, 1)))
    return PredictPlan(chosen, min(chunk_size, s), reason, nflops, per_sample)


def sample_dtype(params: Mapping[str, nn.Parameter]) -> torch.dtype:
    """The dtype samples are drawn in: the parameters' own when they share one the sampler writes, else float32.

    Read off the live parameters (a model cast after the posterior was built is sampled in its new dtype),
    as the in-place writers do, so that every predictive sees the same values.
    """
    dtypes = {p.dtype for p in params.values()}
    if len(dtypes) == 1:
        (dt,) = dtypes
        if dt in OUTPUT_DTYPES:
            return dt
    return torch.float32
