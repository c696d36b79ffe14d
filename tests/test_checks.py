"""Value checks (l2m_fast/ops/checks.py, csrc/checks_op.inc): check_values and copy_checked_.

The compiled CPU paths are compared with the pure-PyTorch references (first_bad_values_ref,
copy_checked_ref) and with Tensor.copy_, bit for bit; each bad value is planted at the first, a
middle and the last element, in each thread's half of a parallel run, and with several kinds at once.
"""

from __future__ import annotations

import pytest
import torch

from l2m_fast.ops import BadValueError, check_values, copy_checked_, copy_checked_ref, sample_diag_gaussian
from l2m_fast.ops import cpu as cpu_backend
from l2m_fast.ops.checks import first_bad_values_ref

_NAN, _INF = float("nan"), float("inf")
_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def ops():
    """``torch.ops.l2m_fast_cpu`` (skips when only the reference is available)."""
    loaded = cpu_backend.load_ops()
    if loaded is None:
        pytest.skip(f"compiled CPU kernel unavailable: {cpu_backend.backend_detail()}")
    return loaded


def _segments(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three segments, the middle one with b = 0 (so a zero v there gives a zero precision)."""
    return torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0.1, 0.0, 1.0]), torch.tensor([0, n // 3, 2 * n // 3, n])


def _positions(n: int) -> list[int]:
    """First, either side of the middle (each thread's half of a parallel run), last."""
    return sorted({min(max(p, 0), n - 1) for p in (0, n // 2 - 1, n // 2 + 7, n - 1)})


# ---------------------------------------------------------------- check_values


@pytest.mark.parametrize("n", [1, 37, 300_001])
@pytest.mark.parametrize("bad", [_NAN, _INF, -_INF, -1.0, -1e-30, 0.0])
def test_scan_values_matches_the_reference(ops, n, bad) -> None:
    a, b, bounds = _segments(n)
    for pos in _positions(n):
        v = torch.rand(n, generator=torch.Generator().manual_seed(pos)) + 0.5
        v[pos] = bad
        expected = first_bad_values_ref(v, a, b, bounds)
        assert tuple(ops.scan_values(v, a, b, bounds)) == expected, (pos, bad)


def test_scan_values_reports_the_first_of_each_kind(ops) -> None:
    n = 300_001
    a, b, bounds = _segments(n)
    v = torch.rand(n) + 0.5
    for j in (250_000, 150_001):
        v[j] = _NAN
    for j in (200_000, 120_000):
        v[j] = -2.0
    v[n // 3 + 5] = 0.0  # segment 1 has b = 0: zero precision
    assert ops.scan_values(v, a, b, bounds) == [150_001, 120_000, n // 3 + 5]
    v[120_000] = 1.0
    assert ops.scan_values(v, a, b, bounds) == [150_001, 200_000, n // 3 + 5]


def test_scan_values_skips_empty_segments(ops) -> None:
    v = torch.ones(10)
    v[4] = 0.0
    a, b = torch.ones(4), torch.tensor([1.0, 0.0, 0.0, 1.0])
    bounds = torch.tensor([0, 4, 4, 5, 10])  # segment 1 empty, segment 2 = element 4 alone
    assert ops.scan_values(v, a, b, bounds) == [-1, -1, 4]
    assert first_bad_values_ref(v, a, b, bounds) == (-1, -1, 4)


_MESSAGES = [  # (value planted at element 5, message), as check_values has always said them
    (_NAN, r"v has a non-finite value at element 5 \(nan\): second moments must be finite"),
    (_INF, r"v has a non-finite value at element 5 \(inf\): second moments must be finite"),
    (-0.5, r"v has a negative value at element 5 \(-0.5\): second moments must be >= 0"),
    (0.0, r"precision a\*v \+ b is not positive at element 5 \(segment 1\): give a positive prior precision b"),
]


@pytest.mark.parametrize("value,message", _MESSAGES)
@pytest.mark.parametrize("compiled", [True, False])
def test_check_values_messages(monkeypatch, value, message, compiled) -> None:
    if compiled and cpu_backend.load_ops() is None:
        pytest.skip("compiled CPU kernel unavailable")
    if not compiled:
        monkeypatch.setattr("l2m_fast.ops.checks._compiled_ops", lambda: None)
    v = torch.ones(9)
    v[5] = value
    v[7] = -1.0  # a later negative: never the one reported
    a, b, bounds = torch.ones(2), torch.tensor([1.0, 0.0]), torch.tensor([0, 3, 9])
    if value == 0.0:
        v[7] = 1.0
    with pytest.raises(ValueError, match=message):
        check_values(v, a, b, bounds)


@pytest.mark.parametrize("a,b,bounds,match", [
    ([1.0], [1.0], [0, 4], "bounds must be non-decreasing"),
    ([1.0, 1.0], [1.0, 1.0], [0, 6, 5], "bounds must be non-decreasing"),
    ([_NAN], [1.0], [0, 5], "a and b must be finite"),
    ([1.0], [_INF], [0, 5], "a and b must be finite"),
    ([-1.0], [1.0], [0, 5], "a must be non-negative"),
])
def test_check_values_segment_errors(a, b, bounds, match) -> None:
    with pytest.raises(ValueError, match=match):
        check_values(torch.ones(5), torch.tensor(a), torch.tensor(b), torch.tensor(bounds))


def test_check_values_passes_good_values() -> None:
    v = torch.rand(100_003)
    v[0] = 0.0  # zero second moment with b > 0: fine
    check_values(v, torch.ones(1), torch.full((1,), 1e-3), torch.tensor([0, v.numel()]))
    check_values(torch.empty(0), torch.ones(1), torch.ones(1), torch.tensor([0, 0]))


def _allocated_bytes(fn) -> int:
    """Bytes the CPU allocator handed out while ``fn`` ran (torch.profiler's memory events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(e.cpu_memory_usage, 0) for e in prof.events())


def test_checks_allocate_nothing_of_size_p(ops) -> None:
    n = 1 << 20  # 4 MiB of float32: a boolean temporary alone would be 1 MiB
    v = torch.rand(n)
    a, b, bounds = torch.ones(1), torch.zeros(1) + 0.1, torch.tensor([0, n])
    assert _allocated_bytes(lambda: check_values(v, a, b, bounds)) < 4096
    dst = torch.empty(n)
    src = torch.rand(2 * n, dtype=torch.float64)[::2]
    assert _allocated_bytes(lambda: copy_checked_(dst, src, check_moment=True)) < 4096
    ref_bytes = _allocated_bytes(lambda: bool(torch.isfinite(v).all()))
    assert ref_bytes >= n  # the measurement sees a boolean temporary when there is one


def test_validated_sampling_agrees_with_unvalidated() -> None:
    theta, v = torch.randn(1001), torch.rand(1001)
    checked = sample_diag_gaussian(theta, v, 3, b=0.5, seed=4)
    assert torch.equal(checked, sample_diag_gaussian(theta, v, 3, b=0.5, seed=4, validate=False))


@pytest.mark.parametrize("num_samples,sample_offset", [(1, 0), (1, 3), (2, 1), (4, 0), (7, 2)])
def test_sampling_with_the_fused_check(ops, num_samples, sample_offset) -> None:
    """sample_checked: the same samples as the plain op, and the flags of exactly the valid elements."""
    n = 100_037  # several parallel blocks, a tail super-block with padded lanes
    a, b, bounds = _segments(n)
    theta = torch.randn(n)
    v = torch.rand(n) + 0.5
    plain = torch.empty(num_samples, n)
    ops.sample_diag_gaussian_out(theta, v, a, b, bounds, 3, sample_offset, 9, plain)
    fused = torch.empty_like(plain)
    assert ops.sample_checked(theta, v, a, b, bounds, 3, sample_offset, 9, fused) == 0
    assert torch.equal(fused, plain)
    # b = 0 in the last segment: its zero-padded tail lanes would have a zero precision, but are not elements
    b_last = torch.tensor([0.1, 1.0, 0.0])
    assert ops.sample_checked(theta, v, a, b_last, bounds, 3, sample_offset, 9, fused) == 0
    for pos in _positions(n):
        for bad, flag in [(_NAN, 1), (_INF, 1), (-1.0, 2), (0.0, 4)]:
            w = v.clone()
            w[pos] = bad
            b_here = torch.zeros(3) if bad == 0.0 else b
            assert ops.sample_checked(theta, w, a, b_here, bounds, 3, sample_offset, 9, fused) & flag == flag


def test_validated_sampling_reports_like_check_values() -> None:
    theta = torch.randn(5000)
    cases = [(0, _NAN, "non-finite value at element 0"), (4999, -2.0, "negative value at element 4999"),
             (2500, _INF, "non-finite value at element 2500")]
    for pos, bad, message in cases:
        v = torch.rand(5000)
        if bad != -2.0:
            v[pos // 2] = -1.0  # an earlier negative never hides a non-finite
        v[pos] = bad
        with pytest.raises(ValueError, match=message):
            sample_diag_gaussian(theta, v, 1, b=0.1)
    v = torch.rand(5000)
    v[1234] = 0.0
    with pytest.raises(ValueError, match=r"not positive at element 1234 \(segment 1\)"):
        sample_diag_gaussian(theta, v, 2, a=[1.0, 1.0], b=[1.0, 0.0], bounds=[0, 1000, 5000])
    assert sample_diag_gaussian(theta, v, 0, b=0.1).shape == (0, 5000)  # S = 0: nothing to sample
    with pytest.raises(ValueError, match="non-finite"):
        sample_diag_gaussian(theta, torch.full((5000,), _NAN), 0, b=0.1)  # ... but still checked


# ---------------------------------------------------------------- copy_checked_


def _sources(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    base = (torch.rand(6, 50, 70, generator=g, dtype=torch.float64) * 3.0).to(dtype)
    return {
        "contiguous": base,
        "transposed": base.transpose(0, 2),
        "strided slice": base[:, ::3, 1::2],
        "expanded": base[:1, :1, :].expand(4, 5, 70),
        "one element": base[2, 3, 4],
        "empty": base[:, :0],
        "large": torch.rand(300_001, generator=g, dtype=torch.float64).to(dtype),
    }


@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(_sources(torch.float32)))
@pytest.mark.parametrize("check", [True, False])
def test_copy_checked_equals_copy(dtype, layout, check) -> None:
    src = _sources(dtype)[layout]
    dst = torch.full((src.numel(),), -7.0)
    copy_checked_(dst, src, check_moment=check)
    expected = torch.empty(src.numel())
    expected.view(src.shape).copy_(src)
    assert torch.equal(dst.view(torch.int32), expected.view(torch.int32))


def test_copy_checked_into_a_slice_leaves_the_rest() -> None:
    flat = torch.full((100,), 5.0)
    src = torch.rand(4, 10, dtype=torch.bfloat16).t()
    copy_checked_(flat[30:70], src, check_moment=True)
    assert torch.equal(flat[30:70], src.float().reshape(-1))
    assert bool((flat[:30] == 5.0).all()) and bool((flat[70:] == 5.0).all())


@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
@pytest.mark.parametrize("bad,reason", [(_NAN, "non-finite"), (_INF, "non-finite"), (-_INF, "non-finite"),
                                        (-1.5, "negative")])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "large"])
def test_copy_checked_reports_the_first_bad_element(dtype, bad, reason, layout) -> None:
    src0 = _sources(dtype)[layout]
    n = src0.numel()
    for pos in _positions(n):
        src = src0.clone() if layout != "transposed" else _sources(dtype)["contiguous"].clone().transpose(0, 2)
        coords = torch.unravel_index(torch.tensor(pos), src.shape)
        src[tuple(int(c) for c in coords)] = bad  # flat row-major index pos of src's own shape
        dst = torch.empty(n)
        with pytest.raises(BadValueError) as info:
            copy_checked_(dst, src, check_moment=True)
        err = info.value
        assert isinstance(err, ValueError)
        assert (err.index, err.reason) == (pos, reason)
        expected = float(torch.tensor(bad, dtype=dtype))
        assert err.value == expected or (err.value != err.value and expected != expected)
        assert f"at element {pos}" in str(err) and reason in str(err)
        assert copy_checked_ref(torch.empty(n), src, check_moment=True)[0 if reason == "non-finite" else 1] == pos
        dst_ok = torch.empty(n)
        copy_checked_(dst_ok, src, check_moment=False)  # no check, no error: copied as is
        assert torch.equal(dst_ok.view(torch.int32), dst.view(torch.int32))  # dst was fully written anyway


def test_copy_checked_order_and_edge_values() -> None:
    src = torch.tensor([1.0, -2.0, 3.0, _NAN, -0.0, 0.0])
    # a non-finite value is reported before an earlier negative one
    with pytest.raises(BadValueError, match="non-finite value nan at element 3"):
        copy_checked_(torch.empty(6), src, check_moment=True)
    copy_checked_(torch.empty(2), torch.tensor([-0.0, 0.0]), check_moment=True)  # -0.0 is not negative
    with pytest.raises(BadValueError, match="non-finite value inf at element 1") as info:  # float64 beyond float32
        copy_checked_(torch.empty(3), torch.tensor([1.0, 1e300, 2.0], dtype=torch.float64), check_moment=True)
    assert info.value.value == float("inf")
    neg_nan = torch.tensor([1.0, 1.0]).view(torch.int32)
    neg_nan[1] = -4194304  # 0xFFC00000: a NaN with the sign bit set is non-finite, not negative
    with pytest.raises(BadValueError) as info:
        copy_checked_(torch.empty(2), neg_nan.view(torch.float32), check_moment=True)
    assert info.value.reason == "non-finite"
    copy_checked_(torch.empty(1), torch.tensor([-1.0], dtype=torch.float64), check_moment=False)


def test_copy_checked_parallel_first_is_global(ops) -> None:
    n = 1_000_003
    src = torch.rand(n)
    src[n - 10] = _NAN  # in the second thread's half
    src[n // 2 + 3] = -1.0
    src[700_000] = _INF
    non_finite, negative = ops.copy_checked_(torch.empty(n), src, True)
    assert (non_finite, negative) == (700_000, n // 2 + 3)
    assert copy_checked_ref(torch.empty(n), src, check_moment=True) == (700_000, n // 2 + 3)


@pytest.mark.parametrize("dst,src,exc,match", [
    (torch.empty(4, dtype=torch.float64), torch.ones(4), ValueError, "dst must be a contiguous 1-D float32"),
    (torch.empty(8)[::2], torch.ones(4), ValueError, "non-contiguous"),
    (torch.empty(2, 2), torch.ones(4), ValueError, "1-D"),
    (torch.empty(4), torch.ones(5), ValueError, "5 elements but dst 4"),
    (torch.empty(4), torch.ones(4, dtype=torch.int32), TypeError, "src must be one of"),
    (torch.empty(4), torch.ones(4, device="meta"), ValueError, "copy within one device"),
    (torch.empty(4), [1.0, 2.0, 3.0, 4.0], TypeError, "must be tensors"),
])
def test_copy_checked_bad_arguments(dst, src, exc, match) -> None:
    with pytest.raises(exc, match=match):
        copy_checked_(dst, src, check_moment=True)


def test_copy_checked_raw_op_refuses_overlap_and_wrong_devices(ops) -> None:
    buf = torch.arange(10, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="single memory location|overlap"):
        ops.copy_checked_(buf[2:8], buf[:6], True)
    with pytest.raises(RuntimeError, match="float32"):
        ops.copy_checked_(torch.empty(3, dtype=torch.float16), torch.ones(3), True)


def test_copy_checked_keeps_autograd_out() -> None:
    src = torch.rand(5, requires_grad=True)
    dst = torch.empty(5)
    copy_checked_(dst, src * 2, check_moment=True)
    assert not dst.requires_grad
    assert torch.equal(dst, (src * 2).detach())


def test_copy_checked_reference_path(monkeypatch) -> None:
    monkeypatch.setattr("l2m_fast.ops.checks._compiled_ops", lambda: None)
    src = torch.rand(7, 3, dtype=torch.float16).t()
    dst = torch.empty(21)
    copy_checked_(dst, src, check_moment=True)
    assert torch.equal(dst, src.float().reshape(-1))
    src[2, 4] = -3.0
    with pytest.raises(BadValueError) as info:
        copy_checked_(dst, src, check_moment=True)
    assert (info.value.index, info.value.value, info.value.reason) == (2 * 7 + 4, -3.0, "negative")
