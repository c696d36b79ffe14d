"""Flat Triton sampler vs the reference (:mod:`l2m_fast.ops.reference`), on the CPU interpreter or a GPU.

Philox words, the precise math checked exhaustively, samples against the reference for odd sizes,
offsets and dtypes, chunking invariances, dispatch and compilation. Set-up and tolerances:
``triton_testing.py``; the segment kernel and tuning: ``test_triton_segments.py``. Tests marked
``gpu`` need CUDA; without it the kernel tests run in the interpreter child below.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from l2m_fast.ops.reference import normals_ref, philox4x32_ref, sample_diag_gaussian_ref

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton_testing import (  # noqa: E402
    DEVICE,
    DTYPE_TOL,
    ROOT,
    RUN_KERNELS,
    U64,
    Z_ATOL,
    Z_ATOL_FAST,
    assert_samples_close,
    inputs,
    launch,
    needs_cuda,
    needs_kernels,
    parent_only,
    sigma_max,
    signed,
)

from l2m_fast.ops import triton_device as td  # noqa: E402
from l2m_fast.ops import triton_kernel as tk  # noqa: E402


@triton.jit
def _philox_words_kernel(out_ptr, seed, element_offset, q, n, BLOCK: tl.constexpr):
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m = j < n
    i = tl.cast(element_offset, tl.int64) + j
    r0, r1, r2, r3 = td.philox_quad(seed, i.to(tl.uint32), (i >> 32).to(tl.uint32), tl.cast(q, tl.uint32))
    tl.store(out_ptr + 4 * j, r0.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * j + 1, r1.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * j + 2, r2.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * j + 3, r3.to(tl.int64), mask=m)


@triton.jit
def _philox_raw_kernel(out_ptr, seed, c0, c1, c2, c3):
    z = tl.zeros((1,), dtype=tl.uint32)
    w0, w1, w2, w3 = (z + c0).to(tl.uint32), (z + c1).to(tl.uint32), (z + c2).to(tl.uint32), (z + c3).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(tl.cast(seed, tl.int64), w0, w1, w2, w3)
    tl.store(out_ptr + tl.arange(0, 1), r0.to(tl.int64))
    tl.store(out_ptr + 1 + tl.arange(0, 1), r1.to(tl.int64))
    tl.store(out_ptr + 2 + tl.arange(0, 1), r2.to(tl.int64))
    tl.store(out_ptr + 3 + tl.arange(0, 1), r3.to(tl.int64))


@triton.jit
def _radius_kernel(out_l, out_r, BLOCK: tl.constexpr):
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    r = (k.to(tl.uint32) << 8) | 0x5A  # r >> 8 = k: every 24-bit uniform once
    tl.store(out_l + k, td.neg2_log_uniform(r))
    tl.store(out_r + k, td.radius(r, 1))


@triton.jit
def _angle_kernel(out_c, out_s, r_a, BLOCK: tl.constexpr):
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    r_b = (k.to(tl.uint32) << 8) | 0xA5
    rad, x = td.bm_prepare(r_b * 0 + r_a, r_b, 1)
    tl.store(out_c + k, td.bm_cos(rad, x, 1))
    tl.store(out_s + k, td.bm_sin(rad, x, 1))


@triton.jit
def _sigma_kernel(p_ptr, out_ptr, BLOCK: tl.constexpr):
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + k, td.inv_sqrt_rn(tl.load(p_ptr + k)))


@pytest.mark.skipif(RUN_KERNELS, reason="kernels run in this process")
def test_interpreter_subprocess() -> None:
    """Runs the kernel tests of this module and of test_triton_segments.py in the CPU interpreter, in a new process."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    files = [str(Path(__file__)), str(Path(__file__).with_name("test_triton_segments.py"))]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", *files]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


# ---------------------------------------------------------------------------------------------- Philox


