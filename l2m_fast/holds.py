"""Who holds a model's parameters: one stack of frames per parameter, and the thread that owns them.

Every in-place use of a model's parameters (an in-place sample, a binding to a predictive's sample rows)
is a :class:`Frame`: what each parameter held when the frame began, and how to put it back. Frames are
kept on a stack per parameter. :func:`pop` ends a frame whatever the order: the innermost one puts back
what it saved; any other hands what it saved to the frame above it, which will put that back instead,
so the originals return when the last frame ends. :func:`require_innermost` refuses to let a frame that
is no longer innermost change its parameters (:class:`InPlaceOrderError`).

A held parameter (or model) belongs to one thread: another thread that tries to push a frame on it, or
to :func:`claim` it, gets :class:`ModelInUseError` before anything is changed. :func:`held_parameters`
holds a model and then its covered parameters for the length of a block (a predictive).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:
    from .posterior import L2MPosterior

__all__ = [
    "InPlaceOrderError",
    "ModelInUseError",
    "Frame",
    "push",
    "pop",
    "require_innermost",
    "claim",
    "held_parameters",
]


class InPlaceOrderError(RuntimeError):
    """A context wrote a sample while a context entered after it still holds the same parameters."""


class ModelInUseError(RuntimeError):
    """Another thread holds the parameters (an in-place context or a predictive is using them)."""


# ------------------------------------------------------------------------------ frames, stacks, owners


class Frame:
    """One context's hold on some parameters: what each held before, and how to put it back.

    Args:
        params: name -> parameter.
        capture: what to save of a parameter before the frame changes it.
        put_back: restores a parameter from what was saved.
        before_restore: called once before the frame restores anything (FSDP2: reshard).
        anchor: the model, held (for this thread) while the frame is active, not changed.
    """

    def __init__(
        self,
        params: Mapping[str, nn.Parameter],
        capture: Callable[[nn.Parameter], Tensor],
        put_back: Callable[[nn.Parameter, Tensor], None],
        before_restore: Callable[[], None] | None = None,
        anchor: nn.Module | None = None,
    ) -> None:
        self.params = dict(params)
        self.anchor = anchor
        self.capture = capture
        self.put_back = put_back
        self.before_restore = before_restore
        self.saved: dict[int, Tensor] = {}
        self.active = False
        self.checked = -1  # the value of _GENERATION when this frame was last found innermost


class _Holds:
    """Frames and claims on one parameter (or model), and the thread they belong to."""

    __slots__ = ("frames", "claims", "owner", "obj")

    def __init__(self, obj: object) -> None:
        self.frames: list[Frame] = []
        self.claims = 0
        self.owner: int | None = None
        self.obj = obj


_LOCK = threading.RLock()
_HOLDS: dict[int, _Holds] = {}  # id(parameter or model) -> its holds, present only while held
_GENERATION = 0  # bumped by every push and pop: a frame found innermost stays so until it changes


def _acquire(params: Iterable[tuple[str, object]], me: int) -> list[_Holds]:
    """The holds of each parameter (or model), all owned by thread ``me`` (raises before changing anything)."""
    found = []
    for name, p in params:
        h = _HOLDS.get(id(p))
        if h is not None and h.owner not in (None, me):
            what = f"parameter {name!r}" if isinstance(p, Tensor) else f"the model ({type(p).__name__})"
            raise ModelInUseError(
                f"{what} is held by another thread (an in-place sample or a predictive is using it): "
                "use one model per thread (copy.deepcopy(model)), or serialise the calls with a lock"
            )
        found.append(h)
    out = []
    for (_, p), h in zip(params, found):
        if h is None:
            h = _HOLDS[id(p)] = _Holds(p)
        h.owner = me
        out.append(h)
    return out


def _release(h: _Holds) -> None:
    if not h.frames and not h.claims:
        h.owner = None
        _HOLDS.pop(id(h.obj), None)


def _anchored(frame: Frame) -> list[tuple[str, object]]:
    return [] if frame.anchor is None else [("model", frame.anchor)]


def push(frame: Frame) -> None:
    global _GENERATION
    with _LOCK:
        _GENERATION += 1
        me = threading.get_ident()
        anchor = _acquire(_anchored(frame), me)
        holds = _acquire(list(frame.params.items()), me)
        for h in anchor:
            h.claims += 1
        for (_, p), h in zip(frame.params.items(), holds):
            frame.saved[id(p)] = frame.capture(p)
            h.frames.append(frame)
        frame.active = True


def require_innermost(frame: Frame) -> None:
    if frame.checked == _GENERATION:  # nothing entered or left since the last check (the per-sample hot path)
        return
    with _LOCK:
        frame.checked = _GENERATION
        for name, p in frame.params.items():
            h = _HOLDS[id(p)]
            if h.frames[-1] is not frame:
                frame.checked = -1
                raise InPlaceOrderError(
                    f"parameter {name!r} holds a sample of an in-place context entered after this one (a sampled() "
                    "block or another iterator over the same model): leave or close that one before drawing here; "
                    "the weights are restored whatever the order of exits"
                )


def pop(frame: Frame) -> None:
    """Ends a frame: an innermost frame restores what it saved, another hands it to the frame above."""
    global _GENERATION
    with _LOCK:
        if not frame.active:
            return
        _GENERATION += 1
        frame.active = False
        if frame.before_restore is not None and any(_HOLDS[id(p)].frames[-1] is frame for p in frame.params.values()):
            frame.before_restore()
        saved_all, put_back = frame.saved, frame.put_back
        for p in frame.params.values():
            key = id(p)
            h = _HOLDS[key]
            frames = h.frames
            saved = saved_all.pop(key)
            if frames[-1] is frame:  # the innermost frame (the usual case): put back what we found
                put_back(p, saved)
                frames.pop()
            else:  # the frame above replaced what we bound: it must put back what we found
                i = next(k for k, f in enumerate(frames) if f is frame)
                frames[i + 1].saved[key] = saved
                del frames[i]
            if not frames and not h.claims:  # _release, inlined on this per-parameter path
                h.owner = None
                del _HOLDS[key]
        for _, obj in _anchored(frame):
            h = _HOLDS[id(obj)]
            h.claims -= 1
            _release(h)


@contextlib.contextmanager
def claim(params: Mapping[str, object]) -> Iterator[None]:
    """Holds parameters (or a model) for this thread without changing them.

    Raises:
        ModelInUseError: another thread holds one of them.
    """
    me = threading.get_ident()
    with _LOCK:
        holds = _acquire(list(params.items()), me)
        for h in holds:
            h.claims += 1
    try:
        yield
    finally:
        with _LOCK:
            for h in holds:
                h.claims -= 1
                _release(h)


@contextlib.contextmanager
def held_parameters(posterior: L2MPosterior, model: nn.Module) -> Iterator[dict[str, nn.Parameter]]:
    """The model's covered parameters, model and parameters held for this thread while the block runs.

    The model is held *before* its parameters are read: while another thread's batched predictive runs,
    ``functional_call`` has put other tensors in the model's attributes, and reading them then would pick
    those up instead of the parameters.

    Raises:
        ModelInUseError: another thread holds the model or one of its parameters.
    """
    with claim({"model": model}):
        params = posterior.parameters_of(model)
        with claim(params):
            yield params
