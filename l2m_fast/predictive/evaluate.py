"""Evaluating the Monte-Carlo posterior predictive: every sample through the model, in chunks, reduced as it comes.

Samples are drawn chunk by chunk into one reused ``(chunk, P)`` buffer by the fused sampler
(:meth:`L2MPosterior.sample_into`, so sample ``s`` is always row ``s`` of ``posterior.sample(S, seed)``);
each chunk is evaluated on the inputs (split into input chunks when the plan says so) either

* **vmap**: one batched forward, ``torch.func.vmap`` over ``torch.func.functional_call`` with the
  parameters given as zero-copy ``(chunk, *shape)`` views of the buffer; or
* **loop**: one ordinary forward per sample, the live parameters bound (not copied) to the row's views
  (:class:`l2m_fast.inplace.ParamBinding`) and restored exactly afterwards;

as :mod:`l2m_fast.predictive.plan` decides, and reduced by :mod:`l2m_fast.predictive.results`.

**Linearized** (``linearized=True``): each sample's output is that of the model linearized at the MAP,
``f(x, theta) + J(x) (theta_s - theta)`` (the GLM predictive of Immer et al. 2021), computed with
forward-mode AD (``torch.func.jvp``: the Jacobian is never formed), batched over the samples with vmap or
looped like the sampled predictive, from the same samples. With a Gaussian head ``(mean, var)``, the mean
is linearized and the predicted variance is the MAP's. Sampling the weights of a nonlinear network
underfits when the posterior is wide; its linearization does not.

A sharded posterior (FSDP2) cannot be batched (``functional_call`` needs whole parameters): it loops over
in-place samples (:class:`l2m_fast.inplace.SampleIterator`), every rank running the same forwards. A
posterior of zero temperature (a calibration that found noise only hurts) is the MAP: its predictive is
one forward, reported with ``method="map"``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..holds import held_parameters
from ..inplace import ParamBinding
from ..ops.sample import as_int
from .plan import (
    DEFAULT_MAX_MEMORY,
    Method,
    OutputFn,
    PredictPlan,
    Task,
    as_args,
    plan_key,
    plan_predict,
    remember_plan,
    sample_dtype,
    split_args,
)
from .results import (
    LINKS,
    ClassificationPrediction,
    ClassificationReducer,
    RegressionPrediction,
    RegressionReducer,
)

if TYPE_CHECKING:
    from ..posterior import L2MPosterior

__all__ = ["predict"]


def _stack(outs: list[Any]) -> Any:
    first = outs[0]
    ok = isinstance(first, Tensor) or (
        isinstance(first, (tuple, list)) and all(isinstance(t, Tensor) for t in first)
    )
    if not ok:
        raise TypeError(
            f"the model (after output_fn) returned {type(first).__name__}: the predictive takes a tensor, or a "
            "(mean, var) pair of tensors for a Gaussian head; map the output with output_fn=..."
        )
    if isinstance(first, (tuple, list)):
        return tuple(torch.stack(parts) for parts in zip(*outs))
    return torch.stack(outs)


def _join(parts: list[Any], dim: int) -> Any:
    """Outputs of the input chunks joined along the input dimension ``dim`` (tensors or tuples of them)."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], (tuple, list)):
        return tuple(torch.cat(p, dim=dim) for p in zip(*parts))
    return torch.cat(parts, dim=dim)


