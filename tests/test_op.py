"""The registered op and its checked public wrapper: results, dtypes, offsets, bad input, opcheck."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from l2m_fast.ops import sample_diag_gaussian, sample_diag_gaussian_ref
from l2m_fast.ops.reference import normals_ref


def _inputs(p: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(p, generator=g)
    v = torch.rand(p, generator=g) * 3.0
    return theta, v


@pytest.mark.parametrize("p", [1, 7, 4097])
@pytest.mark.parametrize("s", [1, 3, 5])
def test_matches_reference_formula(p, s):
    theta, v = _inputs(p)
    out = sample_diag_gaussian(theta, v, s, a=2.0, b=0.5, seed=11)
    z = normals_ref(p, s, seed=11)
    expected = theta + z / torch.sqrt(2.0 * v + 0.5)
    torch.testing.assert_close(out, expected, rtol=2e-6, atol=2e-6)


def test_segments_use_their_own_coefficients():
    theta, v = _inputs(10)
    out = sample_diag_gaussian(theta, v, 4, a=[1.0, 4.0], b=[1.0, 2.0], bounds=[0, 3, 10], seed=1)
    z = normals_ref(10, 4, seed=1)
    a = torch.tensor([1.0] * 3 + [4.0] * 7)
    b = torch.tensor([1.0] * 3 + [2.0] * 7)
    torch.testing.assert_close(out, theta + z / torch.sqrt(a * v + b))


def test_sample_and_element_offsets_agree_with_one_draw():
    theta, v = _inputs(50)
    full = sample_diag_gaussian(theta, v, 9, b=1.0, seed=5)
    part = sample_diag_gaussian(theta[20:], v[20:], 6, b=1.0, seed=5, sample_offset=3, element_offset=20)
    assert torch.equal(full[3:, 20:], part)


@pytest.mark.parametrize(("dtype", "atol"), [(torch.bfloat16, 2**-7), (torch.float16, 2**-10)])
def test_low_precision_output_is_the_rounded_float32_result(dtype, atol):
    theta, v = _inputs(257)
    ref = sample_diag_gaussian(theta, v, 4, b=1.0, seed=2)
    low = sample_diag_gaussian(theta, v, 4, b=1.0, seed=2, dtype=dtype)
    assert low.dtype == dtype
    # rounded once: within half an ulp of the float32 value (relative 2^-8 for bf16, 2^-11 for fp16)
    torch.testing.assert_close(low.float(), ref, rtol=atol, atol=atol * 1e-3)


def test_non_contiguous_inputs_give_the_contiguous_result():
    theta, v = _inputs(64)
    theta2 = torch.stack([theta, torch.zeros(64)], dim=1)[:, 0]
    v2 = torch.stack([v, torch.zeros(64)], dim=1)[:, 0]
    assert not theta2.is_contiguous()
    assert torch.equal(sample_diag_gaussian(theta2, v2, 3, b=1.0), sample_diag_gaussian(theta, v, 3, b=1.0))


def test_out_buffer_is_written_in_place():
    theta, v = _inputs(33)
    buf = torch.full((5, 33), float("nan"))
    res = sample_diag_gaussian(theta, v, out=buf, b=1.0, seed=4)
    assert res is buf
    assert torch.equal(buf, sample_diag_gaussian(theta, v, 5, b=1.0, seed=4))


def test_standardised_draws_are_standard_normal():
    """(out - theta) * sqrt(a v + b) ~ N(0, 1): KS test at level 1e-3 (false-alarm rate 0.1 %), fixed seed."""
    theta, v = _inputs(2048, seed=9)
    out = sample_diag_gaussian(theta, v, 8, a=0.7, b=0.2, seed=77)
    zs = ((out - theta) * torch.sqrt(0.7 * v + 0.2)).double().reshape(-1)
    assert stats.kstest(zs.numpy(), "norm").pvalue > 1e-3
    assert abs(zs.mean().item()) < 3.3 / math.sqrt(zs.numel())


def test_empty_shapes():
    theta, v = _inputs(0)
    assert sample_diag_gaussian(theta, v, 3).shape == (3, 0)
    theta, v = _inputs(5)
    assert sample_diag_gaussian(theta, v, 0, b=1.0).shape == (0, 5)


BAD_CALLS = [
    (dict(v=torch.ones(4)), ValueError, "same number of elements"),
    (dict(theta=torch.zeros(5, dtype=torch.float64)), TypeError, "float32"),
    (dict(v=torch.ones(5, dtype=torch.float16)), TypeError, "float32"),
    (dict(out=torch.empty(3, 4)), ValueError, "shape"),
    (dict(out=torch.empty(5, 3).t()), ValueError, "contiguous"),
    (dict(out=torch.empty(3, 5, dtype=torch.int32)), TypeError, "out must be one of"),
    (dict(dtype=torch.float64), TypeError, "dtype"),
    (dict(v=torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0])), ValueError, "non-finite"),
    (dict(v=torch.tensor([1.0, 1.0, float("inf"), 1.0, 1.0])), ValueError, "non-finite"),
    (dict(v=torch.tensor([1.0, 1.0, 1.0, -1.0, 1.0])), ValueError, "negative"),
    (dict(b=0.0, v=torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0])), ValueError, "not positive"),
    (dict(a=-1.0), ValueError, "non-negative"),
    (dict(b=float("nan")), ValueError, "finite"),
    (dict(a=[1.0, 1.0], b=[1.0, 1.0], bounds=[0, 4, 3]), ValueError, "non-decreasing"),
    (dict(a=[1.0, 1.0], b=[1.0, 1.0], bounds=[0, 5]), ValueError, "G \\+ 1"),
    (dict(a=[1.0, 1.0], b=[1.0, 1.0]), ValueError, "bounds"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=1 << 64), ValueError, "seed"),
    (dict(sample_offset=-2), ValueError, "sample_offset"),
    (dict(sample_offset=(1 << 32) - 2), ValueError, "2\\^32"),
    (dict(element_offset=-1), ValueError, "element_offset"),
    (dict(element_offset=(1 << 63) - 3), ValueError, "overflows"),
    (dict(num_samples=-1), ValueError, "num_samples"),
]


@pytest.mark.parametrize(("kwargs", "exc", "match"), BAD_CALLS)
def test_bad_input_is_a_clear_error(kwargs, exc, match):
    args = dict(theta=torch.zeros(5), v=torch.ones(5), num_samples=3, b=1.0)
    args.update(kwargs)
    theta, v, s = args.pop("theta"), args.pop("v"), args.pop("num_samples")
    if "out" in args:
        s = None
    with pytest.raises(exc, match=match):
        sample_diag_gaussian(theta, v, s, **args)


def test_opcheck():
    theta, v = _inputs(37)
    args = (theta, v, torch.tensor([1.0, 2.0]), torch.tensor([0.5, 1.0]), torch.tensor([0, 10, 37]), -5, 3, 17)
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.empty(6, 37, dtype=dtype)
        torch.library.opcheck(torch.ops.l2m_fast.sample_diag_gaussian_out.default, (*args, out))


def test_reference_signature_matches_the_op():
    theta, v = _inputs(21)
    a, b, bounds = torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([0, 21])
    out_op = torch.empty(3, 21)
    out_ref = torch.empty(3, 21)
    torch.ops.l2m_fast.sample_diag_gaussian_out(theta, v, a, b, bounds, 8, 0, 0, out_op)
    sample_diag_gaussian_ref(theta, v, a, b, bounds, 8, 0, 0, out_ref)
    torch.testing.assert_close(out_op, out_ref, rtol=1e-5, atol=1e-5)


def test_package_works_without_triton():
    """Triton is optional: with it unimportable the package imports and samples on the CPU."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, l2m_fast\n"
        "from l2m_fast.ops.triton_kernel import HAS_TRITON\n"
        "assert not HAS_TRITON\n"
        "out = l2m_fast.ops.sample_diag_gaussian(torch.zeros(9), torch.ones(9), 2, b=1.0, seed=1)\n"
        "print(tuple(out.shape))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "(2, 9)"


