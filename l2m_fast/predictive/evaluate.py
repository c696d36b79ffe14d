"""Evaluating the Monte-Carlo posterior predictive: every sample through the model, in chunks, reduced as it comes.

Samples are drawn chunk by chunk into one reused ``(chunk, P)`` buffer by the fused sampler
(:meth:`L2MPosterior.sample_into`, so sample ``s`` is always row ``s`` of ``posterior.sample(S, seed)``);
each chunk is evaluated either

* **vmap**: one batched forward, ``torch.func.vmap`` over ``torch.func.functional_call`` with the
  parameters given as zero-copy ``(chunk, *shape)`` views of the buffer; or
* **loop**: one ordinary forward per sample, the live parameters bound (not copied) to the row's views
  (:class:`l2m_fast.inplace.ParamBinding`) and restored exactly afterwards;

as :mod:`l2m_fast.predictive.plan` decides, and reduced by :mod:`l2m_fast.predictive.results`. A sharded
posterior (FSDP2) cannot be batched (``functional_call`` needs whole parameters): it loops over in-place
samples (:class:`l2m_fast.inplace.SampleIterator`), every rank running the same forwards.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..inplace import ParamBinding, claim
from .plan import (
    DEFAULT_MAX_MEMORY,
    Method,
    OutputFn,
    Task,
    as_args,
    plan_key,
    plan_predict,
    remember_plan,
    sample_dtype,
)
from .results import ClassificationPrediction, ClassificationReducer, RegressionPrediction, RegressionReducer

if TYPE_CHECKING:
    from ..posterior import L2MPosterior

__all__ = ["predict"]


def _reducer(task: Task, num_samples: int, keep: bool) -> RegressionReducer | ClassificationReducer:
    return RegressionReducer(num_samples, keep) if task == "regression" else ClassificationReducer(num_samples, keep)


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


def _predict_in_place(
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

    Every rank must call this with the same arguments (the forwards communicate).
    """
    from ..inplace import SampleIterator

    reducer = _reducer(task, num_samples, keep_samples)
    with torch.no_grad(), SampleIterator(posterior, model, num_samples, seed, sample_offset) as samples:
        for _ in samples:
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
    args = as_args(inputs)
    if posterior.is_sharded:
        return _predict_in_place(
            posterior, model, args, num_samples, seed, task, keep_samples, output_fn, sample_offset
        )
    params = posterior.parameters_of(model)
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
    reducer = _reducer(task, num_samples, keep_samples)
    dtypes = {n: p.dtype for n, p in params.items()}
    sdt = sample_dtype(params)
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
    key = plan_key(params, model, args, num_samples, method, chunk_size, max_memory, output_fn)
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
        with torch.no_grad(), claim(params), binding:
            done = 0
            while done < num_samples:
                c = min(chunk, num_samples - done)
                loop_trial = trial and chunks_done >= 2
                if loop_trial:
                    c = min(c, max(2, chunk // 4))
                rows = posterior.sample_into(buf[:c], seed, sample_offset + done)
                views = _cast_views(posterior.layout.views(rows), dtypes)
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
                        remember_plan(model, key, replace(
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
                    remember_plan(model, key, replace(plan, method=run_method, reason=reason, measured=True))
                bar.set_description(f"predictive ({run_method})", refresh=False)
                reducer.update(out)
                del out, views, rows
                done += c
                chunks_done += 1
                bar.update(c)
    finally:
        bar.close()
    return reducer.result(run_method, chunk)
