"""The fused C++ CPU sampler (csrc/, l2m_fast/ops/cpu.py) against the reference and on bad input.

Accuracy bound: the kernel's Philox words equal the reference's bit for bit; its normals satisfy
|z_kernel - z_ref| <= 2.86 * eps * max(|z_ref|, 1), eps = 2^-23 (one float32 ulp at 1), measured on
3 seeds x 2^22 draws for every ISA (72% of the draws are bit-identical to the reference). The tests
assert _Z_ULPS = 4 of those units. The polynomial log
(Cephes logf) and sin/cos (Cephes sinf/cosf on [-pi/4, pi/4]) are within about 1 ulp of the libm
values; sqrt and the division in sigma are correctly rounded, as in the reference.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from l2m_fast._env import env_flag
from l2m_fast.ops import cpu as cpu_backend
from l2m_fast.ops.reference import normals_ref, philox4x32_ref, sample_diag_gaussian_ref, uniforms_ref
from l2m_fast.ops.sample import sample_diag_gaussian, sample_diag_gaussian_out

_EPS32 = torch.finfo(torch.float32).eps
_Z_ULPS = 4.0
_KNOWN_ANSWERS = [  # Random123 kat_vectors, Philox4x32-10: (key, counter, words)
    ((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 2, (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
_DTYPE_EPS = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.fixture(scope="module")
def ops():
    """``torch.ops.l2m_fast_cpu`` (skips when only the reference is available)."""
    loaded = cpu_backend.load_ops()
    if loaded is None:
        pytest.skip(f"compiled CPU kernel unavailable: {cpu_backend.backend_detail()}")
    return loaded


def _isas(ops) -> list[int]:
    return list(range(int(ops.best_isa()) + 1))


def _signed(seed: int) -> int:
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def _problem(num_elements: int, num_segments: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(num_elements, generator=g)
    v = torch.rand(num_elements, generator=g) * 4.0
    a = torch.rand(num_segments, generator=g) + 0.5
    b = torch.rand(num_segments, generator=g) + 0.1
    inner = torch.randint(0, num_elements + 1, (num_segments - 1,), generator=g).sort().values
    bounds = torch.cat([torch.tensor([0]), inner, torch.tensor([num_elements])])
    return theta, v, a, b, bounds


def _assert_close_to_ref(out: torch.Tensor, ref32: torch.Tensor, theta, v, a, b, bounds, z_ref) -> None:
    seg = torch.searchsorted(bounds[1:], torch.arange(theta.numel()), right=True)
    sigma = 1.0 / torch.sqrt(a[seg] * v + b[seg])
    tol = _Z_ULPS * _EPS32 * sigma * z_ref.abs().clamp(min=1.0) + _EPS32 * ref32.abs()
    tol = tol + _DTYPE_EPS[out.dtype] * ref32.abs()
    diff = (out.float() - ref32).abs()
    assert bool((diff <= tol).all()), f"max excess {float((diff - tol).max())}"


def test_compiled_kernel_in_use() -> None:
    kind = cpu_backend.backend()
    assert kind in ("compiled", "jit", "reference")
    if env_flag("L2M_FAST_REQUIRE_COMPILED"):
        assert kind == "compiled", f"backend is {kind!r}: {cpu_backend.backend_detail()}"


@pytest.mark.parametrize("key,counter,words", _KNOWN_ANSWERS)
def test_philox_known_answers(ops, key, counter, words) -> None:
    seed = _signed(key[0] | (key[1] << 32))
    for isa in _isas(ops):
        got = ops.philox4x32(torch.tensor([counter]), seed, isa)
        assert got.tolist() == [list(words)], f"isa {isa}"


def test_philox_matches_reference(ops) -> None:
    g = torch.Generator().manual_seed(1)
    counters = torch.randint(0, 1 << 32, (1001, 4), generator=g, dtype=torch.int64)
    for key in [(0, 0), (0x12345678, 0x9ABCDEF0), (0xFFFFFFFF, 1)]:
        ref = torch.stack(philox4x32_ref(*counters.unbind(1), key), dim=1)
        for isa in _isas(ops):
            assert torch.equal(ops.philox4x32(counters, _signed(key[0] | key[1] << 32), isa), ref)


@pytest.mark.parametrize("num_elements,num_samples,sample_offset,element_offset", [
    (1 << 16, 16, 0, 0), (4097, 5, 3, (1 << 32) - 3), (7, 3, 6, (1 << 62) + 5),
])
def test_normals_within_stated_ulps(ops, num_elements, num_samples, sample_offset, element_offset) -> None:
    seed = 0xDEADBEEF12345678
    theta, v = torch.zeros(num_elements), torch.zeros(num_elements)
    a, b, bounds = torch.zeros(1), torch.ones(1), torch.tensor([0, num_elements])
    z_ref = normals_ref(num_elements, num_samples, seed, sample_offset, element_offset)
    for isa in _isas(ops):
        z = torch.empty(num_samples, num_elements)
        ops.sample_variant(theta, v, a, b, bounds, _signed(seed), sample_offset, element_offset, z, isa, 0)
        err = (z - z_ref).abs() / (_EPS32 * z_ref.abs().clamp(min=1.0))
        assert float(err.max()) <= _Z_ULPS, f"isa {isa}: {float(err.max())} ulp"
        assert float(z.abs().max()) <= 5.8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_elements", [1, 7, 4097])
@pytest.mark.parametrize("num_samples", [1, 3, 5])
def test_matches_reference(ops, dtype, num_elements, num_samples) -> None:
    theta, v, a, b, bounds = _problem(num_elements, num_segments=3, seed=num_elements)
    for sample_offset, element_offset in [(0, 0), (3, 17), (5, (1 << 32) - 2)]:
        out = sample_diag_gaussian(theta, v, num_samples, a=a, b=b, bounds=bounds, seed=42,
                                   sample_offset=sample_offset, element_offset=element_offset, dtype=dtype)
        ref32 = torch.empty(num_samples, num_elements)
        sample_diag_gaussian_ref(theta, v, a, b, bounds, 42, sample_offset, element_offset, ref32)
        z_ref = normals_ref(num_elements, num_samples, 42, sample_offset, element_offset)
        _assert_close_to_ref(out, ref32, theta, v, a, b, bounds, z_ref)


def test_identical_across_threads_isas_and_chunkings(ops) -> None:
    num_elements, num_samples = 100_003, 13
    theta, v, a, b, bounds = _problem(num_elements, num_segments=5, seed=3)
    args = (theta, v, a, b, bounds, 7)
    whole = torch.empty(num_samples, num_elements)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ops.sample_diag_gaussian_out(*args, 0, 0, whole)
        torch.set_num_threads(2)
        again = torch.empty_like(whole)
        ops.sample_diag_gaussian_out(*args, 0, 0, again)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(whole, again)
    for isa in _isas(ops):
        per_isa = torch.empty_like(whole)
        ops.sample_variant(*args, 0, 0, per_isa, isa, 0)
        assert torch.equal(whole, per_isa), f"isa {isa}"
    for lo, hi in [(0, 1), (1, 6), (6, 7), (7, 13)]:  # sample chunks, not aligned to the groups of four
        part = torch.empty(hi - lo, num_elements)
        ops.sample_diag_gaussian_out(*args, lo, 0, part)
        assert torch.equal(part, whole[lo:hi])
    for lo, hi in [(0, 5), (5, 21), (21, 40_000), (40_000, num_elements)]:  # element shards, odd cuts
        seg = torch.searchsorted(bounds[1:], torch.arange(lo, hi), right=True)
        part = torch.empty(num_samples, hi - lo)
        ops.sample_diag_gaussian_out(theta[lo:hi].contiguous(), v[lo:hi].contiguous(), a[seg].contiguous(),
                                     b[seg].contiguous(), torch.arange(hi - lo + 1), 7, 0, lo, part)
        assert torch.equal(part, whole[:, lo:hi])


def test_partial_groups_match_full_groups(ops) -> None:
    """Every (S, sample_offset mod 4) skips exactly the work of the rows it does not write.

    Twelve samples from offset 0 are three whole groups of four (nothing skipped); any S <= 8 samples
    from any offset inside them must be the same rows bit for bit, on every ISA, with 1 and 2 threads.
    P = 77 has whole super-blocks and a tail on every ISA; the element offset puts a carry of the
    counter's low word inside a block; three segments change (a, b) inside blocks.
    """
    num_elements, element_offset, seed = 77, (1 << 32) - 40, 0x0123456789ABCDEF
    theta, v, a, b, bounds = _problem(num_elements, num_segments=3, seed=8)
    args = (theta, v, a, b, bounds, _signed(seed))
    threads = torch.get_num_threads()
    try:
        for isa in _isas(ops):
            whole = torch.empty(12, num_elements)
            ops.sample_variant(*args, 0, element_offset, whole, isa, 0)
            for num_threads in (1, 2):
                torch.set_num_threads(num_threads)
                for num_samples in range(1, 9):
                    for sample_offset in range(0, 12 - num_samples + 1):
                        part = torch.empty(num_samples, num_elements)
                        ops.sample_variant(*args, sample_offset, element_offset, part, isa, 0)
                        assert torch.equal(part, whole[sample_offset:sample_offset + num_samples]), (
                            f"isa {isa}, {num_threads} thread(s), S={num_samples}, sample_offset={sample_offset}")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("sample_offset", range(4))
@pytest.mark.parametrize("num_samples", [1, 2, 3, 4, 6])
def test_philox_words_of_every_partial_group(ops, num_samples, sample_offset) -> None:
    """The sampler's own Philox (first round specialised, unused words dropped) gives the contract's words.

    Variant 1 (no Box-Muller) writes theta + sigma * u with the uniforms u of the words; theta = 0 and
    sigma = 1 make the output the uniforms, exact in float32: the top 24 bits of each word used.
    """
    num_elements, element_offset, seed = 45, (1 << 32) - 20, 0xFEDCBA9876543210
    zeros = torch.zeros(num_elements)
    a, b, bounds = torch.zeros(1), torch.ones(1), torch.tensor([0, num_elements])
    idx = torch.arange(element_offset, element_offset + num_elements)
    expected = torch.empty(num_samples, num_elements)
    for s in range(num_samples):
        q, w = divmod(sample_offset + s, 4)
        words = philox4x32_ref(idx & 0xFFFFFFFF, idx >> 32, torch.full_like(idx, q), torch.zeros_like(idx),
                               (seed & 0xFFFFFFFF, seed >> 32))
        expected[s] = uniforms_ref(words[w - w % 2], words[w - w % 2 + 1])[w % 2]
    for isa in _isas(ops):
        out = torch.empty(num_samples, num_elements)
        ops.sample_variant(zeros, zeros, a, b, bounds, _signed(seed), sample_offset, element_offset, out, isa, 1)
        assert torch.equal(out, expected), f"isa {isa}"


@pytest.mark.parametrize("num_samples,sample_offset", [(1, 0), (1, 3), (2, 1), (3, 2), (5, 3)])
def test_few_samples_identical_across_threads_and_isas(ops, num_samples, sample_offset) -> None:
    num_elements = 50_021  # several parallel blocks per thread, a tail
    theta, v, a, b, bounds = _problem(num_elements, num_segments=4, seed=num_samples)
    args = (theta, v, a, b, bounds, 99, sample_offset, 123)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.empty(num_samples, num_elements)
        ops.sample_diag_gaussian_out(*args, one)
        torch.set_num_threads(2)
        for isa in _isas(ops):
            two = torch.empty_like(one)
            ops.sample_variant(*args, two, isa, 0)
            assert torch.equal(one, two), f"isa {isa}"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rounding_matches_torch(ops, dtype) -> None:
    # sigma ~ 1e-19 makes out == theta in float32: theta carries the special values to convert.
    specials = [0.0, -0.0, 1.0, 1.00390625, 1.01171875, 1 + 2**-11, 1 + 3 * 2**-11, 65504.0, 65519.0, 65520.0,
                7e4, 3.0e38, -3.0e38, float("inf"), float("-inf"), 6.1e-5, 3e-8, 1e-30, 1.5e-38, 1e-40]
    theta = torch.tensor(specials + torch.randn(37, generator=torch.Generator().manual_seed(5)).tolist())
    v, a, b, bounds = torch.zeros_like(theta), torch.zeros(1), torch.full((1,), 1e38), torch.tensor([0, theta.numel()])
    for isa in _isas(ops):
        out32 = torch.empty(6, theta.numel())
        ops.sample_variant(theta, v, a, b, bounds, 1, 0, 0, out32, isa, 0)
        low = torch.empty(6, theta.numel(), dtype=dtype)
        ops.sample_variant(theta, v, a, b, bounds, 1, 0, 0, low, isa, 0)
        assert torch.equal(low.view(torch.int16), out32.to(dtype).view(torch.int16)), f"isa {isa}"
    nan_v = torch.full_like(theta, float("nan"))  # raw op: no value checks, NaN in, NaN out, no crash
    low = torch.empty(2, theta.numel(), dtype=dtype)
    ops.sample_diag_gaussian_out(theta, nan_v, torch.ones(1), torch.ones(1), bounds, 1, 0, 0, low)
    assert bool(low.isnan().all())


def test_standard_normal_statistics(ops) -> None:
    # Fixed seed, so deterministic; a correct sampler fails each check with probability about 1e-6
    # (KS at alpha = 1e-6; mean and variance beyond 5 standard errors).
    stats = pytest.importorskip("scipy.stats")
    num_elements, num_samples = 8191, 64
    theta, v, a, b, bounds = _problem(num_elements, num_segments=2, seed=9)
    out = sample_diag_gaussian(theta, v, num_samples, a=a, b=b, bounds=bounds, seed=123, sample_offset=2)
    seg = torch.searchsorted(bounds[1:], torch.arange(num_elements), right=True)
    z = ((out - theta) * torch.sqrt(a[seg] * v + b[seg])).double().flatten()
    n = z.numel()
    assert abs(float(z.mean())) < 5 / n**0.5
    assert abs(float(z.var()) - 1) < 5 * (2 / n) ** 0.5
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-6


def _good_args(num_elements: int = 37, num_samples: int = 3):
    theta, v, a, b, bounds = _problem(num_elements, num_segments=2, seed=2)
    return dict(theta=theta, v=v, a=a, b=b, bounds=bounds, seed=1, sample_offset=0, element_offset=0,
                out=torch.empty(num_samples, num_elements))


_BAD_CASES = {
    "theta float64": (dict(theta=torch.zeros(37, dtype=torch.float64)), "theta must be Float"),
    "v too short": (dict(v=torch.zeros(36)), "same number of elements"),
    "theta non-contiguous": (dict(theta=torch.zeros(74)[::2]), "theta must be contiguous"),
    "theta 2-D": (dict(theta=torch.zeros(1, 37)), "theta must be 1-D"),
    "b too long": (dict(b=torch.ones(3)), "one value per segment"),
    "a int": (dict(a=torch.ones(2, dtype=torch.int32)), "a must be Float"),
    "bounds int32": (dict(bounds=torch.tensor([0, 5, 37], dtype=torch.int32)), "bounds must be Long"),
    "bounds wrong length": (dict(bounds=torch.tensor([0, 37])), "G \\+ 1"),
    "bounds not monotone": (dict(bounds=torch.tensor([0, 30, 37]).flip(0).contiguous()), "bounds\\[0\\] must be 0"),
    "bounds decreasing inside": (dict(bounds=torch.tensor([0, 40, 37])), "non-decreasing"),
    "bounds end short": (dict(bounds=torch.tensor([0, 5, 36])), "bounds\\[G\\] must be P"),
    "bounds negative": (dict(bounds=torch.tensor([0, -5, 37])), "non-decreasing"),
    "out too small": (dict(out=torch.empty(3, 36)), "columns"),
    "out 1-D": (dict(out=torch.empty(37)), "2-D"),
    "out non-contiguous": (dict(out=torch.empty(37, 3).t()), "out must be contiguous"),
    "out float64": (dict(out=torch.empty(3, 37, dtype=torch.float64)), "out must be float32"),
    "out int": (dict(out=torch.empty(3, 37, dtype=torch.int32)), "out must be float32"),
    "sample_offset negative": (dict(sample_offset=-1), "sample_offset must be >= 0"),
    "sample index overflow": (dict(sample_offset=(1 << 32) - 2), "2\\^32 sample indices"),
    "element_offset negative": (dict(element_offset=-4), "element_offset must be >= 0"),
    "element index overflow": (dict(element_offset=(1 << 63) - 10), "overflows"),
}
_BAD_RAW_ONLY = {"out on meta": (dict(out=torch.empty(3, 37, device="meta")), "one device")}


@pytest.mark.parametrize("case,entry", [(c, e) for c in _BAD_CASES for e in ("raw_cpp_op", "registered_op")]
                         + [(c, "raw_cpp_op") for c in _BAD_RAW_ONLY])
def test_bad_metadata_raises(ops, case, entry) -> None:
    change, message = {**_BAD_CASES, **_BAD_RAW_ONLY}[case]
    kwargs = {**_good_args(), **change}
    op = ops.sample_diag_gaussian_out if entry == "raw_cpp_op" else sample_diag_gaussian_out
    guard = torch.full((64,), 7.0)  # memory next to the output must stay untouched
    with pytest.raises((RuntimeError, NotImplementedError), match=message):
        op(**kwargs)
    assert bool((guard == 7.0).all())


def test_out_aliasing_input_raises(ops) -> None:
    kwargs = _good_args(num_samples=1)
    kwargs["out"] = kwargs["theta"].view(1, -1)
    with pytest.raises(RuntimeError, match="single memory location"):
        ops.sample_diag_gaussian_out(**kwargs)


@pytest.mark.parametrize("bad_v", [float("nan"), float("inf"), -1.0])
def test_bad_values(ops, bad_v) -> None:
    kwargs = _good_args()
    kwargs["v"][5] = bad_v
    ops.sample_diag_gaussian_out(**kwargs)  # raw op: no crash; samples of element 5 are non-finite or not
    with pytest.raises(ValueError, match="element 5"):
        sample_diag_gaussian(kwargs["theta"], kwargs["v"], 3, a=kwargs["a"], b=kwargs["b"], bounds=kwargs["bounds"])


def test_opcheck(ops) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        kwargs = _good_args()
        kwargs["out"] = kwargs["out"].to(dtype)
        args = tuple(kwargs.values())
        torch.library.opcheck(sample_diag_gaussian_out, args)
        torch.library.opcheck(ops.sample_diag_gaussian_out.default, args)


def test_torch_compile(ops) -> None:
    theta, v, a, b, bounds = _problem(1000, num_segments=2, seed=4)

    def draw(theta, v, a, b, bounds, out):
        sample_diag_gaussian_out(theta, v, a, b, bounds, 5, 4, 100, out)
        return out * 2.0

    eager = draw(theta, v, a, b, bounds, torch.empty(6, 1000))
    compiled = torch.compile(draw, fullgraph=True)(theta, v, a, b, bounds, torch.empty(6, 1000))
    assert torch.equal(eager, compiled)


def test_fallback_warns_once(monkeypatch) -> None:
    monkeypatch.setattr(cpu_backend, "_state", None)
    monkeypatch.delenv("L2M_FAST_FORCE_REFERENCE", raising=False)
    monkeypatch.setattr(cpu_backend, "_try_compiled", lambda: "no l2m_fast._C (test)")
    monkeypatch.setattr(cpu_backend, "_try_jit", lambda: "no compiler (test)")
    theta, v, a, b, bounds = _problem(9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = sample_diag_gaussian(theta, v, 2, a=a, b=b, bounds=bounds, seed=3)
        sample_diag_gaussian(theta, v, 2, a=a, b=b, bounds=bounds, seed=3)
        assert cpu_backend.backend() == "reference"
    assert len([w for w in caught if "l2m_fast" in str(w.message)]) == 1
    assert "no compiler (test)" in cpu_backend.backend_detail()
    ref = torch.empty_like(out)
    sample_diag_gaussian_ref(theta, v, a, b, bounds, 3, 0, 0, ref)
    assert torch.equal(out, ref)


def _run_python(code: str, **env: str) -> str:
    full_env = {**os.environ, **env}
    result = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code], env=full_env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def test_force_reference_env() -> None:
    code = (
        "import torch; from l2m_fast.ops import cpu, sample_diag_gaussian, sample_diag_gaussian_ref\n"
        "t = torch.randn(33); v = torch.rand(33); o = sample_diag_gaussian(t, v, 3, b=1.0, seed=8)\n"
        "r = torch.empty_like(o); sample_diag_gaussian_ref(t, v, torch.ones(1), torch.ones(1), "
        "torch.tensor([0, 33]), 8, 0, 0, r)\n"
        "print(cpu.backend(), torch.equal(o, r))"
    )
    assert _run_python(code, L2M_FAST_FORCE_REFERENCE="1") == "reference True"


def test_import_is_lazy() -> None:
    code = "import sys, l2m_fast.ops as o; print(o.cpu._state is None, 'l2m_fast._C' in sys.modules)"
    assert _run_python(code) == "True False"


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0


@pytest.mark.slow
def test_64bit_output_indexing(ops) -> None:
    num_elements, num_samples = 16, (1 << 28) + 3  # S * P > 2^32 elements (8.6 GB of bfloat16)
    if _available_memory() < 12 << 30:
        pytest.skip("needs 12 GB of available memory")
    theta, v, a, b, bounds = _problem(num_elements, seed=6)
    try:
        out = torch.empty(num_samples, num_elements, dtype=torch.bfloat16)
    except RuntimeError:
        pytest.skip("cannot allocate 8.6 GB")
    ops.sample_diag_gaussian_out(theta, v, a, b, bounds, 11, 0, 0, out)
    tail = torch.empty(5, num_elements, dtype=torch.bfloat16)
    ops.sample_diag_gaussian_out(theta, v, a, b, bounds, 11, num_samples - 5, 0, tail)
    assert torch.equal(out[-5:], tail)