@needs_kernels
def test_philox_known_answers() -> None:
    """tl.philox with the contract's key split reproduces the Random123 known answers."""
    cases = [
        (0, (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        (U64 - 1, (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            0x299F31D0_A4093822,
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for seed, ctr, want in cases:
        out = torch.zeros(4, dtype=torch.int64, device=DEVICE)
        _philox_raw_kernel[(1,)](out, signed(seed), *ctr)
        assert [w & 0xFFFFFFFF for w in out.tolist()] == list(want)


@needs_kernels
@pytest.mark.parametrize("seed", [0, 12345, (1 << 63) + 7, U64 - 1])
@pytest.mark.parametrize("element_offset", [0, (1 << 32) - 3, (1 << 40) + 11])
def test_philox_words_identical(seed: int, element_offset: int) -> None:
    """The kernels' own Philox (widening multiplies, scalar first round) gives the reference's words."""
    n, q = 37, 5
    out = torch.empty(n, 4, dtype=torch.int64, device=DEVICE)
    _philox_words_kernel[(triton.cdiv(n, 16),)](out, signed(seed), element_offset, q, n, BLOCK=16)
    idx = torch.arange(element_offset, element_offset + n, dtype=torch.int64)
    ref = philox4x32_ref(
        idx & 0xFFFFFFFF, idx >> 32, torch.full_like(idx, q), torch.zeros_like(idx), (seed & 0xFFFFFFFF, seed >> 32)
    )
    assert torch.equal(out.cpu() & 0xFFFFFFFF, torch.stack(ref, dim=1))


# ------------------------------------------------------------------------------- precise math, exhaustive

_ALL = 1 << 24
_CHUNK = 1 << 20


@needs_kernels
def test_precise_radius_every_uniform() -> None:
    """All 2^24 values of ua: -2 ln ua within 1.5e-7 relative, its square root IEEE, the radius within 4.8e-7.

    The reference's own float32 sqrt(-2 log ua) (PyTorch on the CPU) is not correctly rounded; the
    kernel's square root is (checked against numpy's).
    """
    neg2log, rad = torch.empty(_ALL, device=DEVICE), torch.empty(_ALL, device=DEVICE)
    _radius_kernel[(_ALL // _CHUNK,)](neg2log, rad, BLOCK=_CHUNK)
    neg2log, rad = neg2log.cpu(), rad.cpu()
    ua = (torch.arange(_ALL, dtype=torch.float64) + 1) * 2.0**-24
    exact = -2.0 * torch.log(ua)
    pos = exact > 0
    assert float(((neg2log.double() - exact).abs()[pos] / exact[pos]).max()) <= 1.5e-7
    assert np.array_equal(rad.numpy(), np.sqrt(neg2log.numpy()))
    rad_ref = torch.sqrt(-2.0 * torch.log(ua.float()))
    assert float((rad - rad_ref).abs().max()) <= 4.8e-7


@needs_kernels
def test_precise_angles_every_uniform_at_the_largest_radius() -> None:
    """All 2^24 values of ub at rad = sqrt(-2 ln 2^-24) = 5.77: cos and sin rows within 1e-6 of the reference."""
    zc, zs = torch.empty(_ALL, device=DEVICE), torch.empty(_ALL, device=DEVICE)
    _angle_kernel[(_ALL // _CHUNK,)](zc, zs, 0xFF, BLOCK=_CHUNK)  # r_a >> 8 = 0: ua = 2^-24
    ang = torch.arange(_ALL, dtype=torch.float32) * 2.0**-24 * 6.283185307179586
    rad = torch.sqrt(-2.0 * torch.log(torch.tensor(2.0**-24)))
    assert float((zc.cpu() - rad * torch.cos(ang)).abs().max()) <= 1e-6
    assert float((zs.cpu() - rad * torch.sin(ang)).abs().max()) <= 1e-6


@needs_kernels
def test_sigma_is_ieee() -> None:
    """sigma = RN(1 / RN(sqrt(p))) bit for bit over precisions spread log-uniformly on [1e-30, 1e35]."""
    n = 1 << 16
    gen = torch.Generator().manual_seed(3)
    p = torch.exp(torch.empty(n).uniform_(-69.0, 80.0, generator=gen)).float()
    out = torch.empty(n, device=DEVICE)
    _sigma_kernel[(n // 1024,)](p.to(DEVICE), out, BLOCK=1024)
    pn = p.numpy()
    assert np.array_equal(out.cpu().numpy(), np.float32(1.0) / np.sqrt(pn))


# ----------------------------------------------------------------------------------- samples vs reference


@needs_kernels
@pytest.mark.parametrize("math_mode", ["precise", "portable"])
@pytest.mark.parametrize(("sample_offset", "num_samples"), [(0, 1), (1, 3), (6, 8), (3, 1)])
def test_normals_match_reference(math_mode: str, sample_offset: int, num_samples: int) -> None:
    p = 130
    zeros, ones = torch.zeros(p, device=DEVICE), torch.ones(1, device=DEVICE)
    out = torch.empty(num_samples, p, device=DEVICE)
    bounds = torch.tensor([0, p], device=DEVICE)
    launch(zeros, zeros, ones, ones, bounds, 99, sample_offset, 5, out, math_mode=math_mode)
    ref = normals_ref(p, num_samples, 99, sample_offset, 5)
    assert out.abs().max().item() <= 5.78
    torch.testing.assert_close(out.cpu(), ref, rtol=0.0, atol=Z_ATOL)


@needs_kernels
@pytest.mark.parametrize(("dtype", "rtol"), DTYPE_TOL)
@pytest.mark.parametrize(("p", "g"), [(1, 1), (7, 1), (300, 3), (4097, 5)])
@pytest.mark.parametrize(("num_samples", "sample_offset"), [(1, 0), (5, 3), (8, 0)])
def test_samples_match_reference(
    dtype: torch.dtype, rtol: float, p: int, g: int, num_samples: int, sample_offset: int
) -> None:
    """Odd sizes (no 16-byte rows: scalar stores; S = 1: vector body and scalar tail), partial quads."""
    if p == 4097 and (num_samples == 8 or dtype == torch.float16):
        pytest.skip("the largest size twice: the interpreter is slow")
    theta, v, a, b, bounds = inputs(p, g)
    seed, eo = (1 << 63) + 2024, (1 << 32) + 17
    out = torch.full((num_samples, p), float("nan"), dtype=dtype, device=DEVICE)
    launch(theta, v, a, b, bounds, signed(seed), sample_offset, eo, out)
    ref = torch.empty_like(out)
    sample_diag_gaussian_ref(theta, v, a, b, bounds, signed(seed), sample_offset, eo, ref)
    assert_samples_close(out, ref, sigma_max(a, v, b), rtol)


@needs_kernels
def test_misaligned_output_takes_the_scalar_path() -> None:
    """An output starting off a 16-byte boundary (a view at offset 1) is written correctly."""
    p, s = 96, 6
    theta, v, a, b, bounds = inputs(p)
    buf = torch.full((s * p + 1,), float("nan"), device=DEVICE)
    out = buf[1:].view(s, p)
    assert not tk.base_aligned(out) and tk.row_plan(out, s, p, tk.base_aligned(out)).vec == 1
    launch(theta, v, a, b, bounds, 4, 2, 0, out)
    ref = torch.empty(s, p, device=DEVICE)
    sample_diag_gaussian_ref(theta, v, a, b, bounds, 4, 2, 0, ref)
    assert torch.isnan(buf[0])
    assert_samples_close(out, ref, sigma_max(a, v, b), 1e-6)


@needs_kernels
def test_chunks_agree_bitwise(monkeypatch: pytest.MonkeyPatch) -> None:
    """Samples depend only on (seed, i, s): chunking samples, elements, blocks or the grid changes no bit."""
    p, s = 203, 8
    theta, v, a, b, bounds = inputs(p, 2)
    whole = torch.empty(s, p, device=DEVICE)
    launch(theta, v, a, b, bounds, 7, 0, 1000, whole)
    for lo, hi in [(0, 3), (3, 5), (5, 8), (6, 7)]:
        part = torch.empty(hi - lo, p, device=DEVICE)
        launch(theta, v, a, b, bounds, 7, lo, 1000, part)
        assert torch.equal(part, whole[lo:hi])
    cut = int(bounds[1])
    left = torch.empty(s, cut, device=DEVICE)
    one = torch.tensor([0, cut], device=DEVICE)
    launch(theta[:cut], v[:cut], a[:1], b[:1], one, 7, 0, 1000, left)
    assert torch.equal(left, whole[:, :cut])
    other = torch.empty(s, p, device=DEVICE)
    launch(theta, v, a, b, bounds, 7, 0, 1000, other, block=64)
    assert torch.equal(other, whole)
    # one program walking every block (S = 1) or one per quad (S > 1), and the default grid
    row = torch.empty(1, p, device=DEVICE)
    launch(theta, v, a, b, bounds, 7, 5, 1000, row, block=32)
    assert torch.equal(row[0], whole[5])
    for per_sm in (1, 64):
        monkeypatch.setattr(tk, "_PROGRAMS_PER_SM", per_sm)
        again = torch.empty(s, p, device=DEVICE)
        launch(theta, v, a, b, bounds, 7, 0, 1000, again, block=32)
        assert torch.equal(again, whole)
        row2 = torch.empty(1, p, device=DEVICE)
        launch(theta, v, a, b, bounds, 7, 5, 1000, row2, block=32)
        assert torch.equal(row2, row)


@needs_kernels
@pytest.mark.parametrize("element_offset", [(1 << 32) - 40, (1 << 33) + 5, (1 << 62)])
def test_64bit_element_index(element_offset: int) -> None:
    p = 80
    theta, v, a, b, bounds = inputs(p)
    out = torch.empty(4, p, device=DEVICE)
    launch(theta, v, a, b, bounds, -3, 2, element_offset, out)
    ref = torch.empty_like(out)
    sample_diag_gaussian_ref(theta, v, a, b, bounds, -3, 2, element_offset, ref)
    assert_samples_close(out, ref, float((1.0 / torch.sqrt(b)).max()), 1e-6)
    # the high word matters: a 32-bit index would repeat the samples of index i - 2^32
    c = max(0, (1 << 32) - element_offset)
    low = torch.empty(4, p - c, device=DEVICE)
    one = torch.tensor([0, p - c], device=DEVICE)
    launch(theta[c:], v[c:], a, b, one, -3, 2, element_offset + c - (1 << 32), low)
    assert not torch.isclose(low, out[:, c:]).any()


# ----------------------------------------------------------------------------- dispatch and compilation


@parent_only
def test_op_dispatch_on_this_device() -> None:
    """The registered op: Triton on CUDA, the reference elsewhere (no Triton launch on CPU tensors)."""
    from l2m_fast.ops.sample import sample_diag_gaussian_out

    theta, v, a, b, bounds = (t.cpu() for t in inputs(50, 2))
    out, ref = torch.empty(3, 50), torch.empty(3, 50)
    sample_diag_gaussian_out(theta, v, a, b, bounds, 5, 1, 2, out)
    sample_diag_gaussian_ref(theta, v, a, b, bounds, 5, 1, 2, ref)
    if "cpu" not in sample_diag_gaussian_out._backend_fns:
        assert torch.equal(out, ref)
    else:  # a compiled CPU kernel is registered: it honours the same contract
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)
    torch.library.opcheck(sample_diag_gaussian_out, (theta, v, a, b, bounds, 5, 1, 2, torch.empty(3, 50)))


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    from l2m_fast.ops.reference import sample_diag_gaussian_ref
    from l2m_fast.ops.sample import sample_diag_gaussian_out

    P = 40
    def f(theta, v, a, b, bounds, out):
        torch.ops.l2m_fast.sample_diag_gaussian_out(theta, v, a, b, bounds, 3, 1, 2, out)
        return out

    # 1. The functional decomposition: Triton kernel on CUDA, opaque op elsewhere (fake tensors).
    for dev, want in (("cuda", "triton_kernel_wrapper_functional"), ("cpu", "auto_functionalized")):
        with FakeTensorMode():
            args = [torch.empty(P, device=dev), torch.empty(P, device=dev), torch.empty(1, device=dev),
                    torch.empty(1, device=dev), torch.empty(2, dtype=torch.int64, device=dev),
                    torch.empty(5, P, device=dev)]
        code = make_fx(dispatch_functionalize(f), tracing_mode="fake")(*args).code
        assert want in code, (dev, code)
        assert ("triton_kernel_wrapper" in code) == (dev == "cuda"), (dev, code)

    # 2. torch.compile on CPU runs the CPU implementation eager mode runs (the C++ kernel once
    #    l2m_fast.ops.cpu registered it, else the reference), and a kernel registered later replaces it.
    theta, v = torch.randn(P), torch.rand(P)
    a, b, bounds = torch.ones(1), torch.full((1,), 0.5), torch.tensor([0, P])
    eager = f(theta, v, a, b, bounds, torch.empty(5, P))
    ref = torch.empty(5, P)
    sample_diag_gaussian_ref(theta, v, a, b, bounds, 3, 1, 2, ref)
    torch.testing.assert_close(eager, ref, rtol=1e-5, atol=1e-5)
    g = lambda th, vv: f(th, vv, a, b, bounds, torch.empty(5, P)) * 2
    assert torch.equal(torch.compile(g, backend="aot_eager", fullgraph=True)(theta, v), eager * 2)
    calls = []
    @sample_diag_gaussian_out.register_kernel("cpu")
    def _(theta, v, a, b, bounds, seed, sample_offset, element_offset, out):
        calls.append(seed)
        out.fill_(7.0)
    torch._dynamo.reset()
    res = torch.compile(g, backend="aot_eager", fullgraph=True)(theta, v)
    assert calls == [3] and bool((res == 14.0).all()), (calls, res)
    """
)


@parent_only
def test_dispatch_under_torch_compile() -> None:
    """triton_op decomposition only on CUDA; a CPU kernel registered later runs under torch.compile.

    In a subprocess: registering a CPU kernel must not leak into other tests, and the CUDA trace
    needs compiled (not interpreted) kernels.
    """
    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


@parent_only
def test_fast_math_needs_a_gpu() -> None:
    assert tk.math_constexpr(None) == tk.MATH_MODES["precise"]
    with pytest.raises(ValueError, match="math_mode"):
        tk.math_constexpr("sloppy")


@parent_only
def test_bench_table_formatting() -> None:
    """benchmarks/bench_gpu.py imports without CUDA and formats its rows (no timing here)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        bench = importlib.import_module("bench_gpu")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    rows = [
        bench.Row("flat", "fused", 1_000_000, 4, "float32", 0.05, 80e6, 1000.0),
        bench.Row("flat", "batched torch", 1_000_000, 4, "float32", 0.2, 80e6, 1000.0),
        bench.Row("model small (146 tensors)", "per-tensor loop", 123, 1, "bfloat16", float("nan"), 1e3, None, "boom"),
    ]
    lines = [bench.format_row(r, {("flat", 1_000_000, 4, "float32"): rows[1]}) for r in rows]
    assert lines[0].startswith("| flat | fused | 1,000,000 | 4 | float32 | 0.05 |")
    assert "1.6" in lines[0] and "4" in lines[0].split("|")[9]  # GB/s 1.6e3, of copy 1.6, x batched 4
    assert "n/a" in lines[2] and lines[2].rstrip().endswith("boom |")
    header = bench.table_header()
    assert all(line.count("|") == lines[0].count("|") for line in header.splitlines()) and "GB/s" in header


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("math_mode", "z_atol"), [("precise", Z_ATOL), ("portable", Z_ATOL), ("fast", Z_ATOL_FAST)])
def test_gpu_math_modes(math_mode: str, z_atol: float) -> None:
    """Stated bounds: precise and portable |dz| <= 2e-6; fast (sin/cos.approx) |dz| <= 2e-5."""
    p, s = 1 << 16, 8
    zeros, ones = torch.zeros(p, device="cuda"), torch.ones(1, device="cuda")
    out = torch.empty(s, p, device="cuda")
    tk.sample_diag_gaussian_triton(
        zeros, zeros, ones, ones, torch.tensor([0, p], device="cuda"), 1, 0, 0, out, math_mode=math_mode
    )
    ref = normals_ref(p, s, 1, device="cuda")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=0.0, atol=z_atol)


_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from l2m_fast.ops import triton_kernel as tk
    p, s, s0, eo = 5000, 7, 3, (1 << 32) + 9
    g = torch.Generator().manual_seed(5)
    theta, v = torch.randn(p, generator=g), torch.rand(p, generator=g)
    out = torch.empty(s, p)
    tk.sample_diag_gaussian_triton(theta, v, torch.ones(1), torch.full((1,), 0.5), torch.tensor([0, p]), 77, s0, eo,
                                   out, block=256)
    torch.save(out, sys.argv[1])
    """
)


@pytest.mark.gpu
@needs_cuda
def test_gpu_precise_equals_interpreter_bitwise(tmp_path: Path) -> None:
    """The precise mode computes the same bits on the GPU as Triton's CPU interpreter."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    path = tmp_path / "interp.pt"
    proc = subprocess.run(
        [sys.executable, "-c", _INTERPRETER_SCRIPT, str(path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cpu = torch.load(path)
    p, s = cpu.shape[1], cpu.shape[0]
    g = torch.Generator().manual_seed(5)
    theta, v = torch.randn(p, generator=g).cuda(), torch.rand(p, generator=g).cuda()
    out = torch.empty(s, p, device="cuda")
    a, b, bounds = torch.ones(1, device="cuda"), torch.full((1,), 0.5, device="cuda"), torch.tensor([0, p]).cuda()
    tk.sample_diag_gaussian_triton(theta, v, a, b, bounds, 77, 3, (1 << 32) + 9, out)
    assert torch.equal(out.cpu(), cpu)


@pytest.mark.gpu
@needs_cuda
def test_gpu_op_and_torch_compile_use_triton() -> None:
    """On CUDA the op runs the Triton kernel, eager and under torch.compile (Inductor), bit-identically.

    Last in the file: torch.compile is the slowest check and the one most likely to fail for
    reasons outside this package.
    """
    from l2m_fast.ops.sample import sample_diag_gaussian

    p = 100_003
    theta, v = torch.randn(p, device="cuda"), torch.rand(p, device="cuda")
    kw = {
        "a": [1.0, 2.0],
        "b": [0.5, 0.1],
        "bounds": [0, 40_000, p],
        "seed": 5,
        "sample_offset": 3,
        "element_offset": (1 << 33) + 1,
    }
    eager = sample_diag_gaussian(theta, v, 6, **kw)
    direct = torch.empty_like(eager)
    a, b = torch.tensor(kw["a"], device="cuda"), torch.tensor(kw["b"], device="cuda")
    bounds = torch.tensor(kw["bounds"], device="cuda")
    tk.sample_diag_gaussian_triton(theta, v, a, b, bounds, 5, 3, kw["element_offset"], direct)
    assert torch.equal(eager, direct)
    ref = torch.empty_like(eager)
    sample_diag_gaussian_ref(theta, v, a, b, bounds, 5, 3, kw["element_offset"], ref)
    assert_samples_close(eager, ref, 1.0 / 0.1**0.5, 1e-6)

    def f(theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty(6, p, device="cuda")
        torch.ops.l2m_fast.sample_diag_gaussian_out(theta, v, a, b, bounds, 5, 3, kw["element_offset"], out)
        return out

    assert torch.equal(torch.compile(f, fullgraph=True)(theta, v), eager)
