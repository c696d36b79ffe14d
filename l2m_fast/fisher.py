"""A curvature that does not vanish: the Fisher diagonal from labels sampled from the model's own predictive.

Adam's ``v`` is the second moment of mini-batch gradients with the *true* labels, the empirical Fisher;
once a network fits its training set those gradients vanish (Kunstner et al. 2019) and an L2M posterior
built on them becomes its prior. With labels drawn from the model's predictive instead, per-example
gradients have mean zero, so ``B`` times the square of a mini-batch's mean gradient is an unbiased
estimate of the diagonal of the (true) Fisher averaged over the examples, which for softmax and Gaussian
likelihoods equals the diagonal of the generalised Gauss-Newton. It vanishes only as the predictive
becomes one-hot.

* :class:`FisherTracker` computes it during training, from the forward the training step already ran:
  ``tracker.update(outputs)`` draws the labels, backpropagates their loss once
  (``torch.autograd.grad`` on the kept graph: no second forward, one extra backward) and accumulates
  ``B g^2`` per parameter, as a running mean or an exponential moving average (``decay``). ``start`` and
  ``every`` choose the steps (the last epoch, say).
* :func:`fisher_diag` computes the same estimate from a partial pass over data after training, for
  models trained without the tracker, and reports when it settled (relative change under 5%).

Either goes into the posterior as its curvature (``L2MPosterior.from_fisher(model, fisher, num_data=N,
prior_precision=...)``): precision ``N F + prior_precision``, sampled by the same op, with the same
predictives, calibration and evidence as the Adam posterior.

Likelihoods: ``"classification"``, logits ``(..., C)`` (every leading position an example with its own
label, e.g. tokens); ``"regression"``, means ``(B, ...)`` under Gaussian noise of standard deviation
``sigma`` (required), per-example loss ``|y - f|^2 / (2 sigma^2)``. Accumulation is in float32 whatever
the parameters' dtype (AMP, bf16). DTensor parameters accumulate their local shards, with no
communication. Under FSDP2 (``fully_shard``) the graph's leaves are the unsharded parameters FSDP2
all-gathered for the forward: the tracker differentiates those (no ``.grad`` is written, so the
training gradients are untouched) and each rank accumulates its own shard's elements from its own
inputs, ``B_rank g_rank^2``, an unbiased estimate on its own (no gather).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .ops.sample import int_or_none
from .optim import ParamFilter, ParamMoment, select_named_parameters
from .sharding import fsdp2_graph_params, has_fsdp2, is_dtensor, local_box, reshard_fsdp

__all__ = ["FisherTracker", "FisherEstimate", "fisher_diag", "fisher_moments", "sampled_label_loss", "LIKELIHOODS"]

LIKELIHOODS = ("classification", "regression")


def sampled_label_loss(
    outputs: Tensor, likelihood: str, sigma: float | None = None, generator: torch.Generator | None = None
) -> tuple[Tensor, int]:
    """The mean negative log-likelihood of labels drawn from the model's own predictive, and the examples.

    Args:
        outputs: classification: (..., C) logits; regression: (B, ...) means.
        likelihood: ``"classification"`` or ``"regression"``.
        sigma: regression noise standard deviation.
        generator: for the label draws (default: the global generator of the outputs' device).

    Returns:
        ``(loss, examples)``: the loss averaged over the examples (its gradient is the mean gradient) and
        the number of examples B.
    """
    if not isinstance(outputs, Tensor):
        raise TypeError(
            f"outputs must be the model's output tensor (logits or means), got {type(outputs).__name__}: pass the "
            "tensor the loss is computed from"
        )
    if likelihood == "classification":
        if outputs.dim() < 2:
            raise ValueError(f"classification outputs must be (..., C) logits, got shape {tuple(outputs.shape)}")
        logits = outputs.reshape(-1, outputs.shape[-1])
        with torch.no_grad():
            probs = torch.softmax(logits.detach().float(), dim=-1)
            labels = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        loss = nn.functional.cross_entropy(logits.float(), labels)
        return loss, logits.shape[0]
    if likelihood == "regression":
        if sigma is None or not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"regression needs the noise standard deviation sigma > 0, got {sigma!r}")
        with torch.no_grad():
            noise = torch.randn(outputs.shape, generator=generator, device=outputs.device, dtype=torch.float32)
            targets = outputs.detach().float() + sigma * noise
        b = outputs.shape[0]
        loss = ((outputs.float() - targets).square().reshape(b, -1).sum(-1) / (2 * sigma**2)).mean()
        return loss, b
    raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (no communication), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _grads(loss: Tensor, params: dict[str, nn.Parameter], retain_graph: bool) -> list[Tensor | None]:
    try:
        return list(torch.autograd.grad(loss, list(params.values()), retain_graph=retain_graph, allow_unused=True))
    except RuntimeError as err:
        if "second time" in str(err) or "freed" in str(err):
            raise RuntimeError(
                "the training graph was already freed: call tracker.update(outputs) before loss.backward(), or "
                "run loss.backward(retain_graph=True) first"
            ) from err
        raise


class FisherTracker:
    """The sampled-label Fisher diagonal, accumulated during training (see the module docstring).

    Args:
        model: the model being trained.
        params: which parameters (names or a predicate ``(name, param) -> bool``); default all that
            require grad.
        likelihood: ``"classification"`` (default) or ``"regression"``.
        sigma: regression noise standard deviation (required for regression).
        decay: None (default) for the running mean over tracked steps, or an EMA factor in (0, 1).
        every: track one step in ``every``. Default 1.
        start: skip the first ``start`` calls of :meth:`update` (track the last epoch: ``start =
            steps_per_epoch * (epochs - 1)``). Default 0.
        seed: seed of the label draws (default None: the global generator).

    Example::

        tracker = l2m_fast.FisherTracker(model, start=steps_per_epoch * (epochs - 1))
        for x, y in loader:
            out = model(x)
            tracker.update(out)                     # before the training backward
            loss_fn(out, y).backward(); opt.step(); opt.zero_grad()
        post = l2m_fast.L2MPosterior.from_fisher(model, tracker, num_data=len(dataset), prior_precision=1.0)
    """

    def __init__(
        self,
        model: nn.Module,
        params: ParamFilter = None,
        likelihood: str = "classification",
        sigma: float | None = None,
        decay: float | None = None,
        every: int = 1,
        start: int = 0,
        seed: int | None = None,
    ) -> None:
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if likelihood == "regression" and (sigma is None or not (math.isfinite(sigma) and sigma > 0)):
            raise ValueError(f"regression needs sigma, the noise standard deviation (> 0), got {sigma!r}")
        if decay is not None and not 0 < decay < 1:
            raise ValueError(f"decay must lie in (0, 1) (or None for the running mean), got {decay!r}")
        checked = {}
        for name, value, low in (("every", every, 1), ("start", start, 0)):
            found = int_or_none(value)
            if found is None or found < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
            checked[name] = found
        every, start = checked["every"], checked["start"]
        fsdp = has_fsdp2(model)
        if fsdp:  # after a forward FSDP2's root holds unsharded tensors as its parameters: read the shards
            reshard_fsdp(model)
            fsdp2_graph_params(model)  # this torch's FSDP2 keeps its parameters where they are read (else raises)
        self.params = {n: p for n, p in select_named_parameters(model, params) if p.requires_grad}
        if not self.params:
            raise ValueError("no parameter to track: the selection is empty or nothing requires grad")
        # FSDP2: the graph's leaves are the unsharded parameters; each rank keeps its shard's rows of them
        self._fsdp_model = model if fsdp else None
        self._boxes: dict[str, tuple[slice, ...]] = {}
        if self._fsdp_model is not None:
            for n, p in self.params.items():
                _, shape, offset = local_box(n, p)
                self._boxes[n] = tuple(slice(o, o + k) for o, k in zip(offset, shape))
        self.likelihood, self.sigma, self.decay = likelihood, sigma, decay
        self.every, self.start = every, start
        self.calls = 0  # update() calls so far
        self.tracked = 0  # steps accumulated
        self.examples = 0  # examples in the tracked steps
        self._sum = {n: torch.zeros_like(_local(p), dtype=torch.float32) for n, p in self.params.items()}
        self._generator: torch.Generator | None = None
        if seed is not None:
            device = next(iter(self.params.values())).device
            self._generator = torch.Generator(device=device if device.type != "meta" else "cpu").manual_seed(seed)

    def due(self) -> bool:
        """Whether the next :meth:`update` call accumulates (``start`` and ``every``)."""
        k = self.calls - self.start
        return k >= 0 and k % self.every == 0

    def update(self, outputs: Tensor) -> bool:
        """Accumulates one step from the outputs of the training forward (its graph must still exist).

        Call it before the training ``loss.backward()`` (the graph is kept for it), or after a
        ``loss.backward(retain_graph=True)``.

        Args:
            outputs: classification (..., C) logits or regression (B, ...) means, with their graph.

        Returns:
            Whether this step was tracked.
        """
        due = self.due()
        self.calls += 1
        if not due:
            return False
        loss, b = sampled_label_loss(outputs, self.likelihood, self.sigma, self._generator)
        leaves = dict(self.params)
        if self._fsdp_model is not None:  # differentiate FSDP2's unsharded parameters, keep this rank's rows
            graph = fsdp2_graph_params(self._fsdp_model)
            leaves = {n: graph.get(id(p), p) for n, p in self.params.items()}
            mixed = [n for n, t in leaves.items() if t is not self.params[n] and is_dtensor(t)]
            if mixed:
                raise NotImplementedError(
                    f"parameters {mixed[:3]} stay DTensors after FSDP2's all-gather (FSDP2 combined with tensor "
                    "parallelism): the tracker supports FSDP2 alone; track the Fisher on an FSDP2-only copy"
                )
        grads = _grads(loss, leaves, retain_graph=True)
        if all(g is None for g in grads):
            raise RuntimeError(
                "no tracked parameter took part in the forward that produced these outputs: were the model's "
                "parameters replaced after the tracker was made (load_state_dict(assign=True), fully_shard, "
                ".to())? Make the tracker after the model is in its final form"
            )
        self.tracked += 1
        self.examples += b
        for (n, p), g in zip(self.params.items(), grads):
            if g is None:  # the parameter did not take part in this forward: its gradient is zero
                g = torch.zeros_like(self._sum[n])
            elif leaves[n] is not p:  # an unsharded FSDP2 parameter's gradient: this rank's shard of it
                g = g[self._boxes[n]]
            contrib = _local(g.detach()).float().square_().mul_(b)
            if self.decay is None:
                self._sum[n].add_(contrib)
            else:
                self._sum[n].mul_(self.decay).add_(contrib, alpha=1.0 - self.decay)
        return True

    def fisher(self) -> dict[str, Tensor]:
        """name -> the per-example Fisher diagonal estimate (float32, the parameter's local shape).

        Raises:
            RuntimeError: nothing was tracked yet.
        """
        if not self.tracked:
            raise RuntimeError(
                f"the tracker has accumulated no step yet ({self.calls} update() calls, start={self.start}, "
                f"every={self.every}): call update(outputs) in the training steps"
            )
        if self.decay is None:
            return {n: s / self.tracked for n, s in self._sum.items()}
        correction = 1.0 - self.decay**self.tracked  # the EMA started at zero
        return {n: s / correction for n, s in self._sum.items()}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume tracking (tensors and numbers)."""
        return {
            "sum": {n: s.clone() for n, s in self._sum.items()},
            "calls": self.calls,
            "tracked": self.tracked,
            "examples": self.examples,
            "likelihood": self.likelihood,
            "sigma": self.sigma,
            "decay": self.decay,
            "every": self.every,
            "start": self.start,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resumes from :meth:`state_dict` (the tracked parameters and settings must match)."""
        sums = state.get("sum")
        if not isinstance(sums, Mapping) or set(sums) != set(self._sum):
            raise ValueError(
                f"the state tracks {sorted(sums)[:4] if isinstance(sums, Mapping) else sums!r}, this tracker "
                f"{sorted(self._sum)[:4]}: build the tracker over the same parameters"
            )
        for key in ("likelihood", "sigma", "decay", "every", "start"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"the state has {key}={state.get(key)!r}, this tracker {getattr(self, key)!r}")
        for n, s in sums.items():
            if tuple(s.shape) != tuple(self._sum[n].shape):
                raise ValueError(f"state sum {n!r} has shape {tuple(s.shape)}, the tracker {tuple(self._sum[n].shape)}")
            self._sum[n].copy_(s)
        self.calls, self.tracked = int(state["calls"]), int(state["tracked"])
        self.examples = int(state.get("examples", 0))


@dataclass
class FisherEstimate:
    """:func:`fisher_diag`'s result.

    Attributes:
        fisher: name -> per-example Fisher diagonal estimate (float32).
        batches: batches used.
        examples: examples used.
        settled_after: the first batch after which the relative change of the estimate stayed under
            ``tol`` (None if it never did within the batches used).
        changes: relative change after each batch (``|F_k - F_{k-1}|_1 / |F_k|_1``).
        seconds: wall time.
        tol: the relative change that counts as settled.
    """

    fisher: dict[str, Tensor]
    batches: int
    examples: int
    settled_after: int | None
    changes: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tol: float = 0.05

    def settling(self) -> str:
        """Whether and when the estimate settled, in words (for reports)."""
        if self.settled_after is not None:
            return f"relative change under {self.tol * 100:g}% from batch {self.settled_after} of {self.batches}"
        last = f"; last change {self.changes[-1]:.1%}" if self.changes else ""
        return f"not settled (relative change under {self.tol * 100:g}%) within {self.batches} batches{last}"

    def __getitem__(self, name: str) -> Tensor:
        return self.fisher[name]


def fisher_diag(
    model: nn.Module,
    batches: Iterable[Any],
    likelihood: str = "classification",
    *,
    params: ParamFilter = None,
    sigma: float | None = None,
    max_batches: int | None = None,
    tol: float = 0.05,
    seed: int = 0,
    forward: Any = None,
) -> FisherEstimate:
    """The sampled-label Fisher diagonal from a (partial) pass over data after training.

    Args:
        model: the trained model (evaluated in its current train/eval mode; use ``model.eval()``).
        batches: an iterable of inputs, or of ``(inputs, ...)`` tuples whose first item is the input
            (labels, if present, are not used: labels are sampled from the model).
        likelihood: ``"classification"`` (default) or ``"regression"``.
        params: which parameters (default all that require grad).
        sigma: regression noise standard deviation.
        max_batches: stop after this many batches (default: the whole iterable).
        tol: the relative change that counts as settled. Default 0.05.
        seed: seed of the label draws.
        forward: ``forward(model, batch) -> outputs`` for models whose inputs are not ``batch[0]``.

    Returns:
        The estimate and when it settled.
    """
    import time

    t0 = time.perf_counter()
    tracker = FisherTracker(model, params, likelihood, sigma, seed=seed)
    prev: dict[str, Tensor] | None = None
    changes: list[float] = []
    settled = None
    for k, batch in enumerate(batches):
        if max_batches is not None and k >= max_batches:
            break
        with torch.enable_grad():
            if forward is not None:
                out = forward(model, batch)
            else:
                out = model(batch[0] if isinstance(batch, (tuple, list)) else batch)
            tracker.update(out)
        del out
        cur = tracker.fisher()
        if prev is not None:
            num = sum(float((cur[n] - prev[n]).abs().sum()) for n in cur)
            den = sum(float(cur[n].abs().sum()) for n in cur) or 1.0
            changes.append(num / den)
            settled = (settled or k + 1) if changes[-1] < tol else None  # stays under tol from then on
        prev = {n: t.clone() for n, t in cur.items()}
    if tracker.tracked == 0:
        raise ValueError("no batch was given: fisher_diag needs at least one batch")
    return FisherEstimate(
        tracker.fisher(), tracker.tracked, tracker.examples, settled, changes, time.perf_counter() - t0, tol
    )


def fisher_moments(
    model: nn.Module, fisher: FisherTracker | FisherEstimate | Mapping[str, Tensor]
) -> tuple[list[ParamMoment], list[tuple[str, str]]]:
    """A Fisher diagonal as the posterior's moments (``v = F``, no correction, one group), in the model's order.

    Args:
        model: the model.
        fisher: a tracker, an estimate or a mapping name -> per-example Fisher diagonal (the parameter's
            shape, or its local shard's for a sharded parameter).

    Returns:
        The moments, and ``(name, reason)`` for the parameters without a Fisher (kept at the MAP).
    """
    if isinstance(fisher, FisherTracker):
        diag = fisher.fisher()
    elif isinstance(fisher, FisherEstimate):
        diag = fisher.fisher
    elif isinstance(fisher, Mapping):
        diag = dict(fisher)
    else:
        raise TypeError(f"fisher must be a FisherTracker, a FisherEstimate or a mapping, got {type(fisher).__name__}")
    named = dict(model.named_parameters())
    unknown = [n for n in diag if n not in named]
    if unknown:
        raise KeyError(f"the Fisher names {unknown[:4]}, which are not parameters of the model")
    moments = []
    for name, p in named.items():
        if name not in diag:
            continue
        f = diag[name].detach().float()
        if is_dtensor(p) and not is_dtensor(f):  # a tracker's local shard: give it the parameter's placements
            from torch.distributed.tensor import DTensor

            f = DTensor.from_local(f, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
        moments.append(ParamMoment(name, f, 1.0, 0.0, 0, {}))
    return moments, [(n, "no Fisher given") for n in named if n not in diag]
