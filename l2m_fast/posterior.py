"""``L2MPosterior``: a diagonal Gaussian over a model's parameters, sampled by the fused op.

The posterior snapshots theta (the MAP) and the optimizer's second moment ``v`` at construction into
two flat float32 vectors in the model's parameter order, with the precision ``a * v + b`` given per
segment of elements (:mod:`l2m_fast.modes`). Training on afterwards does not change it.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .construction import FromSources
from .layout import FlatLayout
from .modes import PerGroup, restrict_segments, segments
from .ops.checks import check_segments
from .ops.sample import MAX_SAMPLES, OUTPUT_DTYPES, check_values, sample_diag_gaussian
from .posterior_state import STATE_VERSION, PosteriorState, check_state
from .sharding import local_box
from .snapshot import FlatStore, take_snapshot

if TYPE_CHECKING:
    from .inplace import SampleIterator
    from .predictive import ClassificationPrediction, RegressionPrediction

__all__ = ["L2MPosterior", "SampleBatch"]

_SEGMENT_CACHE_SIZE = 64


@dataclass(frozen=True)
class SampleBatch:
    """S samples of the posterior: one flat ``(S, P)`` tensor and zero-copy views by parameter name.

    Attributes:
        flat: (S, P) samples, one row per sample.
        layout: where each parameter lives in a row.
    """

    flat: Tensor
    layout: FlatLayout

    def __len__(self) -> int:
        return self.flat.shape[0]

    def __getitem__(self, name: str) -> Tensor:
        """(S, *shape) view of one parameter's samples."""
        slot = self.layout[name]
        return self.flat[:, slot.offset : slot.stop].view(self.flat.shape[0], *slot.shape)

    def views(self) -> dict[str, Tensor]:
        """name -> (S, *shape) views, for ``torch.func.functional_call`` under ``vmap``."""
        return self.layout.views(self.flat)


