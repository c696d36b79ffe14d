"""The posterior predictive's results, and the streaming reductions that build them from sampled outputs.

Outputs are reduced as they come (Chan's parallel mean and variance in float64; running sums of softmax
probabilities and of their entropies), so memory does not grow with the number of samples unless the
outputs are kept.

Classification has two links from S sampled logit vectors (raw or linearized):

* ``"mc"``: the Monte-Carlo average of the softmax, ``probs = mean_s softmax(f_s / T)``;
* ``"probit"``: the probit approximation of the expected softmax under a Gaussian over the logits with
  their Monte-Carlo mean and per-class variance, ``probs = softmax(mu / sqrt(1 + pi/8 var))`` (MacKay
  1992; laplace-torch's ``link_approx="probit"``), ``mu`` and ``var`` taken over ``f_s / T``.

``T`` is the posterior's logit temperature (1 unless it was calibrated). Both links report the entropy of
``probs`` (total uncertainty), the mean entropy of the sampled softmaxes (aleatoric) and their
difference, the mutual information (epistemic, BALD), clamped at 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "RegressionPrediction",
    "ClassificationPrediction",
    "RunningMoments",
    "RegressionReducer",
    "ClassificationReducer",
    "LINKS",
]

LINKS = ("mc", "probit")


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
        method: ``"vmap"`` or ``"loop"`` (``"map"`` for a zero-temperature posterior), how the samples ran.
        chunk_size: samples per chunk.
        linearized: whether the outputs were those of the model linearized at the MAP.
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
    linearized: bool = False


@dataclass
class ClassificationPrediction:
    """The predictive of a classifier over S sampled logit vectors (see the module docstring for the links).

    Attributes:
        probs: (B, C) predictive class probabilities.
        entropy: (B,) predictive entropy ``H[probs]`` in nats (total uncertainty).
        expected_entropy: (B,) mean entropy of the sampled softmaxes (aleatoric part).
        mutual_info: (B,) ``entropy - expected_entropy`` (epistemic part, BALD), clamped at 0.
        samples: (S, B, C) sampled probabilities when ``keep_samples=True``, else None.
        num_samples: S.
        method: ``"vmap"`` or ``"loop"`` (``"map"`` for a zero-temperature posterior).
        chunk_size: samples per chunk.
        link: ``"mc"`` or ``"probit"``.
        linearized: whether the logits were those of the model linearized at the MAP.
        logit_temperature: T, the logits were divided by.
    """

    probs: Tensor
    entropy: Tensor
    expected_entropy: Tensor
    mutual_info: Tensor
    samples: Tensor | None
    num_samples: int
    method: str
    chunk_size: int
    link: str = "mc"
    linearized: bool = False
    logit_temperature: float = 1.0


class RunningMoments:
    """Mean and sum of squared deviations over a stream of chunks (Chan et al.'s parallel update), float64."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def update(self, x: Tensor) -> None:
        """Adds a chunk of c observations: (c, *shape)."""
        c = x.shape[0]
        x64 = x.double()
        mean_b = x64.mean(0)
        m2_b = (x64 - mean_b).square_().sum(0)
        if self.mean is None or self.m2 is None:
            self.mean, self.m2 = mean_b, m2_b
        else:
            n = self.n + c
            delta = mean_b - self.mean
            self.mean = self.mean + delta * (c / n)
            self.m2 = self.m2 + m2_b + delta.square() * (self.n * c / n)
        self.n += c

    @property
    def var(self) -> Tensor:
        """The population variance (divided by n)."""
        assert self.m2 is not None
        return self.m2 / self.n


class RegressionReducer:
    """Streaming mean and variance of the sampled means, mean of the sampled variances.

    Args:
        num_samples: S, the samples to come (sizes the kept outputs).
        keep: keep every sampled output (``samples`` of the result).
        linearized: recorded in the result.
    """

    def __init__(self, num_samples: int, keep: bool, linearized: bool = False) -> None:
        self.moments = RunningMoments()
        self.ale: Tensor | None = None
        self.keep = keep
        self.total = num_samples
        self.linearized = linearized
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
        if not isinstance(y, Tensor):
            raise TypeError(
                f"a regression model must return a tensor or a (mean, var) pair of tensors, got {type(y).__name__}: "
                "map its output with output_fn=..."
            )
        c, n = y.shape[0], self.moments.n
        if self.dtype is None:
            self.dtype = y.dtype if y.is_floating_point() else torch.float32
        if self.keep:
            if self.kept is None:
                self.kept = y.new_empty((self.total, *y.shape[1:]))
                if av is not None:
                    self.kept_ale = av.new_empty((self.total, *av.shape[1:]))
            self.kept[n : n + c] = y
            if av is not None and self.kept_ale is not None:
                self.kept_ale[n : n + c] = av
        self.moments.update(y)
        if av is not None:
            s = av.double().sum(0)
            self.ale = s if self.ale is None else self.ale + s
        elif self.ale is not None:
            raise ValueError("the model returned a variance for some samples and not for others")

    def result(self, method: str, chunk: int) -> RegressionPrediction:
        """The prediction over every sample added; ``method`` and ``chunk`` are recorded in it."""
        m = self.moments
        assert m.mean is not None and self.dtype is not None
        dt = self.dtype
        epi = m.var
        ale = None if self.ale is None else self.ale / m.n
        var = epi if ale is None else epi + ale
        return RegressionPrediction(
            mean=m.mean.to(dt),
            var=var.to(dt),
            epistemic_var=epi.to(dt),
            aleatoric_var=None if ale is None else ale.to(dt),
            samples=self.kept,
            aleatoric_samples=self.kept_ale,
            num_samples=m.n,
            method=method,
            chunk_size=chunk,
            linearized=self.linearized,
        )


class ClassificationReducer:
    """Running sums of the softmax probabilities and of their entropies (and, for the probit link, the
    running mean and variance of the logits).

    Args:
        num_samples: S, the samples to come (sizes the kept outputs).
        keep: keep every sampled probability vector (``samples`` of the result).
        link: ``"mc"`` or ``"probit"`` (see the module docstring).
        logit_temperature: T, every logit is divided by it first. Default 1.
        linearized: recorded in the result.
    """

    def __init__(
        self, num_samples: int, keep: bool, link: str = "mc", logit_temperature: float = 1.0, linearized: bool = False
    ) -> None:
        if link not in LINKS:
            raise ValueError(f"link must be one of {LINKS}, got {link!r}")
        if not (isinstance(logit_temperature, (int, float)) and math.isfinite(logit_temperature)) or not (
            logit_temperature > 0
        ):
            raise ValueError(f"logit_temperature must be a positive finite number, got {logit_temperature!r}")
        self.n = 0
        self.psum: Tensor | None = None
        self.hsum: Tensor | None = None
        self.logits = RunningMoments() if link == "probit" else None
        self.keep = keep
        self.total = num_samples
        self.link = link
        self.temperature = float(logit_temperature)
        self.linearized = linearized
        self.kept: Tensor | None = None

    def update(self, logits: Tensor) -> None:
        """Adds a chunk of (c, B, C) sampled logits."""
        if not isinstance(logits, Tensor):
            raise TypeError(
                f"a classifier must return (B, C) logits, got {type(logits).__name__}: map it with output_fn=..."
            )
        c = logits.shape[0]
        scaled = logits.float() if self.temperature == 1.0 else logits.float() / self.temperature
        p = torch.softmax(scaled, dim=-1)
        if self.keep:
            if self.kept is None:
                self.kept = p.new_empty((self.total, *p.shape[1:]))
            self.kept[self.n : self.n + c] = p
        h = -torch.special.xlogy(p, p).sum(-1)  # 0 log 0 = 0: masked (-inf) logits stay finite
        ps, hs = p.double().sum(0), h.double().sum(0)
        self.psum = ps if self.psum is None else self.psum + ps
        self.hsum = hs if self.hsum is None else self.hsum + hs
        if self.logits is not None:
            self.logits.update(scaled)
        self.n += c

    def result(self, method: str, chunk: int) -> ClassificationPrediction:
        """The prediction over every sample added; ``method`` and ``chunk`` are recorded in it."""
        assert self.psum is not None and self.hsum is not None
        if self.logits is not None:
            assert self.logits.mean is not None
            probs = torch.softmax(self.logits.mean / torch.sqrt(1.0 + math.pi / 8.0 * self.logits.var), dim=-1)
        else:
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
            link=self.link,
            linearized=self.linearized,
            logit_temperature=self.temperature,
        )
