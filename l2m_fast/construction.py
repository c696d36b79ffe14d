"""Building a posterior from where its curvature lives: a live optimizer, a checkpoint, a Fisher diagonal.

:class:`FromSources` holds the classmethods :class:`~l2m_fast.L2MPosterior` inherits: each reads the
second moments (:mod:`l2m_fast.optim`) or the Fisher diagonal (:mod:`l2m_fast.fisher`), turns the mode's
options into per-parameter ``(a, b)`` (:mod:`l2m_fast.modes`, with the evidence of
:mod:`l2m_fast.evidence` when asked) and hands them to the posterior's own initialiser.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .fisher import FisherEstimate, FisherTracker, fisher_moments
from .modes import PerGroup, coefficients
from .ops.sample import int_or_none
from .optim import ParamFilter, ParamMoment, moments_from_optimizer, moments_from_state_dict
from .sharding import reshard_fsdp

if TYPE_CHECKING:
    from .posterior import L2MPosterior

__all__ = ["FromSources"]


class FromSources:
    """The constructors of :class:`~l2m_fast.L2MPosterior` from an optimizer, a checkpoint or a Fisher."""

    _init: Any  # the posterior's initialiser (entries, coefficients, mode, kept, groups, device)

    @classmethod
    def _from_moments(
        cls,
        model: nn.Module,
        moments: list[ParamMoment],
        kept: list[tuple[str, str]],
        mode: str,
        options: dict,
        snapshot: bool = True,
    ) -> L2MPosterior:
        """A posterior over ``moments`` in ``mode`` (the shared path of every constructor)."""
        if not moments:
            raise ValueError(
                "no parameter is covered: the selection is empty or no parameter has optimizer state "
                f"({len(kept)} left out: {[n for n, _ in kept][:5]})"
            )
        named = dict(model.named_parameters())
        coeffs, evidence = coefficients(moments, named, mode, options)
        post = cls.__new__(cls)
        post._init(
            [(m.name, named[m.name], m.v) for m in moments],
            coeffs,
            mode,
            kept,
            {m.name: m.group for m in moments},
            None,
            snapshot,
        )
        post.evidence = evidence
        return post

    @classmethod
    def from_optimizer(
        cls,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        mode: str = "paper",
        params: ParamFilter = None,
        missing: str = "raise",
        snapshot: bool = True,
        **options: PerGroup | int,
    ) -> L2MPosterior:
        """The L2M posterior of a trained model from its live optimizer (Adam, AdamW, NAdam, RAdam,
        RMSprop, Adagrad, Adadelta).

        Args:
            model: the trained model (its current weights are the MAP).
            optimizer: the optimizer that trained it.
            mode: ``"paper"`` (default; ``precision = v_hat + 1/weight_decay + eps``) or ``"explicit"``.
            params: subset: parameter names, or a predicate ``(name, param) -> bool`` such as
                ``lambda n, p: n.startswith("head.")``; the rest stay at the MAP. Default: all.
            missing: ``"raise"`` (default) or ``"skip"`` for parameters the optimizer has no state for.
            snapshot: copy theta and v (default; training on does not change the posterior), or read the
                live weights and optimizer state with no copy (``False``: for models whose copies do not
                fit; training on changes the posterior; see :mod:`l2m_fast.snapshot`).
            **options: paper mode: ``weight_decay``, ``eps`` overrides; explicit mode: ``fisher_scale``,
                ``prior_precision``, ``temperature``, ``num_data``, ``batch_size``. Each a float, a
                sequence indexed by group, or a mapping group -> value. Explicit mode's
                ``prior_precision`` may also be ``"evidence"`` (one precision maximising the Laplace
                evidence, no data needed: :mod:`l2m_fast.evidence`; the fit in ``post.evidence``) or
                ``"evidence_per_group"``, with ``prior_mean`` (a state_dict or a model, e.g. the
                pretrained weights; default zeros) as the prior's mean.
        """
        reshard_fsdp(model)  # an unsharded FSDP2 root registers plain tensors the optimizer does not hold
        moments, kept = moments_from_optimizer(model, optimizer, params, missing)
        return cls._from_moments(model, moments, kept, mode, options, snapshot)

    @classmethod
    def from_fisher(
        cls,
        model: nn.Module,
        fisher: FisherTracker | FisherEstimate | Mapping[str, Tensor],
        *,
        num_data: int,
        prior_precision: PerGroup | str,
        prior_mean: Mapping[str, Tensor] | nn.Module | None = None,
        temperature: float = 1.0,
        snapshot: bool = True,
    ) -> L2MPosterior:
        """The Laplace posterior with a sampled-label Fisher as its curvature: precision ``N F + prior_precision``.

        Args:
            model: the trained model (its current weights are the MAP).
            fisher: a :class:`~l2m_fast.fisher.FisherTracker` (tracked during training), a
                :class:`~l2m_fast.fisher.FisherEstimate` (:func:`~l2m_fast.fisher.fisher_diag`), or a mapping
                name -> per-example Fisher diagonal; its parameters are the ones covered.
            num_data: N, the training set size (the Fisher is per example).
            prior_precision: a float, or ``"evidence"`` to maximise the Laplace evidence (no data pass;
                the fit in ``post.evidence``).
            prior_mean: the prior's mean for the evidence (a state_dict or a model; default zeros).
            temperature: multiplies the variance. Default 1.
            snapshot: copy theta and the Fisher (default), or read the live weights and the given Fisher
                tensors (``False``; see :meth:`from_optimizer`).

        Returns:
            The posterior (``mode="fisher"``), sampled, predicted and calibrated like any other.
        """
        given, num_data = num_data, int_or_none(num_data)
        if num_data is None or num_data < 1:
            raise ValueError(f"num_data must be a positive int (the training set size), got {given!r}")
        reshard_fsdp(model)
        moments, kept = fisher_moments(model, fisher)
        options = {"fisher_scale": float(num_data), "prior_precision": prior_precision, "temperature": temperature}
        if prior_mean is not None:
            options["prior_mean"] = prior_mean
        post = cls._from_moments(model, moments, kept, "explicit", options, snapshot)
        post.mode = "fisher"
        return post

    @classmethod
    def from_state_dict(
        cls,
        model: nn.Module,
        optimizer_state: Mapping[str, object],
        *,
        optimizer: type | None = None,
        param_names: Sequence[str] | None = None,
        mode: str = "paper",
        params: ParamFilter = None,
        missing: str = "raise",
        snapshot: bool = True,
        **options: PerGroup | int,
    ) -> L2MPosterior:
        """The L2M posterior from a checkpoint: the model (weights loaded) and ``optimizer.state_dict()``.

        Args:
            model: the model, its weights the MAP.
            optimizer_state: the optimizer's ``state_dict()``.
            optimizer: the optimizer class, if it cannot be told from the state.
            param_names: the model name of each state_dict parameter, in its order (see
                :func:`l2m_fast.optim.moments_from_state_dict` for the default matching).
            mode, params, missing, snapshot, **options: as in :meth:`from_optimizer`.
        """
        reshard_fsdp(model)
        moments, kept = moments_from_state_dict(model, optimizer_state, optimizer, param_names, params, missing)
        return cls._from_moments(model, moments, kept, mode, options, snapshot)