RAW_BAD = [
    (dict(out=torch.empty(2, 5, device="meta")), "one device"),
    (dict(theta=torch.zeros(4)), "theta must be a contiguous 1-D"),
    (dict(v=torch.zeros(5, dtype=torch.float64)), "v must be a contiguous 1-D"),
    (dict(bounds=torch.tensor([0, 5], dtype=torch.int32)), "bounds must be"),
    (dict(b=torch.ones(2)), "b must be"),
    (dict(out=torch.empty(5, 2).t()), "out must be a contiguous"),
    (dict(sample_offset=(1 << 32) - 1), "2\\^32"),
]


@pytest.mark.parametrize(("kwargs", "match"), RAW_BAD)
def test_raw_op_metadata_checks_on_the_default_and_fake_paths(kwargs, match):
    """What the Triton launch relies on is checked before it, from metadata (so on meta tensors too)."""
    from l2m_fast.ops.sample import _check_metadata

    args = dict(theta=torch.zeros(5), v=torch.ones(5), a=torch.ones(1), b=torch.ones(1),
                bounds=torch.tensor([0, 5]), sample_offset=0, element_offset=0, out=torch.empty(2, 5))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        _check_metadata(**args)
    if "out" in kwargs and kwargs["out"].device.type == "meta":
        with pytest.raises(ValueError, match=match):
            torch.ops.l2m_fast.sample_diag_gaussian_out(
                args["theta"], args["v"], args["a"], args["b"], args["bounds"], 1, 0, 0, args["out"]
            )
