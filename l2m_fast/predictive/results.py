"""The posterior predictive's results, and the streaming reductions that build them from sampled outputs.

Outputs are reduced as they come (Chan's parallel mean and variance in float64; running sums of softmax
probabilities and of their entropies), so memory does not grow with the number of samples unless the
outputs are kept."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RegressionPrediction", "ClassificationPrediction", "RegressionReducer", "ClassificationReducer"]


@dataclass
class RegressionPrediction:
    """The predictive of a regression model: moments of the Monte-Carlo mixture over S samples.

    Variances are those of the S-component mixture (divided by S, not S - 1).

    Attributes:
        mean: (B, *out) predictive mean.
        var: (B, *out) total predictive variance, ``epistemic_var + aleatoric_var``.
        epistemic_var: (B, *out) variance of the sampled means.
        aleatoric_var: (B, *out) mean of the predicted variances (a Gaussian head), else None.
        samples: (S, B, *out) the sampled means when ``keep_samples=True``, else None.
        aleatoric_samples: (S, B, *out) the sampled variances with a Gaussian head and ``keep_samples``.
        num_samples: S.
        method: ``"vmap"`` or ``"loop"``, how the samples were evaluated.
        chunk_size: samples per chunk.
    """

    mean: Tensor
    var: Tensor
    epistemic_var: Tensor
    aleatoric_var: Tensor | None
    samples: Tensor | None
    aleatoric_samples: Tensor | None
    num_samples: int
    method: str
    chunk_size: int


@dataclass
class ClassificationPrediction:
    """The predictive of a classifier: the Monte-Carlo average of the softmax over S samples.

    Attributes:
        probs: (B, C) averaged class probabilities.
        entropy: (B,) predictive entropy ``H[probs]`` in nats (total uncertainty).
        expected_entropy: (B,) mean entropy of the sampled softmaxes (aleatoric part).
        mutual_info: (B,) ``entropy - expected_entropy`` (epistemic part, BALD), clamped at 0.
        samples: (S, B, C) sampled probabilities when ``keep_samples=True``, else None.
        num_samples: S.
        method: ``"vmap"`` or ``"loop"``.
        chunk_size: samples per chunk.
    """

    probs: Tensor
    entropy: Tensor
    expected_entropy: Tensor
    mutual_info: Tensor
    samples: Tensor | None
    num_samples: int
    method: str
    chunk_size: int


class RegressionReducer:
    """Streaming mean and variance of the sampled means (Chan et al.), mean of the sampled variances.

    Args:
        num_samples: S, the samples to come (sizes the kept outputs).
        keep: keep every sampled output (``samples`` of the result).
    """

    def __init__(self, num_samples: int, keep: bool) -> None:
        self.n = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None
        self.ale: Tensor | None = None
        self.keep = keep
        self.total = num_samples
        self.kept: Tensor | None = None
        self.kept_ale: Tensor | None = None
        self.dtype: torch.dtype | None = None

    def update(self, out: Tensor | tuple[Tensor, Tensor]) -> None:
        """Adds a chunk: (c, B, *out) sampled means, or a ``(mean, var)`` pair of them (a Gaussian head)."""
        if isinstance(out, (tuple, list)):
            if len(out) != 2:
                raise ValueError(f"a regression output must be a tensor or (mean, var), got {len(out)} items")
            y, av = out
        else:
            y, av = out, None
        c = y.shape[0]
        if self.dtype is None:
            self.dtype = y.dtype if y.is_floating_point() else torch.float32
        if self.keep:
            if self.kept is None:
                self.kept = y.new_empty((self.total, *y.shape[1:]))
                if av is not None:
                    self.kept_ale = av.new_empty((self.total, *av.shape[1:]))
            self.kept[self.n : self.n + c] = y
            if av is not None and self.kept_ale is not None:
                self.kept_ale[self.n : self.n + c] = av
        y64 = y.double()
        mean_b = y64.mean(0)
        m2_b = (y64 - mean_b).square_().sum(0)
        if self.mean is None or self.m2 is None:
            self.mean, self.m2 = mean_b, m2_b
        else:
            n = self.n + c
            delta = mean_b - self.mean
            self.mean = self.mean + delta * (c / n)
            self.m2 = self.m2 + m2_b + delta.square() * (self.n * c / n)
        if av is not None:
            s = av.double().sum(0)
            self.ale = s if self.ale is None else self.ale + s
        elif self.ale is not None:
            raise ValueError("the model returned a variance for some samples and not for others")
        self.n += c

    def result(self, method: str, chunk: int) -> RegressionPrediction:
        """The prediction over every sample added; ``method`` and ``chunk`` are recorded in it."""
        assert self.mean is not None and self.m2 is not None and self.dtype is not None
        dt = self.dtype
        epi = self.m2 / self.n
        ale = None if self.ale is None else self.ale / self.n
        var = epi if ale is None else epi + ale
        return RegressionPrediction(
            mean=self.mean.to(dt),
            var=var.to(dt),
            epistemic_var=epi.to(dt),
            aleatoric_var=None if ale is None else ale.to(dt),
            samples=self.kept,
            aleatoric_samples=self.kept_ale,
            num_samples=self.n,
            method=method,
            chunk_size=chunk,
        )


class ClassificationReducer:
    """Running sums of the softmax probabilities and of their entropies.

    Args:
        num_samples: S, the samples to come (sizes the kept outputs).
        keep: keep every sampled probability vector (``samples`` of the result).
    """

    def __init__(self, num_samples: int, keep: bool) -> None:
        self.n = 0
        self.psum: Tensor | None = None
        self.hsum: Tensor | None = None
        self.keep = keep
        self.total = num_samples
        self.kept: Tensor | None = None

    def update(self, logits: Tensor) -> None:
        """Adds a chunk of (c, B, C) sampled logits."""
        if isinstance(logits, (tuple, list)):
            raise ValueError("a classifier must return logits (B, C); map other outputs with output_fn")
        c = logits.shape[0]
        logp = torch.log_softmax(logits.float(), dim=-1)
        p = logp.exp()
        if self.keep:
            if self.kept is None:
                self.kept = p.new_empty((self.total, *p.shape[1:]))
            self.kept[self.n : self.n + c] = p
        h = -torch.special.xlogy(p, p).sum(-1)  # 0 log 0 = 0: masked (-inf) logits stay finite
        ps, hs = p.double().sum(0), h.double().sum(0)
        self.psum = ps if self.psum is None else self.psum + ps
        self.hsum = hs if self.hsum is None else self.hsum + hs
        self.n += c

    def result(self, method: str, chunk: int) -> ClassificationPrediction:
        """The prediction over every sample added; ``method`` and ``chunk`` are recorded in it."""
        assert self.psum is not None and self.hsum is not None
        probs = self.psum / self.n
        entropy = -torch.special.xlogy(probs, probs).sum(-1)
        expected = self.hsum / self.n
        mi = (entropy - expected).clamp_(min=0.0)
        return ClassificationPrediction(
            probs=probs.float(),
            entropy=entropy.float(),
            expected_entropy=expected.float(),
            mutual_info=mi.float(),
            samples=self.kept,
            num_samples=self.n,
            method=method,
            chunk_size=chunk,
        )
