"""Second moments out of ``torch.optim`` state, from a live optimizer or its ``state_dict``.

Each supported optimizer keeps a running estimate of the squared gradient. We read it as it is
stored and describe its correction as ``v_hat = scale * v + shift`` (:mod:`l2m_fast.modes`), so the
sampler can fold the correction into its per-segment ``(a, b)`` and never copy ``v`` twice:

========================  =============  ==========================================================
optimizer                 state key      correction
========================  =============  ==========================================================
Adam, AdamW, NAdam, RAdam ``exp_avg_sq`` ``v / (1 - beta2^step)`` (bias correction of the EMA)
RMSprop                   ``square_avg`` ``v / (1 - alpha^step)`` (the same EMA, started at zero)
Adadelta                  ``square_avg`` ``v / (1 - rho^step)``
Adagrad                   ``sum``        ``(v - initial_accumulator_value) / step`` (mean over steps)
========================  =============  ==========================================================

With ``amsgrad=True`` Adam also keeps ``max_exp_avg_sq``, the running maximum of the EMA over all of
training. We use ``exp_avg_sq``: it estimates the squared gradient *at the end of training*, near the
mode the Laplace approximation is built around, while the maximum remembers the large gradients of
the first steps and would make the posterior overconfident. Foreach, fused and capturable variants
keep the same keys; a ``step`` stored as a tensor is read as a number.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "ParamMoment",
    "SUPPORTED_OPTIMIZERS",
    "optimizer_kind",
    "moments_from_optimizer",
    "moments_from_state_dict",
    "select_named_parameters",
]

_ADAM = "adam"
_RMSPROP = "rmsprop"
_ADAGRAD = "adagrad"
_ADADELTA = "adadelta"

# class name -> family; the families fix the state key and the correction.
SUPPORTED_OPTIMIZERS: dict[str, str] = {
    "Adam": _ADAM,
    "AdamW": _ADAM,
    "NAdam": _ADAM,
    "RAdam": _ADAM,
    "RMSprop": _RMSPROP,
    "Adagrad": _ADAGRAD,
    "Adadelta": _ADADELTA,
}
_STATE_KEY = {_ADAM: "exp_avg_sq", _RMSPROP: "square_avg", _ADAGRAD: "sum", _ADADELTA: "square_avg"}

_HOW_TO_PASS_V = (
    "supported: " + ", ".join(SUPPORTED_OPTIMIZERS) + " (and their subclasses). For another optimizer, "
    "pass the second moments directly: L2MPosterior(params, second_moments, a=..., b=...)"
)

ParamFilter = Sequence[str] | Callable[[str, nn.Parameter], bool] | None


@dataclass
class ParamMoment:
    """The second moment of one parameter as the optimizer stores it.

    Attributes:
        name: the parameter's name in the model.
        v: the stored moment, the parameter's shape (not copied).
        scale, shift: ``v_hat = scale * v + shift``, the corrected second moment.
        group: index of the optimizer's parameter group.
        hyper: the group's hyperparameters (``weight_decay``, ``eps``, ...).
    """

    name: str
    v: Tensor
    scale: float
    shift: float
    group: int
    hyper: Mapping[str, object]


def optimizer_kind(optimizer: torch.optim.Optimizer | type) -> str:
    """The family (``"adam"``, ``"rmsprop"``, ``"adagrad"``, ``"adadelta"``) of a supported optimizer.

    Raises:
        TypeError: for an optimizer without a second moment, with the supported list.
    """
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    for base in cls.__mro__:
        if base.__module__.startswith("torch.optim") and base.__name__ in SUPPORTED_OPTIMIZERS:
            return SUPPORTED_OPTIMIZERS[base.__name__]
    raise TypeError(f"{cls.__name__} keeps no gradient second moment L2M can use; {_HOW_TO_PASS_V}")


def _kind_from_state_dict(groups: Sequence[Mapping], states: Mapping[object, Mapping]) -> str:
    """Infers the family from the state keys (first) and the group hyperparameters."""
    keys = set().union(*(st.keys() for st in states.values())) if states else set()
    hyper = set(groups[0]) if groups else set()
    if "exp_avg_sq" in keys or ("betas" in hyper and not keys and "amsgrad" in hyper):
        return _ADAM
    if "sum" in keys or "lr_decay" in hyper:
        return _ADAGRAD
    if "square_avg" in keys or "rho" in hyper or "alpha" in hyper:
        return _ADADELTA if "rho" in hyper else _RMSPROP
    raise TypeError(
        f"this state_dict keeps no second moment L2M can use (state keys {sorted(keys)}, group keys "
        f"{sorted(hyper - {'params', 'param_names'})}); if it is from a supported optimizer, pass "
        f"optimizer=<its class>; {_HOW_TO_PASS_V}"
    )


def _as_number(x: object) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)  # type: ignore[arg-type]


def _correction(kind: str, state: Mapping[str, object], group: Mapping[str, object]) -> tuple[float, float]:
    step = _as_number(state.get("step", 0))
    if kind == _ADAGRAD:
        init = float(group.get("initial_accumulator_value", 0.0))  # type: ignore[arg-type]
        return 1.0 / step, -init / step
    if kind == _ADAM:
        decay = float(group["betas"][1])  # type: ignore[index]
    elif kind == _RMSPROP:
        decay = float(group["alpha"])  # type: ignore[arg-type]
    else:
        decay = float(group["rho"])  # type: ignore[arg-type]
    if not 1.0 - decay**step > 0:
        raise ValueError(
            f"a decay rate of {decay} leaves the moving average without a bias correction (1 - {decay}^step = 0): "
            "this optimizer's second moment is not an average of squared gradients; pass the second moments "
            "directly: L2MPosterior(params, second_moments, a=..., b=...)"
        )
    return 1.0 / (1.0 - decay**step), 0.0


def _selected(name: str, param: nn.Parameter, params: ParamFilter) -> bool:
    if params is None:
        return True
    if callable(params):
        return bool(params(name, param))
    return name in params


def _check_filter_names(model: nn.Module, params: ParamFilter) -> None:
    if params is None or callable(params):
        return
    if isinstance(params, str):
        raise TypeError("params must be a sequence of names or a predicate, not one string: use [name]")
    known = {n for n, _ in model.named_parameters()}
    unknown = [n for n in params if n not in known]
    if unknown:
        raise KeyError(f"params names {unknown} are not parameters of the model; known: {sorted(known)[:10]}")


def select_named_parameters(model: nn.Module, params: ParamFilter = None) -> list[tuple[str, nn.Parameter]]:
    """The model's ``(name, parameter)`` pairs a selection picks, in the model's order.

    Args:
        model: the model.
        params: None (all), a list of names, or a predicate ``(name, param) -> bool``.

    Raises:
        TypeError: one string instead of a list. KeyError: names that are not parameters of the model.
    """
    _check_filter_names(model, params)
    return [(n, p) for n, p in model.named_parameters() if _selected(n, p, params)]


def _moment(
    kind: str, name: str, param_shape: torch.Size, state: Mapping[str, object] | None, group: Mapping, gi: int
) -> ParamMoment | None:
    key = _STATE_KEY[kind]
    if not state or key not in state or _as_number(state.get("step", 0)) <= 0:
        return None
    v = state[key]
    if not isinstance(v, Tensor) or tuple(v.shape) != tuple(param_shape):
        got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(
            f"parameter {name!r}: optimizer state {key!r} has shape {got} but the parameter has "
            f"{tuple(param_shape)}; the state_dict does not belong to this model (or pass param_names=...)"
        )
    scale, shift = _correction(kind, state, group)
    hyper = {k: val for k, val in group.items() if k not in ("params", "param_names")}
    return ParamMoment(name, v, scale, shift, gi, hyper)


def _missing_error(name: str) -> ValueError:
    return ValueError(
        f"parameter {name!r} has no optimizer state yet (it was never updated by optimizer.step()): "
        "train first, exclude it with params=..., or pass missing='skip' to keep it at the MAP"
    )


def _collect(
    entries: Iterable[tuple[str, nn.Parameter, Mapping[str, object] | None, Mapping, int]],
    kind: str,
    params: ParamFilter,
    missing: str,
) -> tuple[list[ParamMoment], list[tuple[str, str]]]:
    if missing not in ("raise", "skip"):
        raise ValueError(f"missing must be 'raise' or 'skip', got {missing!r}")
    moments, kept = [], []
    for name, param, state, group, gi in entries:
        if not _selected(name, param, params):
            continue
        m = _moment(kind, name, param.shape, state, group, gi)
        if m is None:
            if missing == "raise":
                raise _missing_error(name)
            kept.append((name, "no optimizer state"))
            continue
        moments.append(m)
    return moments, kept


def _not_in_optimizer(model: nn.Module, covered: set[str], params: ParamFilter) -> list[tuple[str, str]]:
    out = []
    for name, p in model.named_parameters():
        if name in covered or not _selected(name, p, params):
            continue
        if params is not None and not callable(params):
            raise ValueError(f"parameter {name!r} was asked for in params but the optimizer does not hold it")
        out.append((name, "not in the optimizer"))
    return out


def moments_from_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, params: ParamFilter = None, missing: str = "raise"
) -> tuple[list[ParamMoment], list[tuple[str, str]]]:
    """Reads the second moment of each selected parameter from a live optimizer.

    Args:
        model: the trained model; names come from ``model.named_parameters()``.
        optimizer: a supported ``torch.optim`` optimizer over (some of) the model's parameters.
        params: which parameters: a list of names, a predicate ``(name, param) -> bool``, or None (all).
        missing: ``"raise"`` (default) on a parameter with no state yet, or ``"skip"`` to leave it out.

    Returns:
        The moments in the model's parameter order, and ``(name, reason)`` for each selected parameter
        left out (kept at the MAP).
    """
    kind = optimizer_kind(optimizer)
    _check_filter_names(model, params)
    where: dict[int, tuple[int, Mapping]] = {}
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            where[id(p)] = (gi, group)
    model_ids = {id(p) for _, p in model.named_parameters()}
    foreign = [i for i, g in enumerate(optimizer.param_groups) for p in g["params"] if id(p) not in model_ids]
    if foreign:
        raise ValueError(
            f"the optimizer holds parameters that are not in the model (groups {sorted(set(foreign))}): "
            "pass the model the optimizer was built for"
        )
    entries = []
    for name, p in model.named_parameters():
        if id(p) in where:
            gi, group = where[id(p)]
            entries.append((name, p, optimizer.state.get(p), group, gi))
    moments, kept = _collect(entries, kind, params, missing)
    covered = {n for n, *_ in entries}
    return moments, kept + _not_in_optimizer(model, covered, params)


def moments_from_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, object],
    optimizer: type | None = None,
    param_names: Sequence[str] | None = None,
    params: ParamFilter = None,
    missing: str = "raise",
) -> tuple[list[ParamMoment], list[tuple[str, str]]]:
    """Reads second moments from an optimizer ``state_dict`` (a checkpoint) and the model.

    The state_dict numbers parameters ``0..n-1`` in the order of its parameter groups. They are matched
    to model names by, in this order: ``param_names`` if given; the groups' own ``param_names`` (written
    when the optimizer was built from ``model.named_parameters()``); the state's own keys when they
    are parameter names (``get_optimizer_state_dict`` of ``torch.distributed.checkpoint``); else the model's trainable
    parameters in ``named_parameters()`` order, which is right when the optimizer was built from
    ``model.parameters()``. Counts and shapes are checked either way.

    Args:
        model: the model the checkpoint was trained with.
        state_dict: ``optimizer.state_dict()``.
        optimizer: the optimizer class, when its groups do not tell (inferred otherwise).
        param_names: model names of the state_dict's parameters, in its order.
        params: which parameters (see :func:`moments_from_optimizer`).
        missing: ``"raise"`` or ``"skip"`` for parameters without state.

    Returns:
        As :func:`moments_from_optimizer`.
    """
    if not isinstance(state_dict, Mapping) or "param_groups" not in state_dict or "state" not in state_dict:
        raise ValueError("state_dict must be an optimizer state_dict with 'state' and 'param_groups' keys")
    groups = state_dict["param_groups"]
    # a state_dict that went through JSON or YAML keeps its integer ids as strings
    states = {int(k) if isinstance(k, str) and k.isdigit() else k: st for k, st in state_dict["state"].items()}
    kind = optimizer_kind(optimizer) if optimizer is not None else _kind_from_state_dict(groups, states)
    _check_filter_names(model, params)
    as_id = lambda pid: int(pid) if isinstance(pid, str) and pid.isdigit() else pid  # noqa: E731
    ids = [(as_id(pid), gi) for gi, g in enumerate(groups) for pid in g["params"]]
    named = dict(model.named_parameters())
    if param_names is None and ids and all(isinstance(pid, str) and pid in named for pid, _ in ids):
        param_names = [pid for pid, _ in ids]  # keyed by name (torch.distributed.checkpoint.state_dict)
        source = "the state_dict's parameter names"
    elif param_names is None and all("param_names" in g for g in groups):
        param_names = [n for g in groups for n in g["param_names"]]
        source = "the state_dict's param_names"
    elif param_names is None:
        if len(groups) > 1:
            raise ValueError(
                f"the state_dict has {len(groups)} parameter groups and no parameter names, so which model "
                "parameter each entry belongs to cannot be told (groups need not follow the model's order): "
                "pass param_names=[...] naming them in the optimizer's order (the groups' params, concatenated), "
                "or build the optimizer from model.named_parameters() so that its state_dict records the names"
            )
        param_names = [n for n, p in model.named_parameters() if p.requires_grad]
        source = "the model's trainable parameters in order"
    else:
        param_names = list(param_names)
        source = "param_names"
    if len(param_names) != len(ids):
        raise ValueError(
            f"the state_dict holds {len(ids)} parameters but {source} gives {len(param_names)}: "
            "pass param_names=[...] naming the model parameter of each state_dict entry in order"
        )
    repeated = sorted({n for n in param_names if param_names.count(n) > 1})
    if repeated:
        raise ValueError(
            f"{source} names {repeated[:5]} more than once: each state_dict entry belongs to a different parameter; "
            "pass param_names=[...] with every name once, in the optimizer's order"
        )
    unknown = [n for n in param_names if n not in named]
    if unknown:
        raise KeyError(
            f"{source} names {unknown[:5]} that are not parameters of the model (a wrapper's prefix such as "
            "'module.' or '_orig_mod.'?): pass param_names=[...] with the model's own names"
        )
    by_name = {n: (pid, gi) for n, (pid, gi) in zip(param_names, ids)}
    entries = []
    for name, p in model.named_parameters():
        if name in by_name:
            pid, gi = by_name[name]
            entries.append((name, p, states.get(pid), groups[gi], gi))
    moments, kept = _collect(entries, kind, params, missing)
    return moments, kept + _not_in_optimizer(model, set(by_name), params)
