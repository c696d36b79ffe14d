"""Writing posterior samples into a model's live parameters, one sampler call each, with exact restore.

The trick is to *bind* rather than copy: for the duration of a context each covered parameter's
``.data`` is pointed at a view of one flat work buffer (or of a row of a sample batch). The sampler
writes a whole sample into that buffer in one call, so a sample reaches the live parameters with one
kernel launch and no per-tensor copies. The original tensors are never written: restoring is pointing
``.data`` back at them, which is bit-for-bit exact by construction and costs nothing.

The ``nn.Parameter`` objects keep their identity (an optimizer or a hook holding them still sees
them); only their storage changes while bound. Peak extra memory is one work buffer, one copy of the
covered parameters, whatever the number of samples drawn. Anything written into the parameters while
they are bound (an optimizer step, say) is discarded at restore.

Caveat: code that caches a parameter's *storage* rather than the parameter (a module that copied its
weight into a buffer at construction, ``torch.compile`` graphs specialised on data pointers) does not
see the bound sample; ordinary ``nn.Module`` forwards read the parameter and do. In-place contexts on
one model must be left in the reverse order they were entered (``with`` blocks do that): each restores
what the parameters held when it was entered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .layout import FlatLayout
from .modes import restrict_segments
from .ops.sample import OUTPUT_DTYPES, sample_diag_gaussian

if TYPE_CHECKING:
    from .posterior import L2MPosterior

__all__ = ["ParamBinding", "SampleWriter", "SampleIterator"]


class ParamBinding:
    """Points the ``.data`` of some parameters at other tensors; :meth:`restore` points them back.

    Args:
        params: name -> the live parameter.

    Use as a context manager: the originals are restored on exit, on exceptions too.
    """

    def __init__(self, params: Mapping[str, nn.Parameter]) -> None:
        self.params = dict(params)
        self._originals: dict[str, Tensor] | None = None

    def bind(self, tensors: Mapping[str, Tensor]) -> None:
        """Points each parameter at ``tensors[name]`` (same shape and dtype; views are kept, not copied)."""
        if self._originals is None:
            self._originals = {n: p.data for n, p in self.params.items()}
        for n, p in self.params.items():
            t = tensors[n]
            if t.shape != p.shape or t.dtype != p.dtype or t.device != p.device:
                raise ValueError(
                    f"cannot bind {n!r} ({tuple(p.shape)}, {p.dtype}, {p.device}) to a tensor "
                    f"({tuple(t.shape)}, {t.dtype}, {t.device})"
                )
            p.data = t

    def restore(self) -> None:
        """Points every parameter back at its original tensor (which was never written)."""
        if self._originals is None:
            return
        for n, p in self.params.items():
            p.data = self._originals[n]
        self._originals = None

    @property
    def bound(self) -> bool:
        return self._originals is not None

    def __enter__(self) -> ParamBinding:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


class SampleWriter:
    """Writes single posterior samples straight into a model's live parameters.

    Covered parameters are grouped into runs of consecutive slots with one dtype; each run gets one
    work buffer and one sampler call (``element_offset`` keeps every element's global index, so the
    values are those of :meth:`L2MPosterior.sample`). A model with one parameter dtype (the usual
    case) is one buffer and one launch per sample. Float32, bfloat16 and float16 parameters are written
    by the sampler directly; other dtypes (float64) go through a float32 scratch row of that run.

    Args:
        posterior: the posterior.
        params: name -> live parameter, for every slot of ``posterior.layout``.
    """

    def __init__(self, posterior: L2MPosterior, params: Mapping[str, nn.Parameter]) -> None:
        self.posterior = posterior
        self.binding = ParamBinding(params)
        layout: FlatLayout = posterior.layout
        runs: list[tuple[int, int, torch.dtype]] = []
        for slot in layout:
            dt = params[slot.name].dtype
            if runs and runs[-1][2] == dt:
                runs[-1] = (runs[-1][0], slot.stop, dt)
            else:
                runs.append((slot.offset, slot.stop, dt))
        self._runs = []
        bounds = posterior.seg_bounds.tolist()
        for start, stop, dt in runs:
            seg = restrict_segments(posterior.seg_a, posterior.seg_b, bounds, start, stop)
            self._runs.append((start, stop, dt, seg))
        self._buffers: list[Tensor] | None = None

    def _allocate(self) -> None:
        device = self.posterior.device
        self._buffers = [torch.empty(stop - start, dtype=dt, device=device) for start, stop, dt, _ in self._runs]
        views: dict[str, Tensor] = {}
        for (start, _, _, _), buf in zip(self._runs, self._buffers):
            for slot in self.posterior.layout:
                if start <= slot.offset and slot.stop <= start + buf.numel():
                    views[slot.name] = buf[slot.offset - start : slot.stop - start].view(slot.shape)
        self.binding.bind(views)

    def write(self, index: int, seed: int) -> None:
        """Writes sample ``index`` of ``seed`` into the parameters (binding them on first use)."""
        if self._buffers is None:
            self._allocate()
        post = self.posterior
        assert self._buffers is not None
        for (start, stop, dt, (a, b, bounds)), buf in zip(self._runs, self._buffers):
            if stop == start:
                continue
            direct = dt in OUTPUT_DTYPES
            out = buf.view(1, -1) if direct else torch.empty(1, stop - start, device=buf.device)
            sample_diag_gaussian(
                post.theta[start:stop],
                post.v[start:stop],
                1,
                a=a,
                b=b,
                bounds=bounds,
                seed=seed,
                sample_offset=index,
                element_offset=start,
                out=out,
                validate=False,
            )
            if not direct:
                buf.copy_(out[0])

    def restore(self) -> None:
        """Restores the original parameters exactly and frees the work buffers."""
        self.binding.restore()
        self._buffers = None

    def __enter__(self) -> SampleWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


class SampleIterator:
    """Iterates over samples ``sample_offset .. sample_offset + num_samples - 1``, each written in place.

    Each step writes the next sample into the model's parameters (one sampler call) and yields its
    index; the parameters are restored exactly when the iteration ends, on :meth:`close`, or on leaving
    a ``with`` block (exceptions included). Memory is one copy of the covered parameters, however many
    samples: suited to models whose S samples do not fit in memory at once.

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
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if posterior.is_sharded:
            raise NotImplementedError(
                "iter_sampled binds whole parameters; on a sharded posterior use `with post.sampled(model, s, seed)` "
                "for each sample (every rank must enter it)"
            )
        self.model = model
        self._writer = SampleWriter(posterior, posterior._live_params(model))
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
