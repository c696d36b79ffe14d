"""Posterior samples in a model's live parameters, one sampler call each, restored exactly whatever happens.

**Binding, not copying.** For the duration of a context each covered parameter's ``.data`` is pointed
at a view of one flat work buffer. The sampler writes a whole sample into that buffer in one call
(:meth:`L2MPosterior.sample_into`), so a sample reaches the live parameters with one kernel launch and no
per-tensor copies. The original tensors are never written: restoring is pointing ``.data`` back at them,
bit-for-bit exact by construction. The ``nn.Parameter`` objects keep their identity (an optimizer or a
hook holding them still sees them); only their storage changes while bound, and anything written into
them meanwhile (an optimizer step, say) is discarded at restore. The work buffer is kept per posterior
and reused by the next context, so a context allocates nothing after the first. Code that caches a
parameter's *storage* rather than the parameter (``torch.compile`` graphs specialised on data pointers)
does not see the sample; ordinary ``nn.Module`` forwards do.

**Sharded parameters** (FSDP2 / DTensor, ``post.is_sharded``) cannot be rebound: FSDP2 all-gathers from
its own copy of each shard. There the sample is *copied* into each rank's local shards (FSDP2 modules
resharded first) and the shards are copied back from a backup on exit. Every rank must enter the same
contexts and run the same forwards (the forward communicates; nothing here does).

**Any order of exits.** Each context is a *frame* on a stack kept per parameter: it records what the
parameter held when it was entered (the originals, or an outer context's sample). A context that exits
out of order (an iterator closed inside a later ``sampled()`` block, two iterators zipped together) hands
what it saved to the context above it, so when the last one exits the originals are back, never a stale
sample. Writing a new sample from a context that is not the innermost one for its parameters would put
values under another context's feet; it raises :class:`InPlaceOrderError` instead (the weights are still
restored on exit).

**Threads.** A model's parameters belong to one thread while any in-place context or predictive uses
them: another thread that tries raises :class:`ModelInUseError` (nothing is changed, nothing is lost).
Use one model per thread (``copy.deepcopy``) to sample from several threads at once.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .holds import Frame, claim, pop, push, require_innermost
from .ops.sample import OUTPUT_DTYPES, as_int
from .sharding import local_box, reshard_fsdp

if TYPE_CHECKING:
    from .posterior import L2MPosterior

__all__ = [
    "ParamBinding",
    "SampleWriter",
    "SampleIterator",
    "sampled",
    "free_work_buffers",
]


# ------------------------------------------------------------------------------------------- binding


def _data(p: nn.Parameter) -> Tensor:
    return p.data


def _set_data(p: nn.Parameter, t: Tensor) -> None:
    p.data = t


class ParamBinding:
    """Points the ``.data`` of some parameters at other tensors; :meth:`restore` points them back.

    Args:
        params: name -> the live parameter.

    The first :meth:`bind` enters the binding (a frame on the parameters' stacks, see the module doc);
    later binds rebind while it is the innermost. Use as a context manager: the originals are restored
    on exit, on exceptions too, whatever the order in which nested bindings end.
    """

    def __init__(self, params: Mapping[str, nn.Parameter]) -> None:
        self.params = dict(params)
        self._frame = Frame(self.params, _data, _set_data)

    def bind(self, tensors: Mapping[str, Tensor]) -> None:
        """Points each parameter at ``tensors[name]`` (same shape, dtype and device; views are kept, not copied)."""
        for n, p in self.params.items():
            t = tensors[n]
            if t.shape != p.shape or t.dtype != p.dtype or t.device != p.device:
                raise ValueError(
                    f"cannot bind {n!r} ({tuple(p.shape)}, {p.dtype}, {p.device}) to a tensor "
                    f"({tuple(t.shape)}, {t.dtype}, {t.device})"
                )
        if self._frame.active:
            require_innermost(self._frame)
        else:
            push(self._frame)
        for n, p in self.params.items():
            p.data = tensors[n]

    def restore(self) -> None:
        """Ends the binding: the parameters get back what they held before it (see the module doc)."""
        pop(self._frame)

    @property
    def bound(self) -> bool:
        return self._frame.active

    def __enter__(self) -> ParamBinding:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


# ------------------------------------------------------------------------------------- work buffers

_Work = tuple[list[Tensor], dict[str, Tensor]]  # work buffers, and each covered parameter's view of them
_WORK_LOCK = threading.Lock()
_WORK: weakref.WeakKeyDictionary[L2MPosterior, dict[tuple, list[_Work]]] = weakref.WeakKeyDictionary()


def _take_buffers(posterior: L2MPosterior, key: tuple, make: Callable[[], _Work]) -> _Work:
    """A free set of work buffers of this posterior for this layout key (allocated on first use only), with
    the parameters' views of them (made once with the buffers, not sliced again per context)."""
    with _WORK_LOCK:
        pool = _WORK.setdefault(posterior, {}).setdefault(key, [])
        if pool:
            return pool.pop()
    return make()


def _give_back(posterior: L2MPosterior, key: tuple, buffers: _Work) -> None:
    with _WORK_LOCK:
        pool = _WORK.setdefault(posterior, {}).setdefault(key, [])
        if not pool:  # keep one set: nested contexts of one posterior are rare, their extra buffers are freed
            pool.append(buffers)


def free_work_buffers(posterior: L2MPosterior) -> None:
    """Frees the work buffers kept for ``posterior``'s in-place contexts (one copy of its parameters)."""
    with _WORK_LOCK:
        _WORK.pop(posterior, None)


# ------------------------------------------------------------------------------------------ writers


class SampleWriter:
    """Writes single posterior samples straight into a model's live parameters.

    Not sharded: covered parameters are grouped into runs of consecutive slots with one dtype; each run
    has one work buffer the parameters are bound to and one sampler call per sample. A model with one
    parameter dtype (the usual case) is one buffer and one launch per sample. Float32, bfloat16 and
    float16 parameters are written by the sampler directly; other dtypes (float64) go through a float32
    scratch row. Sharded: the sample row is drawn into a work buffer and copied into the local shards.

    Args:
        posterior: the posterior.
        model: the model whose parameters receive the samples (checked by ``posterior.parameters_of``).
    """

    def __init__(self, posterior: L2MPosterior, model: nn.Module) -> None:
        self.posterior = posterior
        self.model = model
        self.sharded = posterior.is_sharded
        with claim({"model": model}):  # read the parameters while no other thread has swapped them out
            if self.sharded:
                reshard_fsdp(model)  # after a forward under no_grad an FSDP2 root holds unsharded plain tensors
            self.params = posterior.parameters_of(model)
        self._work: _Work | None = None  # the work buffers and the parameters' views of them, while entered
        if self.sharded:
            self._runs = [(0, posterior.num_params, torch.float32)]
            self._frame = Frame(self.params, self._backup, self._copy_back, lambda: reshard_fsdp(model), model)
        else:
            self._runs = self._dtype_runs()
            self._frame = Frame(self.params, _data, _set_data, anchor=model)
        self._key = (posterior.device, tuple(self._runs))

    def _dtype_runs(self) -> list[tuple[int, int, torch.dtype]]:
        runs: list[tuple[int, int, torch.dtype]] = []
        for slot in self.posterior.layout:
            dt = self.params[slot.name].dtype
            if runs and runs[-1][2] == dt:
                runs[-1] = (runs[-1][0], slot.stop, dt)
            else:
                runs.append((slot.offset, slot.stop, dt))
        return runs

    def _local(self, p: nn.Parameter, name: str = "") -> Tensor:
        return local_box(name, p)[0]

    def _backup(self, p: nn.Parameter) -> Tensor:
        return self._local(p).detach().clone()

    def _copy_back(self, p: nn.Parameter, saved: Tensor) -> None:
        with torch.no_grad():
            self._local(p).copy_(saved)

    @property
    def _buffers(self) -> list[Tensor] | None:
        """The work buffers, one per dtype run, while the context is entered."""
        return None if self._work is None else self._work[0]

    def _make_buffers(self) -> _Work:
        dev = self.posterior.device
        buffers = [torch.zeros(stop - start, dtype=dt, device=dev) for start, stop, dt in self._runs]
        views: dict[str, Tensor] = {}
        if not self.sharded:
            for (start, stop, _), buf in zip(self._runs, buffers):
                for slot in self.posterior.layout:
                    if start <= slot.offset and slot.stop <= stop:
                        views[slot.name] = buf[slot.offset - start : slot.stop - start].view(slot.shape)
        return buffers, views

    def _enter(self) -> None:
        self._work = _take_buffers(self.posterior, self._key, self._make_buffers)
        views = self._work[1]
        if self.sharded:
            reshard_fsdp(self.model)  # the writes must land in the shards that the next forward all-gathers
            push(self._frame)
            return
        try:
            push(self._frame)
        except BaseException:
            self._release_buffers()
            raise
        for n, p in self.params.items():
            p.data = views[n]

    def write(self, index: int, seed: int) -> None:
        """Writes sample ``index`` of ``seed`` into the parameters (entering the context on first use).

        Raises:
            InPlaceOrderError: a context entered after this one holds the same parameters.
            ModelInUseError: another thread holds them.
        """
        if not self._frame.active:
            self._enter()
        else:
            require_innermost(self._frame)
        assert self._buffers is not None
        post = self.posterior
        for (start, stop, dt), buf in zip(self._runs, self._buffers):
            if stop == start:
                continue
            direct = dt in OUTPUT_DTYPES
            row = buf.view(1, -1) if direct else torch.empty(1, stop - start, device=buf.device)
            post.sample_into(row, seed, index, columns=(start, stop))
            if not direct:
                buf.copy_(row[0])
        if self.sharded:
            reshard_fsdp(self.model)  # drop the previous forward's all-gathered sample: the next one gathers anew
            views = post.layout.views(self._buffers[0])
            with torch.no_grad():
                for n, p in self.params.items():
                    self._local(p, n).copy_(views[n])

    def _release_buffers(self) -> None:
        if self._work is not None:
            _give_back(self.posterior, self._key, self._work)
            self._work = None

    def restore(self) -> None:
        """Ends the context: the parameters get back what they held when it was entered (module doc)."""
        try:
            pop(self._frame)
        finally:
            self._release_buffers()

    @property
    def active(self) -> bool:
        return self._frame.active

    def __enter__(self) -> SampleWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


@contextlib.contextmanager
def sampled(posterior: L2MPosterior, model: nn.Module, index: int = 0, seed: int = 0) -> Iterator[nn.Module]:
    """Writes sample ``index`` of ``seed`` into the model's parameters in place; restores them on exit.

    One sampler call writes the sample into a work buffer the parameters are bound to; the original
    tensors are untouched, so the restore is bit-for-bit and happens on exceptions too, whatever the
    order in which nested contexts end. Parameters the posterior does not cover are untouched. A sharded
    posterior writes this rank's local shards (every rank must enter it).

    Args:
        posterior: the posterior.
        model: the model the posterior was built from.
        index: which sample (row ``index`` of ``posterior.sample(index + 1, seed).flat``).
        seed: 64-bit seed.

    Yields:
        The model, holding the sample.
    """
    writer = SampleWriter(posterior, model)
    try:
        writer.write(index, seed)
        yield model
    finally:
        writer.restore()


class SampleIterator:
    """Iterates over samples ``sample_offset .. sample_offset + num_samples - 1``, each written in place.

    Each step writes the next sample into the model's parameters (one sampler call) and yields its
    index; the parameters are restored exactly when the iteration ends, on :meth:`close`, on leaving a
    ``with`` block (exceptions included) or when the iterator is garbage-collected. Memory is one copy
    of the covered parameters, however many samples: suited to models whose S samples do not fit in
    memory at once. Works on sharded posteriors too (every rank iterates alike).

    Example::

        with post.iter_sampled(model, num_samples=100, seed=0) as samples:
            for s in samples:
                outputs.append(model(x))
    """

    def __init__(
        self,
        posterior: L2MPosterior,
        model: nn.Module,
        num_samples: int,
        seed: int,
        sample_offset: int = 0,
    ) -> None:
        num_samples, sample_offset = as_int(num_samples, "num_samples"), as_int(sample_offset, "sample_offset")
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.model = model
        self._writer = SampleWriter(posterior, model)
        self._seed = seed
        self._next = sample_offset
        self._stop = sample_offset + num_samples

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        if self._next >= self._stop:
            self.close()
            raise StopIteration
        try:
            self._writer.write(self._next, self._seed)
        except BaseException:
            self.close()
            raise
        self._next += 1
        return self._next - 1

    def __len__(self) -> int:
        return max(self._stop - self._next, 0)

    def close(self) -> None:
        """Restores the parameters exactly; the iterator is exhausted afterwards."""
        self._next = self._stop
        self._writer.restore()

    def __enter__(self) -> SampleIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown there may be nothing to restore into
            self.close()
