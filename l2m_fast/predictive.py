"""Batched Monte-Carlo posterior predictive: every sample of the posterior through the model, streamed.

Samples are drawn in chunks into one reused ``(chunk, P)`` buffer by the fused sampler; each chunk is
evaluated either

* **vmap**: one batched forward, ``torch.func.vmap`` over ``torch.func.functional_call`` with the
  parameters given as zero-copy ``(chunk, *shape)`` views of the buffer; or
* **loop**: one ordinary forward per sample, the live parameters bound (not copied) to the row's
  views (:class:`l2m_fast.inplace.ParamBinding`) and restored exactly afterwards.

Outputs are reduced as they come (Chan's parallel mean/variance in float64, running sums of softmax
probabilities and entropies), so memory does not grow with S unless ``keep_samples=True``.

**The loop-vs-vmap rule** (``method="auto"``, the default):

1. *loop* when vmap cannot be right or cannot run: a module in training mode that mutates state or
   draws random numbers (batch norm updating running statistics, dropout); and, as a safety net, when
   the first vmapped chunk raises (an op vmap cannot batch): a ``RuntimeWarning`` says so and the loop
   takes over (remembered for that model and input shapes). A result is never silently wrong.
2. Otherwise *measured*: which is faster depends on the model, the batch and the machine, and we
   measured both ways (on our 2-core CPU the paper's toy MLP runs faster vmapped; the 784-512-512-10
   MLP at batch 256 ran faster vmapped in chunks of 32 in one run and faster looped in another). So
   the first chunk is vmapped (a warm-up: its first-touch allocations would bias the timing), the
   second vmapped and timed, and the next few samples (a quarter of a chunk, at least 2) looped and
   timed; the faster per sample evaluates the rest, and the choice is cached for the model, input
   shapes and arguments, so later calls do not measure again. Every sample is used, so the trial
   costs nothing beyond the slower method's share of it.
3. When S is at most two chunks there is too little to compare on: *vmap*, unless a cached
   measurement chose the loop. Likewise under an initialised ``torch.distributed`` process group,
   where a timing could differ between ranks whose forwards communicate: *vmap* (or the loop of 1.).

``method="vmap"`` or ``"loop"`` overrides the rule (``"vmap"`` then raises rather than falls back).
The plan (method, chunk size) is cached per model, input shapes, train/eval modes and arguments, so
repeated calls skip the probe forward.

**Chunk size**: ``chunk_size`` when given, else the largest that keeps the chunk's working set under
``max_memory`` bytes and the data it streams through under :data:`CACHE_BYTES` (smaller chunks stay
in cache: on our CPU they ran faster). The working set per sample is estimated from one probe forward at the MAP: the
sample row (P elements), plus, for vmap, the bytes of every op output of one forward (an upper bound
on what is alive at once), the inputs (a batched matmul may materialise them per sample) and four
times the output (float64 reductions). Kept samples (``keep_samples=True``) are not counted.
"""

from __future__ import annotations

import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ._reducers import ClassificationPrediction, RegressionPrediction, _ClassificationReducer, _RegressionReducer
from .inplace import ParamBinding
from .ops.sample import OUTPUT_DTYPES

if TYPE_CHECKING:
    from .posterior import L2MPosterior

__all__ = [
    "RegressionPrediction",
    "ClassificationPrediction",
    "PredictPlan",
    "plan_predict",
    "predict",
    "DEFAULT_MAX_MEMORY",
    "CACHE_BYTES",
]

DEFAULT_MAX_MEMORY = 256 << 20
"""Default memory budget of one chunk, in bytes (256 MiB)."""

CACHE_BYTES = 16 << 20
"""Soft cap on the data one chunk streams through when the chunk size is chosen for you: a vmapped
chunk's activations, or a looped chunk's sample rows (measured on a 2-core CPU: the toy MLP ran 2.6x
faster in chunks of 128 than of 500, the 784-512-512-10 MLP 1.1x faster in chunks of 8 than of 32)."""

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


def _as_args(inputs: Any) -> tuple[Any, ...]:
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


def _plan_key(posterior: L2MPosterior, model: nn.Module, args: tuple[Any, ...], *rest: Any) -> tuple:
    leaves = tuple((tuple(t.shape), t.dtype, t.device) if isinstance(t, Tensor) else repr(t) for t in tree_leaves(args))
    modes = tuple(m.training for m in model.modules())
    return (posterior.layout, tuple(posterior.param_dtypes.values()), leaves, modes, *rest)


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
    row_bytes = posterior.num_params * _sample_dtype(posterior, model).itemsize
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
    args = _as_args(inputs)
    key = _plan_key(posterior, model, args, num_samples, method, chunk_size, max_memory, output_fn)
    cached = _PLANS.get(model, {}).get(key)
    if cached is not None:
        return cached
    plan = _probe_plan(posterior, model, args, s, row_bytes, method, chunk_size, max_memory, output_fn, blocker)
    _remember(model, key, plan)
    return plan