class _Evaluator:
    """Evaluates chunks of sample rows on every input chunk: vmap or loop, raw or linearized.

    Args:
        posterior: the posterior (its layout and theta).
        model: the model.
        params: the covered live parameters.
        args: the forward's positional arguments.
        plan: the plan (input chunk).
        output_fn: maps the model's output.
        linearized: evaluate the model linearized at the MAP.
    """

    def __init__(
        self,
        posterior: L2MPosterior,
        model: nn.Module,
        params: dict[str, nn.Parameter],
        args: tuple[Any, ...],
        plan: PredictPlan,
        output_fn: OutputFn | None,
        linearized: bool,
    ) -> None:
        self.posterior = posterior
        self.model = model
        self.output_fn = output_fn
        self.linearized = linearized
        self.dtypes = {n: p.dtype for n, p in params.items()}
        self.primals = {n: p.detach() for n, p in params.items()}
        self.theta = posterior.layout.views(posterior.theta) if linearized else {}
        b = plan.input_chunk
        batch = next((t.shape[0] for t in args if isinstance(t, Tensor) and t.dim() > 0), 0)
        if b and batch and b < batch:
            self.chunks = [split_args(args, i, min(i + b, batch)) for i in range(0, batch, b)]
        else:
            self.chunks = [args]
        self._f0: list[Any] = [None] * len(self.chunks)

    def _call(self, params: dict[str, Tensor], args: tuple[Any, ...]) -> Any:
        from torch.func import functional_call

        out = functional_call(self.model, params, args)
        return out if self.output_fn is None else self.output_fn(out)

    def _views(self, rows: Tensor) -> dict[str, Tensor]:
        """(c, P) rows -> the parameters to evaluate: the samples, or their offsets from theta (linearized)."""
        views = self.posterior.layout.views(rows)
        if self.linearized:
            views = {n: t.float() - self.theta[n] for n, t in views.items()}
        return {n: t if t.dtype == self.dtypes[n] else t.to(self.dtypes[n]) for n, t in views.items()}

    def _map_output(self, k: int) -> Any:
        if self._f0[k] is None:
            self._f0[k] = self._call(self.primals, self.chunks[k])
        return self._f0[k]

    def _linear(self, k: int, tangent: Any) -> Any:
        """f(x, theta) + J(x) tangent for input chunk k; a Gaussian head keeps the MAP's variance."""
        f0 = self._map_output(k)
        if isinstance(f0, (tuple, list)):
            return (f0[0] + tangent[0], f0[1].expand_as(tangent[1]))
        return f0 + tangent

    def vmap(self, rows: Tensor) -> Any:
        """(c, B, ...) outputs of c sample rows, one batched call per input chunk."""
        from torch.func import jvp, vmap

        views = self._views(rows)
        parts = []
        for k, args in enumerate(self.chunks):
            if self.linearized:
                def tangent_out(d: dict[str, Tensor], args: tuple[Any, ...] = args) -> Any:
                    return jvp(lambda p: self._call(p, args), (self.primals,), (d,))[1]

                parts.append(self._linear(k, vmap(tangent_out, randomness="error")(views)))
            else:
                parts.append(vmap(lambda p, args=args: self._call(p, args), randomness="error")(views))
        return _join(parts, dim=1)

    def loop(self, rows: Tensor, binding: ParamBinding) -> Any:
        """(c, B, ...) outputs of c sample rows, one forward (or jvp) per sample and input chunk."""
        from torch.func import jvp

        views = self._views(rows)
        outs = []
        for j in range(rows.shape[0]):
            row = {n: t[j] for n, t in views.items()}
            parts = []
            for k, args in enumerate(self.chunks):
                if self.linearized:
                    tangent = jvp(lambda p, args=args: self._call(p, args), (self.primals,), (row,))[1]
                    parts.append(self._linear(k, tangent))
                else:
                    binding.bind(row)
                    out = self.model(*args)
                    parts.append(out if self.output_fn is None else self.output_fn(out))
            outs.append(_join(parts, dim=0))
        return _stack(outs)


def _predict_in_place(
    posterior: L2MPosterior,
    model: nn.Module,
    args: tuple[Any, ...],
    num_samples: int,
    seed: int,
    reducer: RegressionReducer | ClassificationReducer,
    output_fn: OutputFn | None,
    sample_offset: int,
) -> RegressionPrediction | ClassificationPrediction:
    """A sharded posterior's predictive: the model's own (all-gathering) forward per in-place sample.

    Every rank must call this with the same arguments (the forwards communicate).
    """
    from ..inplace import SampleIterator

    with torch.no_grad(), SampleIterator(posterior, model, num_samples, seed, sample_offset) as samples:
        for _ in samples:
            out = model(*args)
            out = out if output_fn is None else output_fn(out)
            reducer.update(tuple(t.unsqueeze(0) for t in out) if isinstance(out, (tuple, list)) else out.unsqueeze(0))
    return reducer.result("loop", 1)


