"""How the predictive evaluates the samples: vmap or a loop, how many samples and how many inputs at once.

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
   measure again. Every sample is used, so the trial costs nothing beyond the slower method's share.
3. When S is at most two chunks there is too little to compare on: *vmap*, unless a cached
   measurement chose the loop. Likewise under an initialised ``torch.distributed`` process group,
   where a timing could differ between ranks whose forwards communicate: *vmap* (or the loop of 1.).

``method="vmap"`` or ``"loop"`` overrides the rule (``"vmap"`` then raises rather than falls back).
The plan is cached per model, covered parameters, input shapes, train/eval modes and arguments, so
repeated calls skip the probe forward. The linearized predictive follows the same rule with
``torch.func.jvp`` in place of the forward.

**Chunks of samples and of inputs.** One probe forward at the MAP, under ``no_grad`` on the first few
inputs (all of them when the inputs cannot be split), measures the bytes every op returns (an upper
bound on the activations alive at once) and scales them to the whole batch. A *sample* of the chunk
costs its sample row (P elements) plus, for vmap, those activations (twice for a linearized jvp:
primal and tangent) and four times the output (float64 reductions), while the inputs count once per
chunk (vmap shares them between the samples); a loop holds one forward's activations at a time, and
its chunk is sized by the sample rows alone (also when the timing trial switches a plan to the loop).
Inputs are split along their first dimension into *input chunks* when one sample over the whole batch
would not fit in ``max_memory`` (so activations sized for the whole batch are never allocated, let
alone page-faulted, per sample); inputs can be split when every tensor argument has the same first
dimension. Then as many samples go into a chunk as keep its working set under ``max_memory`` and the
data one chunk streams through under :data:`CACHE_BYTES` (chunks that stay in cache run faster).
``chunk_size`` and ``input_chunk`` fix either by hand. Kept outputs (``keep_samples=True``) are not
counted. A loop without a probe (batch norm in training mode,
whose statistics a probe would update) keeps the inputs whole unless ``input_chunk`` is given.
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

from ..ops.sample import OUTPUT_DTYPES, int_or_none

if TYPE_CHECKING:
    from ..posterior import L2MPosterior

__all__ = [
    "PredictPlan",
    "plan_predict",
    "plan_key",
    "remember_plan",
    "sample_dtype",
    "as_args",
    "batch_size_of",
    "split_args",
    "DEFAULT_MAX_MEMORY",
    "CACHE_BYTES",
    "Task",
    "Method",
    "OutputFn",
]

DEFAULT_MAX_MEMORY = 256 << 20
"""Default memory budget of one chunk, in bytes (256 MiB)."""

CACHE_BYTES = 16 << 20
"""Soft cap on the data one chunk streams through when the number of samples per chunk is chosen for
you: a vmapped chunk's activations, or a looped chunk's sample rows."""

_PROBE_INPUTS = 8  # inputs the probe forward runs on when the batch can be split (scaled to the batch)

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
        flops_per_sample: flops of one forward over the whole batch (0 when not probed; for information).
        bytes_per_sample: estimated working set of one sample in a chunk (over one input chunk).
        input_chunk: inputs evaluated at once (the batch size when the inputs are not split).
        measured: whether the method was chosen by timing both.
        loop_chunk_size: samples per chunk should a loop evaluate them (sized by the sample rows alone);
            0 when not probed.
    """

    method: str
    chunk_size: int
    reason: str
    flops_per_sample: int
    bytes_per_sample: int
    input_chunk: int = 0
    measured: bool = False
    loop_chunk_size: int = 0


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


def batch_size_of(args: tuple[Any, ...]) -> int | None:
    """B when every tensor argument has at least one dimension and the same first one (splittable), else None."""
    sizes = {t.shape[0] for t in args if isinstance(t, Tensor) and t.dim() > 0}
    scalars = [t for t in args if isinstance(t, Tensor) and t.dim() == 0]
    if len(sizes) != 1 or scalars:
        return None
    return next(iter(sizes))


def split_args(args: tuple[Any, ...], start: int, stop: int) -> tuple[Any, ...]:
    """The arguments for inputs ``start .. stop - 1``: tensor arguments sliced along dim 0, others as they are."""
    return tuple(t[start:stop] if isinstance(t, Tensor) else t for t in args)


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


def remember_plan(model: nn.Module, key: tuple, plan: PredictPlan) -> None:
    """Caches a plan, keeping the newest :data:`_MAX_PLANS` per model (keys hold ``output_fn`` objects)."""
    plans = _PLANS.setdefault(model, {})
    plans.pop(key, None)
    plans[key] = plan
    while len(plans) > _MAX_PLANS:
        plans.pop(next(iter(plans)))


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


def _positive(value: object, what: str) -> int:
    found = int_or_none(value)
    if found is None or found < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return found


