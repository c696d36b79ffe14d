"""Property-based tests (hypothesis, derandomized): random layouts, dtypes, subsets, offsets and chunkings
sample what the reference says; random exceptions inside the in-place paths never lose a weight.

Each property runs a fixed, derandomized set of examples, so a failure reproduces on every machine.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_restored, snapshot
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from l2m_fast import L2MPosterior  # noqa: E402
from l2m_fast.ops.reference import normals_ref  # noqa: E402

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
_EPS = torch.finfo(torch.float32).eps
_OUT_ULP = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}

shapes = st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple), min_size=1, max_size=5)


class _Params(nn.Module):
    def __init__(self, shapes: list[tuple[int, ...]], seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        for k, shape in enumerate(shapes):
            self.register_parameter(f"p{k}", nn.Parameter(torch.randn(shape, generator=g)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * sum(p.sum() for p in self.parameters())


def _posterior(model: nn.Module, keep: list[bool], groups: list[int], seed: int) -> L2MPosterior:
    g = torch.Generator().manual_seed(seed + 1)
    named = [(n, p) for (n, p), k in zip(model.named_parameters(), keep) if k]
    v = {n: torch.rand(p.shape, generator=g) * 3 for n, p in named}
    return L2MPosterior(dict(named), v, a=[1.0, 0.5, 2.0], b=[0.3, 1.0, 4.0], groups=dict(zip(v, groups)))


@SETTINGS
@given(
    shapes=shapes,
    keep=st.lists(st.booleans(), min_size=5, max_size=5),
    groups=st.lists(st.integers(0, 2), min_size=5, max_size=5),
    num_samples=st.integers(1, 9),
    sample_offset=st.integers(0, 11),
    split=st.integers(0, 9),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**64 - 1),
)
def test_samples_follow_the_reference_whatever_the_layout_and_chunking(
    shapes, keep, groups, num_samples, sample_offset, split, dtype, seed
) -> None:
    keep = keep[: len(shapes)]
    if not any(keep):
        keep[0] = True
    model = _Params(shapes, seed % 1000)
    post = _posterior(model, keep, groups, seed % 1000)
    got = post.sample(num_samples, seed, sample_offset=sample_offset, dtype=dtype).flat.float()
    # the reference: theta + z / sqrt(a v + b) with the contract's normals
    z = normals_ref(post.num_params, num_samples, seed, sample_offset)
    sigma = post.variance().sqrt()
    want = post.theta + z * sigma
    tol = 4 * _EPS * sigma * z.abs().clamp(min=1) + _EPS * want.abs() + _OUT_ULP[dtype] * want.abs()
    assert bool(((got - want).abs() <= tol).all())
    # a chunk of samples and a chunk of columns are exactly the same draws
    k = min(split, num_samples)
    head = post.sample(k, seed, sample_offset=sample_offset, dtype=dtype).flat
    tail = post.sample(num_samples - k, seed, sample_offset=sample_offset + k, dtype=dtype).flat
    assert torch.equal(torch.cat([head, tail]).float(), got)
    lo = min(split, post.num_params)
    cols = torch.empty(num_samples, post.num_params - lo, dtype=dtype)
    post.sample_into(cols, seed, sample_offset, columns=(lo, post.num_params))
    assert torch.equal(cols.float(), got[:, lo:])


class _Boom(Exception):
    pass


class _Fragile(nn.Module):
    """A small MLP whose forward raises on its ``fail_at``-th call."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
        self.calls, self.fail_at = 0, fail_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise _Boom(self.calls)
        return self.body(x)


@SETTINGS
@given(
    fail_at=st.integers(1, 12),
    path=st.sampled_from(["sampled", "iter", "iter_break", "predict_loop", "predict_vmap", "predict_linearized"]),
    num_samples=st.integers(1, 8),
    chunk=st.integers(1, 4),
)
def test_an_exception_anywhere_leaves_the_weights_bit_identical(fail_at, path, num_samples, chunk) -> None:
    model = _Fragile(fail_at)
    g = torch.Generator().manual_seed(3)
    post = L2MPosterior(
        dict(model.named_parameters()),
        {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()},
        b=2.0,
    )
    snap = snapshot(model)
    x = torch.randn(4, 3)
    try:
        with torch.no_grad():
            if path == "sampled":
                for s in range(num_samples):
                    with post.sampled(model, s, seed=1):
                        model(x)
            elif path.startswith("iter"):
                with post.iter_sampled(model, num_samples, seed=1) as it:
                    for s in it:
                        model(x)
                        if path == "iter_break" and s == num_samples // 2:
                            break
            else:
                method = "loop" if path == "predict_loop" else "vmap"
                post.predict(
                    model,
                    x,
                    num_samples,
                    seed=1,
                    method=method,
                    chunk_size=chunk,
                    linearized=path == "predict_linearized",
                    progress=False,
                )
    except _Boom:
        pass
    assert_restored(model, snap)