def _predict_map(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    args: tuple[Any, ...],
    num_samples: int,
    reducer: RegressionReducer | ClassificationReducer,
    output_fn: OutputFn | None,
) -> RegressionPrediction | ClassificationPrediction:
    """A zero-temperature posterior: every sample is theta, so the predictive is the MAP's, one forward."""
    with torch.no_grad():
        out = model(*args)
        out = out if output_fn is None else output_fn(out)
    expand = lambda t: t.unsqueeze(0).expand(num_samples, *t.shape)  # noqa: E731
    reducer.update(tuple(expand(t) for t in out) if isinstance(out, (tuple, list)) else expand(out))
    return reducer.result("map", num_samples)


def predict(
    posterior: L2MPosterior,
    model: nn.Module,
    inputs: Tensor | Sequence[Any],
    num_samples: int,
    seed: int = 0,
    *,
    task: Task = "regression",
    linearized: bool = False,
    link: str = "mc",
    method: Method = "auto",
    max_memory: int = DEFAULT_MAX_MEMORY,
    chunk_size: int | None = None,
    input_chunk: int | None = None,
    keep_samples: bool = False,
    output_fn: OutputFn | None = None,
    sample_offset: int = 0,
    progress: bool | None = None,
) -> RegressionPrediction | ClassificationPrediction:
    """The Monte-Carlo posterior predictive of ``model`` at ``inputs`` over S posterior samples.

    Sample ``s`` is row ``s`` of ``posterior.sample(S, seed)``, whatever the chunking, the method or
    ``linearized``, so results do not depend on ``chunk_size``, ``input_chunk``, ``max_memory`` or
    ``method`` beyond float rounding, and the sampled and linearized predictives can be compared sample
    by sample. Runs under ``torch.no_grad()``; the model's mode (train/eval) is left as it is. Live
    parameters are untouched by vmap and restored bit-for-bit after a loop, exceptions included; while
    it runs they belong to this thread (:mod:`l2m_fast.inplace`). The first call for a given model, input
    shapes and arguments runs one extra forward at the MAP on a few inputs (the probe that sizes the
    chunks) and, with ``method="auto"`` and more than two chunks, times vmap against a loop; both are
    cached. A model in training mode with batch norm is looped, so its running statistics are updated
    once per sample, as in a plain loop: call ``model.eval()`` first for a predictive.

    Args:
        posterior: the posterior over (some of) the model's parameters.
        model: the model; parameters the posterior does not cover stay as they are.
        inputs: (B, ...) tensor, or a tuple of positional arguments of the forward.
        num_samples: S.
        seed: 64-bit seed of the sampler. Default 0.
        task: ``"regression"`` (default): the model (after ``output_fn``) returns a (B, *out) mean, or
            a ``(mean, var)`` pair of (B, *out) tensors for a Gaussian head; ``"classification"``:
            (B, C) logits, divided by the posterior's ``logit_temperature``.
        linearized: evaluate the model linearized at the MAP (see the module docstring). Default False.
        link: classification only: ``"mc"`` (default), the average softmax, or ``"probit"``, the probit
            approximation from the logits' mean and variance (:mod:`l2m_fast.predictive.results`).
        method: ``"auto"`` (default; the rule in :mod:`l2m_fast.predictive.plan`), ``"vmap"`` or ``"loop"``.
        max_memory: budget in bytes for one chunk's working set. Default 256 MiB.
        chunk_size: samples per chunk; overrides ``max_memory``. Default None.
        input_chunk: inputs per forward; overrides the plan's split of the inputs. Default None.
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
    given = num_samples
    try:
        num_samples = as_int(num_samples, "num_samples")
    except TypeError:
        num_samples = 0
    if num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {given!r}")
    if link not in LINKS:
        raise ValueError(f"link must be one of {LINKS}, got {link!r}")
    if link != "mc" and task != "classification":
        raise ValueError(f"link={link!r} applies to task='classification' only")
    args = as_args(inputs)
    reducer: RegressionReducer | ClassificationReducer
    if task == "regression":
        reducer = RegressionReducer(num_samples, keep_samples, linearized)
    else:
        reducer = ClassificationReducer(num_samples, keep_samples, link, posterior.logit_temperature, linearized)
    if posterior.is_sharded:
        if linearized:
            raise NotImplementedError(
                "the linearized predictive needs whole parameters (torch.func.functional_call); a sharded "
                "posterior has this rank's shards only: use the sampled predictive (linearized=False), which "
                "loops over in-place samples, or gather the model onto one device"
            )
        return _predict_in_place(posterior, model, args, num_samples, seed, reducer, output_fn, sample_offset)
    # the model and its parameters belong to this thread while the probe, vmap's functional_call and the
    # loop's bindings touch them
    with held_parameters(posterior, model) as params:
        if posterior.temperature == 0:
            return _predict_map(model, params, args, num_samples, reducer, output_fn)
        return _predict_chunked(
            posterior, model, params, args, num_samples, seed, reducer, method, linearized, max_memory, chunk_size,
            input_chunk, output_fn, sample_offset, progress,
        )


def _loop_chunk(plan: PredictPlan, chunk: int, chunk_size: int | None, buf: Tensor) -> tuple[int, Tensor]:
    """The chunk and sample buffer once an auto plan turns to the loop: the loop's own chunk (sized by its
    sample rows), unless the caller fixed ``chunk_size``; the buffer grows if it must (else a prefix)."""
    if chunk_size is not None or plan.loop_chunk_size < 1:
        return chunk, buf
    chunk = plan.loop_chunk_size
    if chunk > buf.shape[0]:
        buf = torch.empty(chunk, buf.shape[1], dtype=buf.dtype, device=buf.device)
    return chunk, buf


def _predict_chunked(
    posterior: L2MPosterior,
    model: nn.Module,
    params: dict[str, nn.Parameter],
    args: tuple[Any, ...],
    num_samples: int,
    seed: int,
    reducer: RegressionReducer | ClassificationReducer,
    method: Method,
    linearized: bool,
    max_memory: int,
    chunk_size: int | None,
    input_chunk: int | None,
    output_fn: OutputFn | None,
    sample_offset: int,
    progress: bool | None,
) -> RegressionPrediction | ClassificationPrediction:
    """:func:`predict`'s chunked evaluation, the parameters held by this thread."""
    plan = plan_predict(
        posterior,
        model,
        args,
        num_samples,
        method=method,
        chunk_size=chunk_size,
        input_chunk=input_chunk,
        max_memory=max_memory,
        output_fn=output_fn,
        linearized=linearized,
    )
    evaluator = _Evaluator(posterior, model, params, args, plan, output_fn, linearized)
    chunk = plan.chunk_size
    buf = torch.empty(chunk, posterior.num_params, dtype=sample_dtype(params), device=posterior.device)
    run_method = plan.method
    # the trial: chunk 1 vmapped (warm-up, untimed), chunk 2 vmapped and timed, then a looped quarter chunk
    # under torch.distributed every rank must take the same path (forwards may communicate): no timing
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    trial = (
        method == "auto" and run_method == "vmap" and not plan.measured and num_samples > 2 * chunk and not distributed
    )
    chunks_done = 0
    t_vmap = 0.0
    key = plan_key(params, model, args, num_samples, method, chunk_size, input_chunk, max_memory, output_fn, linearized)
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
                rows = posterior.sample_into(buf[:c], seed, sample_offset + done)
                t0 = time.perf_counter()
                if loop_trial or run_method == "loop":
                    out = evaluator.loop(rows, binding)
                else:
                    try:
                        out = evaluator.vmap(rows)
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
                        why = f"vmap failed: {type(err).__name__}"
                        out = evaluator.loop(rows, binding)
                        chunk, buf = _loop_chunk(plan, chunk, chunk_size, buf)
                        remember_plan(
                            model, key, replace(plan, method="loop", reason=why, measured=True, chunk_size=chunk)
                        )
                dt = (time.perf_counter() - t0) / c
                if trial and chunks_done == 1:
                    t_vmap = dt
                elif loop_trial:
                    trial = False
                    run_method = "loop" if dt < t_vmap else "vmap"
                    reason = f"measured: vmap {t_vmap * 1e3:.3g} ms/sample, loop {dt * 1e3:.3g} ms/sample"
                    if run_method == "loop":
                        chunk, buf = _loop_chunk(plan, chunk, chunk_size, buf)
                    remember_plan(
                        model, key, replace(plan, method=run_method, reason=reason, measured=True, chunk_size=chunk)
                    )
                bar.set_description(f"predictive ({run_method})", refresh=False)
                reducer.update(out)
                del out, rows
                done += c
                chunks_done += 1
                bar.update(c)
    finally:
        bar.close()
    return reducer.result(run_method, chunk)