def plan_predict(
    posterior: L2MPosterior,
    model: nn.Module,
    inputs: Any,
    num_samples: int,
    *,
    method: Method = "auto",
    chunk_size: int | None = None,
    input_chunk: int | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
    output_fn: OutputFn | None = None,
    linearized: bool = False,
) -> PredictPlan:
    """Chooses vmap or loop, the samples per chunk and the inputs per chunk, as :func:`predict` would.

    Args:
        posterior, model, inputs, num_samples, method, chunk_size, input_chunk, max_memory, output_fn,
            linearized: as in :func:`l2m_fast.predictive.predict`.

    Returns:
        The plan (cached per model and arguments after the first probe).
    """
    if method not in ("auto", "vmap", "loop"):
        raise ValueError(f"method must be 'auto', 'vmap' or 'loop', got {method!r}")
    if chunk_size is not None:
        _positive(chunk_size, "chunk_size")
    if input_chunk is not None:
        _positive(input_chunk, "input_chunk")
    if isinstance(max_memory, bool) or not isinstance(max_memory, (int, float)) or not max_memory > 0:
        raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory!r}")
    s = max(num_samples, 1)
    params = posterior.parameters_of(model)
    args = as_args(inputs)
    batch = batch_size_of(args)
    row_bytes = posterior.num_params * sample_dtype(params).itemsize
    blocker = _vmap_blocker(model)
    whole = batch or 1
    fixed_inputs = min(input_chunk, whole) if input_chunk is not None and batch is not None else whole
    if blocker is not None and method != "vmap":
        # batch norm or dropout in training mode: a loop, and no probe forward, which would update the
        # statistics or draw masks once more than the samples do; one sample row per chunk entry, the
        # inputs whole unless the caller split them
        why = blocker if method == "auto" else "chosen by the caller"
        c = chunk_size or max(1, min(s, int(max_memory) // max(row_bytes, 1), CACHE_BYTES // max(row_bytes, 1)))
        return PredictPlan("loop", min(c, s), why, 0, row_bytes, fixed_inputs)
    if method != "auto" and chunk_size is not None and (input_chunk is not None or batch is None):
        return PredictPlan(method, min(chunk_size, s), "chosen by the caller", 0, 0, fixed_inputs)
    key = plan_key(params, model, args, num_samples, method, chunk_size, input_chunk, max_memory, output_fn, linearized)
    cached = _PLANS.get(model, {}).get(key)
    if cached is not None:
        return cached
    plan = _probe_plan(
        model, args, batch, s, row_bytes, method, chunk_size, input_chunk, max_memory, output_fn, linearized
    )
    remember_plan(model, key, plan)
    return plan


def _probe_plan(
    model: nn.Module,
    args: tuple[Any, ...],
    batch: int | None,
    s: int,
    row_bytes: int,
    method: str,
    chunk_size: int | None,
    input_chunk: int | None,
    max_memory: float,
    output_fn: OutputFn | None,
    linearized: bool,
) -> PredictPlan:
    """One forward at the MAP on a few inputs under a flop counter and an output-bytes counter."""
    from torch.utils.flop_counter import FlopCounterMode

    probe_n = batch if batch is None else min(batch, _PROBE_INPUTS)
    probe_args = args if batch is None else split_args(args, 0, probe_n)
    counter = _OutputBytes()
    flops = FlopCounterMode(display=False)
    with torch.no_grad(), flops, counter:
        out = model(*probe_args)
        if output_fn is not None:
            out = output_fn(out)
    scale = 1.0 if batch is None else batch / probe_n
    whole = batch or 1
    activations = counter.total * scale * (2 if linearized else 1)  # jvp: primal and tangent
    per_input = (activations + 4 * _nbytes(out) * scale) / whole  # per sample and input
    input_bytes = _nbytes(args) / whole  # per input, shared by the samples of a chunk
    nflops = int(flops.get_total_flops() * scale)
    chosen = method if method != "auto" else "vmap"
    reason = "chosen by the caller" if method != "auto" else "not measured yet: timed against a loop first"
    budget = float(max_memory)
    if input_chunk is not None or batch is None:
        inputs_at_once = min(input_chunk or whole, whole)
    elif row_bytes + (per_input + input_bytes) * whole <= budget:
        inputs_at_once = whole
    else:  # one sample over every input does not fit: split the inputs
        fit = (budget - row_bytes) // max(per_input + input_bytes, 1.0)
        inputs_at_once = int(max(1, min(whole, fit)))
    shared = input_bytes * inputs_at_once
    loop_chunk = int(max(1, min(s, (budget - shared) // max(row_bytes, 1), CACHE_BYTES // max(row_bytes, 1))))
    if chosen == "vmap":
        per_sample = row_bytes + per_input * inputs_at_once
        hot = activations / whole * inputs_at_once
        fits = int(max(1, min(s, (budget - shared) // max(per_sample, 1), CACHE_BYTES // max(hot, 1))))
    else:  # a loop holds one sample's activations at a time
        per_sample, fits = row_bytes, loop_chunk
    return PredictPlan(
        chosen, min(chunk_size or fits, s), reason, nflops, int(per_sample), inputs_at_once, loop_chunk_size=loop_chunk
    )