def _remember(model: nn.Module, key: tuple, plan: PredictPlan) -> None:
    """Caches a plan, keeping the newest :data:`_MAX_PLANS` per model (keys hold ``output_fn`` objects)."""
    plans = _PLANS.setdefault(model, {})
    plans.pop(key, None)
    plans[key] = plan
    while len(plans) > _MAX_PLANS:
        plans.pop(next(iter(plans)))


def _probe_plan(
    posterior: L2MPosterior,
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


def _sample_dtype(posterior: L2MPosterior, model: nn.Module) -> torch.dtype:
    dtypes = set(posterior.param_dtypes.values())
    if len(dtypes) == 1:
        (dt,) = dtypes
        if dt in OUTPUT_DTYPES:
            return dt
    return torch.float32


# ------------------------------------------------------------------------------------------ evaluating


def _cast_views(views: dict[str, Tensor], dtypes: dict[str, torch.dtype]) -> dict[str, Tensor]:
    return {n: t if t.dtype == dtypes[n] else t.to(dtypes[n]) for n, t in views.items()}


def _vmap_chunk(model: nn.Module, views: dict[str, Tensor], args: tuple[Any, ...], output_fn: OutputFn | None) -> Any:
    from torch.func import functional_call, vmap

    def one(params: dict[str, Tensor]) -> Any:
        out = functional_call(model, params, args)
        return out if output_fn is None else output_fn(out)

    return vmap(one, in_dims=(0,), randomness="error")(views)


def _loop_chunk(
    binding: ParamBinding, views: dict[str, Tensor], args: tuple[Any, ...], model: nn.Module, output_fn: OutputFn | None
) -> Any:
    outs = []
    c = next(iter(views.values())).shape[0]
    for j in range(c):
        binding.bind({n: t[j] for n, t in views.items()})
        out = model(*args)
        outs.append(out if output_fn is None else output_fn(out))
    if isinstance(outs[0], (tuple, list)):
        return tuple(torch.stack(parts) for parts in zip(*outs))
    return torch.stack(outs)


def _predict_sharded(
    posterior: L2MPosterior,
    model: nn.Module,
    args: tuple[Any, ...],
    num_samples: int,
    seed: int,
    task: Task,
    keep_samples: bool,
    output_fn: OutputFn | None,
    sample_offset: int,
) -> RegressionPrediction | ClassificationPrediction:
    """A sharded posterior's predictive: the model's own (all-gathering) forward per in-place sample.

    ``functional_call`` needs whole parameters, so vmap cannot batch a sharded model; every rank must
    call this with the same arguments (the forwards communicate).
    """
    reducer = _RegressionReducer(num_samples, keep_samples) if task == "regression" else _ClassificationReducer(
        num_samples, keep_samples
    )
    with torch.no_grad():
        for s in range(sample_offset, sample_offset + num_samples):
            with posterior.sampled(model, s, seed):
                out = model(*args)
                out = out if output_fn is None else output_fn(out)
            reducer.update(tuple(t.unsqueeze(0) for t in out) if isinstance(out, (tuple, list)) else out.unsqueeze(0))
    return reducer.result("loop", 1)


def predict(
    posterior: L2MPosterior,
    model: nn.Module,
    inputs: Tensor | Sequence[Any],
    num_samples: int,
    seed: int = 0,
    *,
    task: Task = "regression",
    method: Method = "auto",
    max_memory: int = DEFAULT_MAX_MEMORY,
    chunk_size: int | None = None,
    keep_samples: bool = False,
    output_fn: OutputFn | None = None,
    sample_offset: int = 0,
    progress: bool | None = None,
) -> RegressionPrediction | ClassificationPrediction:
    """The Monte-Carlo posterior predictive of ``model`` at ``inputs`` over S posterior samples.

    Sample ``s`` is row ``s`` of ``posterior.sample(S, seed)``, whatever the chunking or the method, so
    results do not depend on ``chunk_size``, ``max_memory`` or ``method`` beyond float rounding.
    Runs under ``torch.no_grad()``; the model's mode (train/eval) is left as it is. Live parameters are
    untouched by vmap and restored bit-for-bit after a loop, exceptions included. The first call for a
    given model, input shapes and arguments runs one extra forward at the MAP (the probe that sizes
    the chunk) and, with ``method="auto"`` and more than two chunks, times vmap against a loop; both
    are cached. A model in training mode with batch norm is looped, so its running statistics are
    updated once per sample, as in a plain loop: call ``model.eval()`` first for a predictive.

    Args:
        posterior: the posterior over (some of) the model's parameters.
        model: the model; parameters the posterior does not cover stay as they are.
        inputs: (B, ...) tensor, or a tuple of positional arguments of the forward.
        num_samples: S.
        seed: 64-bit seed of the sampler. Default 0.
        task: ``"regression"`` (default): the model (after ``output_fn``) returns a (B, *out) mean, or
            a ``(mean, var)`` pair of (B, *out) tensors for a Gaussian head; ``"classification"``:
            (B, C) logits.
        method: ``"auto"`` (default; see the module docstring for the rule), ``"vmap"`` or ``"loop"``.
        max_memory: budget in bytes for one chunk's working set. Default 256 MiB.
        chunk_size: samples per chunk; overrides ``max_memory``. Default None.
        keep_samples: also return all S outputs (not counted in the budget). Default False.
        output_fn: maps the model's output to the form ``task`` expects, e.g.
            ``lambda y: (y[..., :1], y[..., 1:].exp())`` for a mean/log-variance head. Must be
            vmap-able for ``method="vmap"``. Default None.
        sample_offset: index of the first sample. Default 0.
        progress: tqdm progress bar: None (default) shows it on runs longer than 2 s, True always,
            False never.

    Returns:
        :class:`RegressionPrediction` with ``mean``, ``var``, ``epistemic_var``, ``aleatoric_var``
        (B, *out); or :class:`ClassificationPrediction` with ``probs`` (B, C), ``entropy``,
        ``expected_entropy``, ``mutual_info`` (B,).
    """
    if task not in ("regression", "classification"):
        raise ValueError(f"task must be 'regression' or 'classification', got {task!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    args = _as_args(inputs)
    if posterior.is_sharded:
        return _predict_sharded(posterior, model, args, num_samples, seed, task, keep_samples, output_fn, sample_offset)
    params = posterior._live_params(model)
    plan = plan_predict(
        posterior,
        model,
        args,
        num_samples,
        method=method,
        chunk_size=chunk_size,
        max_memory=max_memory,
        output_fn=output_fn,
    )
    reducer: _RegressionReducer | _ClassificationReducer
    if task == "regression":
        reducer = _RegressionReducer(num_samples, keep_samples)
    else:
        reducer = _ClassificationReducer(num_samples, keep_samples)
    dtypes = {n: p.dtype for n, p in params.items()}
    sdt = _sample_dtype(posterior, model)
    chunk = plan.chunk_size
    buf = torch.empty(chunk, posterior.num_params, dtype=sdt, device=posterior.device)
    run_method = plan.method
    # the trial: chunk 1 vmapped (warm-up, untimed), chunk 2 vmapped and timed, then a looped quarter chunk
    # under torch.distributed every rank must take the same path (forwards may communicate): no timing
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    trial = (
        method == "auto" and run_method == "vmap" and not plan.measured and num_samples > 2 * chunk and not distributed
    )
    chunks_done = 0
    t_vmap = t_loop = 0.0
    key = _plan_key(posterior, model, args, num_samples, method, chunk_size, max_memory, output_fn)
    binding = ParamBinding(params)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=num_samples,
        unit="sample",
        desc="predictive",
        delay=0.0 if progress else 2.0,
        disable=progress is False,
        leave=False,
    )
    try:
        with torch.no_grad(), binding:
            done = 0
            while done < num_samples:
                c = min(chunk, num_samples - done)
                loop_trial = trial and chunks_done >= 2
                if loop_trial:
                    c = min(c, max(2, chunk // 4))
                batch = posterior.sample(c, seed, sample_offset=sample_offset + done, out=buf[:c])
                views = _cast_views(batch.views(), dtypes)
                t0 = time.perf_counter()
                if loop_trial or run_method == "loop":
                    out = _loop_chunk(binding, views, args, model, output_fn)
                else:
                    try:
                        out = _vmap_chunk(model, views, args, output_fn)
                    except Exception as err:
                        if method != "auto" or done:
                            raise
                        warnings.warn(
                            f"vmap could not evaluate the model ({type(err).__name__}: {err}); "
                            "evaluating the samples in a loop instead",
                            RuntimeWarning,
                            stacklevel=2,
                        )
                        run_method, trial = "loop", False
                        _remember(model, key, replace(
                            plan, method="loop", reason=f"vmap failed: {type(err).__name__}", measured=True
                        ))
                        out = _loop_chunk(binding, views, args, model, output_fn)
                dt = (time.perf_counter() - t0) / c
                if trial and chunks_done == 1:
                    t_vmap = dt
                elif loop_trial:
                    t_loop, trial = dt, False
                    run_method = "loop" if t_loop < t_vmap else "vmap"
                    reason = f"measured: vmap {t_vmap * 1e3:.3g} ms/sample, loop {t_loop * 1e3:.3g} ms/sample"
                    _remember(model, key, replace(plan, method=run_method, reason=reason, measured=True))
                bar.set_description(f"predictive ({run_method})", refresh=False)
                reducer.update(out)
                del out, views, batch
                done += c
                chunks_done += 1
                bar.update(c)
    finally:
        bar.close()
    return reducer.result(run_method, chunk)