class L2MPosterior(FromSources):
    """Diagonal Gaussian ``N(theta, diag(a * v + b)^-1)`` over (some of) a model's parameters.

    Build it with :meth:`from_optimizer`, :meth:`from_state_dict` or :meth:`from_fisher`
    (:class:`~l2m_fast.construction.FromSources`); the constructor takes the pieces directly, for any
    diagonal Gaussian whose precision is ``a * v + b``.

    Args:
        params: name -> parameter (the mean), in the order that fixes the flat layout.
        second_moments: name -> ``v``, each the shape of its parameter.
        a: per-group scale of ``v``: a float, a sequence indexed by group or a mapping group -> value.
        b: per-group additive precision, likewise. Must make ``a * v + b > 0``.
        groups: name -> group index (default: every parameter in group 0).
        mode: a label for the repr (``"paper"``, ``"explicit"`` or ``"custom"``).
        kept_at_map: ``(name, reason)`` of parameters left out of the posterior.
        device: where to keep the snapshot (default: the parameters' device).
        snapshot: copy theta and v (default) or read the given tensors live (see :mod:`l2m_fast.snapshot`).

    Attributes:
        layout: the flat layout of the covered parameters.
        theta: (P,) float32 snapshot of the mean.
        v: (P,) float32 snapshot of the second moment.
        seg_a, seg_b: (G,) float32 per-segment coefficients; seg_bounds: (G + 1,) int64.
        is_sharded: built from DTensor (FSDP2) parameters. Then ``layout``, ``theta``, ``v`` and samples
            hold this rank's local elements only (local shapes), ``runs`` gives their global flat
            indices, and ``sampled`` writes local shards in place. Consumers that need whole
            parameters (a batched ``functional_call`` predictive) must use the ``sampled`` loop instead.
        runs: ``(local_offset, global_offset, numel)`` runs of consecutive global indices; one run
            ``(0, 0, P)`` when not sharded (see :mod:`l2m_fast.distributed`).
        global_numel: P of the whole, unsharded posterior.
    """

    def __init__(
        self,
        params: Mapping[str, Tensor],
        second_moments: Mapping[str, Tensor],
        a: PerGroup = 1.0,
        b: PerGroup = 1.0,
        groups: Mapping[str, int] | None = None,
        *,
        mode: str = "custom",
        kept_at_map: Sequence[tuple[str, str]] = (),
        device: torch.device | str | None = None,
        snapshot: bool = True,
    ) -> None:
        from .modes import per_group

        names = list(params)
        missing = [n for n in names if n not in second_moments]
        if missing:
            raise KeyError(f"no second moment for parameters {missing[:5]}: give one tensor per parameter")
        extra = [n for n in second_moments if n not in params]
        if extra:
            raise KeyError(f"second moments given for unknown parameters {extra[:5]}")
        groups = dict(groups or {})
        coeffs = []
        for n in names:
            g = groups.get(n, 0)
            ag, bg = per_group(a, g, "a"), per_group(b, g, "b")
            if ag is None or bg is None:
                raise ValueError(f"no (a, b) for group {g} of parameter {n!r}")
            coeffs.append((ag, bg))
        self._init(
            [(n, params[n], second_moments[n]) for n in names], coeffs, mode, kept_at_map, groups, device, snapshot
        )

    def _init(
        self,
        entries: Sequence[tuple[str, Tensor, Tensor]],
        coeffs: Sequence[tuple[float, float]],
        mode: str,
        kept_at_map: Sequence[tuple[str, str]],
        groups: Mapping[str, int],
        device: torch.device | str | None,
        snapshot: bool = True,
    ) -> None:
        snap = take_snapshot(entries, device, snapshot=snapshot)
        self.layout, self._store = snap.layout, snap.store
        self.runs, self.global_numel, self.is_sharded = snap.runs, snap.global_numel, snap.is_sharded
        self.param_dtypes = snap.param_dtypes
        self._device = snap.device
        self.seg_a, self.seg_b, self.seg_bounds = (t.to(snap.device) for t in segments(coeffs, self.layout))
        self.mode = mode
        self.temperature = 1.0
        self.logit_temperature = 1.0
        self.kept_at_map: tuple[tuple[str, str], ...] = tuple(kept_at_map)
        self.groups = {n: int(groups.get(n, 0)) for n in self.layout.names}
        self.coefficients = {n: (float(c[0]), float(c[1])) for n, c in zip(self.layout.names, coeffs)}
        self.evidence = None
        self.calibration = None
        self._reset_caches()
        self._check_values()

    def _check_values(self) -> None:
        """What the sampler trusts: the segments, and v finite, non-negative, with a positive precision.

        A snapshot's v was validated as it was copied, so only a non-positive ``b`` needs another pass;
        live tensors are scanned here, one compiled pass each.
        """
        n = self.layout.numel
        names = {slot.offset: slot.name for slot in self.layout}
        if not self.live and bool((self.seg_b > 0).all()):
            check_segments(self.v, self.seg_a, self.seg_b, self.seg_bounds)
            return
        for first, last, _, v, _ in self._store.pieces(0, n):
            try:
                check_values(v, *self._segments(first, last))
            except ValueError as err:
                where = f"parameter {names[first]!r}: " if self.live and first in names else ""
                raise ValueError(f"{where}{err}") from None

    # ---------------------------------------------------------------- properties

    @property
    def theta(self) -> Tensor:
        """(P,) float32 mean: the snapshot, or a flat copy of the live weights (``snapshot=False``)."""
        return self._store.flat_theta()

    @property
    def v(self) -> Tensor:
        """(P,) float32 second moment (or Fisher): the snapshot, or a flat copy of the live state."""
        return self._store.flat_v()

    @property
    def live(self) -> bool:
        """Built with ``snapshot=False``: samples read the live weights and state (training on changes them)."""
        return self._store.live

    @property
    def num_params(self) -> int:
        """P, the number of scalar parameters covered."""
        return self.layout.numel

    @property
    def device(self) -> torch.device:
        return self._device

    def variance(self) -> Tensor:
        """(P,) float32 posterior variance ``1 / (a * v + b)`` (zero at temperature 0)."""
        if not self.layout.numel or self.temperature == 0:
            return torch.zeros_like(self.theta)
        from .ops.reference import segment_ids_ref

        seg = segment_ids_ref(self.seg_bounds, self.layout.numel)
        return 1.0 / (self.seg_a[seg] * self.v + self.seg_b[seg])

    def to(self, device: torch.device | str) -> L2MPosterior:
        """Moves the snapshot to ``device`` in place; returns self."""
        self._store = self._store.to(device)
        for name in ("seg_a", "seg_b", "seg_bounds"):
            setattr(self, name, getattr(self, name).to(device))
        self._device = torch.device(device)
        self._reset_caches()
        return self

    # ---------------------------------------------------------------- sampling

    def _segments(self, start: int, stop: int) -> tuple[Tensor, Tensor, Tensor]:
        """The segments ``(a, b, bounds)`` over local elements ``[start, stop)``, re-based to 0 (cached)."""
        if start == 0 and stop == self.layout.numel:
            return self.seg_a, self.seg_b, self.seg_bounds
        cache = self._segment_cache
        hit = cache.get((start, stop))
        if hit is None:
            if len(cache) >= _SEGMENT_CACHE_SIZE:
                cache.clear()
            hit = restrict_segments(self.seg_a, self.seg_b, self._bounds_list, start, stop)
            cache[(start, stop)] = hit
        return hit

    def _reset_caches(self) -> None:
        self._segment_cache: dict[tuple[int, int], tuple[Tensor, Tensor, Tensor]] = {}
        self._bounds_list: list[int] = self.seg_bounds.tolist()

    def sample_into(
        self,
        out: Tensor,
        seed: int = 0,
        sample_offset: int = 0,
        columns: tuple[int, int] | None = None,
    ) -> Tensor:
        """Fills ``out`` with samples ``sample_offset .. sample_offset + S - 1`` of some of the local elements.

        The one place the fused sampler is called from: :meth:`sample`, the in-place writers
        (:mod:`l2m_fast.inplace`) and the predictives all draw through it. Each run of consecutive
        global indices (one run unless the posterior is sharded) is one call of the op with its own
        ``element_offset`` and segments, so every value follows the sampling contract: column ``j`` of
        ``out`` holds local element ``start + j``, whatever ``columns``, ``sample_offset`` or sharding.

        Args:
            out: (S, stop - start) contiguous buffer of float32, bfloat16 or float16 on the posterior's
                device; written in place.
            seed: 64-bit seed. Default 0.
            sample_offset: index of the first sample. Default 0.
            columns: ``(start, stop)``, the range of local elements (columns of :meth:`sample`'s
                ``flat``) to draw. Default None: all ``P``.

        Returns:
            out: (S, stop - start).
        """
        n = self.layout.numel
        start, stop = (0, n) if columns is None else (int(columns[0]), int(columns[1]))
        if not 0 <= start <= stop <= n:
            raise ValueError(f"columns must satisfy 0 <= start <= stop <= P={n}, got {columns}")
        if not isinstance(out, Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if out.dim() != 2 or out.shape[1] != stop - start or not out.is_contiguous():
            raise ValueError(
                f"out must be a contiguous (S, {stop - start}) tensor for columns {start}..{stop}, "
                f"got shape {tuple(out.shape)}{'' if out.is_contiguous() else ' (non-contiguous)'}"
            )
        if out.dtype not in OUTPUT_DTYPES:
            raise TypeError(f"out must be one of {OUTPUT_DTYPES}, got {out.dtype}")
        if out.device != self.device:
            raise ValueError(f"out is on {out.device} but the posterior on {self.device}: move one with .to(device)")
        if out.requires_grad:
            raise RuntimeError(
                "out requires grad: the sampler writes it in place outside autograd, which would leave wrong "
                "gradients behind; pass a tensor that does not require grad (allocate it under torch.no_grad(), "
                "or give out.detach() and use that)"
            )
        s = out.shape[0]
        for first, last, theta, v, element_offset in self._store.pieces(start, stop):
            cols = out[:, first - start : last - start]
            if self.temperature == 0:  # every sample is theta (a calibration found that noise only hurts)
                cols.copy_(theta.expand(s, last - first))
                continue
            target = cols if cols.is_contiguous() else torch.empty(s, last - first, dtype=out.dtype, device=out.device)
            a, b, bounds = self._segments(first, last)
            sample_diag_gaussian(
                theta,
                v,
                a=a,
                b=b,
                bounds=bounds,
                seed=seed,
                sample_offset=sample_offset,
                element_offset=element_offset,
                out=target,
                validate=False,
            )
            if target is not cols:
                cols.copy_(target)
        return out

    def sample(
        self,
        num_samples: int,
        seed: int = 0,
        *,
        sample_offset: int = 0,
        dtype: torch.dtype = torch.float32,
        out: Tensor | None = None,
    ) -> SampleBatch:
        """Draws S samples in one call of the fused sampler (one per run of a sharded posterior).

        Sample ``s`` of seed ``k`` is the same whatever the chunking: ``sample(4, k, sample_offset=2)``
        returns samples 2..5 of ``sample(8, k)``.

        Args:
            num_samples: S.
            seed: 64-bit seed. Default 0.
            sample_offset: index of the first sample. Default 0.
            dtype: float32 (default), bfloat16 or float16 when ``out`` is None.
            out: optional (S, P) contiguous buffer to reuse (a fresh large output costs page faults).

        Returns:
            A :class:`SampleBatch`: ``batch.flat`` (S, P), ``batch[name]`` (S, *shape).
        """
        try:
            num_samples = operator.index(num_samples)
        except TypeError:
            raise TypeError(f"num_samples must be an int, got {type(num_samples).__name__}") from None
        if num_samples < 0 or num_samples > MAX_SAMPLES:
            raise ValueError(f"num_samples must lie in [0, 2^32] (32-bit sample indices), got {num_samples}")
        if dtype not in OUTPUT_DTYPES:
            raise TypeError(f"dtype must be one of {OUTPUT_DTYPES}, got {dtype}")
        if out is None:
            out = torch.empty(num_samples, self.layout.numel, dtype=dtype, device=self.device)
        elif isinstance(out, Tensor) and out.dim() == 2 and out.shape[0] != num_samples:
            raise ValueError(f"out has {out.shape[0]} rows but num_samples={num_samples}")
        return SampleBatch(self.sample_into(out, seed, sample_offset), self.layout)

    def parameters_of(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The model's parameters this posterior covers, checked against its layout.

        Args:
            model: the model the posterior was built from (or one with the same covered parameters).

        Returns:
            name -> the live ``nn.Parameter``, in the posterior's flat order. For a sharded posterior
            the parameters are DTensors whose local shards have the layout's (local) shapes.

        Raises:
            KeyError: a covered parameter is missing from the model.
            ValueError: a shape or device differs from the posterior's.
        """
        named = dict(model.named_parameters())  # a tied weight under its first name only, as in every layout
        out = {}
        for slot in self.layout:
            p = named.get(slot.name)
            if p is None:
                raise KeyError(f"the model has no parameter {slot.name!r} that this posterior covers")
            local = local_box(slot.name, p)[0] if self.is_sharded else p
            if tuple(local.shape) != slot.shape:
                what = "local shard" if self.is_sharded else "parameter"
                raise ValueError(
                    f"{what} {slot.name!r} has shape {tuple(local.shape)}, the posterior {slot.shape}: "
                    "was the posterior built from this model (on this rank)?"
                )
            if local.device != self.device:
                raise ValueError(
                    f"parameter {slot.name!r} is on {local.device} but the posterior on {self.device}: "
                    "move one with .to(device)"
                )
            out[slot.name] = p
        return out

    def sampled(self, model: nn.Module, index: int = 0, seed: int = 0) -> AbstractContextManager[nn.Module]:
        """Sample ``index`` of ``seed`` written into the model's parameters; see :func:`l2m_fast.inplace.sampled`."""
        from .inplace import sampled

        return sampled(self, model, index, seed)

    def iter_sampled(
        self, model: nn.Module, num_samples: int, seed: int = 0, *, sample_offset: int = 0
    ) -> SampleIterator:
        """S samples written in place one after another; see :class:`l2m_fast.inplace.SampleIterator`."""
        from .inplace import SampleIterator

        return SampleIterator(self, model, num_samples, seed, sample_offset)

    def predict(
        self, model: nn.Module, inputs: object, num_samples: int, seed: int = 0, **kwargs: object
    ) -> RegressionPrediction | ClassificationPrediction:
        """The Monte-Carlo posterior predictive; see :func:`l2m_fast.predictive.predict` for every option."""
        from .predictive import predict

        return predict(self, model, inputs, num_samples=num_samples, seed=seed, **kwargs)  # type: ignore[arg-type]

    def calibrated(self, model: nn.Module, inputs: object, targets: Tensor, **kwargs: object) -> L2MPosterior:
        """A new posterior, its temperature fitted on validation data; see :func:`l2m_fast.calibration.calibrate`."""
        from .calibration import calibrate

        return calibrate(self, model, inputs, targets, **kwargs)  # type: ignore[arg-type]

    def to_laplace(self, model: nn.Module, likelihood: str, **kwargs: object) -> object:
        """This posterior as a laplace-torch ``DiagLaplace``: :func:`l2m_fast.integrations.laplace_torch.to_laplace`."""
        from .integrations.laplace_torch import to_laplace

        return to_laplace(self, model, likelihood, **kwargs)  # type: ignore[arg-type]

    def scaled(
        self, temperature: float, logit_temperature: float | None = None, calibration: object = None
    ) -> L2MPosterior:
        """A new posterior, this one with its variance multiplied by ``temperature`` (theta and v shared).

        Args:
            temperature: tau >= 0, multiplies every variance (divides ``a`` and ``b``); 0 gives the MAP:
                every sample is theta and the predictive is the MAP's.
            logit_temperature: T > 0, divides the logits in the classification predictive. Default None:
                this posterior's.
            calibration: the report of the calibration that chose them, kept as ``calibration``.

        Returns:
            The new posterior; ``temperature`` is this one's times ``temperature``.
        """
        tau = float(temperature)
        if not math.isfinite(tau) or tau < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        t_logit = self.logit_temperature if logit_temperature is None else float(logit_temperature)
        if not math.isfinite(t_logit) or t_logit <= 0:
            raise ValueError(f"logit_temperature must be a finite number > 0, got {logit_temperature!r}")
        new = copy.copy(self)
        if tau > 0:
            new.seg_a, new.seg_b = self.seg_a / tau, self.seg_b / tau
        new.temperature = self.temperature * tau
        new.logit_temperature = t_logit
        new.calibration = calibration
        new._reset_caches()
        return new

    # ---------------------------------------------------------------- persistence

    def state_dict(self) -> dict[str, object]:
        """A ``torch.save``-able description of the posterior (checked on load: :mod:`l2m_fast.posterior_state`)."""
        return {
            "version": STATE_VERSION,
            "layout": self.layout.to_spec(),
            "theta": self.theta,
            "v": self.v,
            "seg_a": self.seg_a,
            "seg_b": self.seg_b,
            "seg_bounds": self.seg_bounds,
            "mode": self.mode,
            "kept_at_map": [list(k) for k in self.kept_at_map],
            "param_dtypes": {n: str(d).removeprefix("torch.") for n, d in self.param_dtypes.items()},
            "groups": dict(self.groups),
            "coeffs": {n: list(c) for n, c in self.coefficients.items()},
            "runs": [list(r) for r in self.runs],
            "global_numel": self.global_numel,
            "is_sharded": self.is_sharded,
            "temperature": self.temperature,
            "logit_temperature": self.logit_temperature,
        }

    def _assign(self, st: PosteriorState, device: torch.device | str | None) -> None:
        for name in ("layout", "mode", "kept_at_map", "param_dtypes", "groups", "coefficients", "runs"):
            setattr(self, name, getattr(st, name))
        for name in ("seg_a", "seg_b", "seg_bounds"):
            t = getattr(st, name)
            setattr(self, name, t if device is None else t.to(device))
        self._store = FlatStore(st.theta, st.v, st.runs)
        if device is not None:
            self._store = self._store.to(device)
        self._device = self.seg_a.device
        self.global_numel, self.is_sharded = st.global_numel, st.is_sharded
        self.temperature, self.logit_temperature = st.temperature, st.logit_temperature
        self.evidence = None
        self.calibration = None
        self._reset_caches()

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Loads a :meth:`state_dict`; the layout (names and shapes, in order) must match this posterior's.

        Raises:
            ValueError: the state fails a check (:mod:`l2m_fast.posterior_state`) or its layout differs.
        """
        st = check_state(state)
        if st.layout != self.layout:
            ours, theirs = self.layout.to_spec(), st.layout.to_spec()
            diff = next(((x, y) for x, y in zip(ours, theirs) if x != y), (len(ours), len(theirs)))
            raise ValueError(f"the state's layout does not match this posterior's (first difference: {diff})")
        self._assign(st, self.device)

    @classmethod
    def from_saved(cls, state: Mapping[str, object], device: torch.device | str | None = None) -> L2MPosterior:
        """Rebuilds a posterior from :meth:`state_dict` alone (no model needed), on ``device`` if given."""
        post = cls.__new__(cls)
        post._assign(check_state(state), device)
        return post

    def __repr__(self) -> str:
        g = self.seg_a.numel()
        groups = sorted(set(self.groups.values()))
        lines = [
            f"L2MPosterior(P={self.num_params:,}, tensors={len(self.layout)}, groups={groups}, segments={g}, "
            f"mode={self.mode!r}, temperature={self.temperature:.4g}, logit_temperature={self.logit_temperature:.4g}, "
            f"dtype=torch.float32, device={self.device})"
        ]
        if self.live:
            lines.append("  snapshot=False: reads the live weights and optimizer state (training on changes it)")
        if self.kept_at_map:
            shown = ", ".join(f"{n} ({why})" for n, why in self.kept_at_map[:6])
            more = f", +{len(self.kept_at_map) - 6} more" if len(self.kept_at_map) > 6 else ""
            lines.append(f"  kept at the MAP: {shown}{more}")
        return "\n".join(lines)
