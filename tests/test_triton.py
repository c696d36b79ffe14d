"""Triton sampler vs the reference (DESIGN section 3).

Without CUDA the kernels run on the CPU in Triton's interpreter, in a child pytest started with
``TRITON_INTERPRET=1`` (see ``test_interpreter_subprocess``); with CUDA the same tests run natively
in this process. Tests marked ``gpu`` need CUDA. On GPU the tests launch with a fixed block (few
compilations); the autotuned path has its own tests.

Tolerances (float32 output, stated against the reference):
* Philox words and uniforms: bit-identical.
* normals ``z``: ``|z - z_ref| <= 2e-6`` (a few float32 ulp at ``|z| <= 5.77``: the interpreter's
  numpy and libdevice transcendentals differ from PyTorch's by an ulp or two); the "fast" GPU mode
  (hardware sin/cos approximations, abs. error <= 2^-20.9 times ``rad <= 5.77``): ``|z - z_ref| <= 2e-5``.
* samples ``theta + sigma z``: ``atol = 2e-6 * max(sigma) + 1e-6``, ``rtol = 1e-6``; bfloat16 and
  float16: one ulp of the output dtype (the float32 values may sit either side of a rounding tie).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from l2m_fast.ops.reference import normals_ref, philox4x32_ref, sample_diag_gaussian_ref

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
ROOT = Path(__file__).resolve().parents[1]

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from l2m_fast.ops import triton_kernel as tk  # noqa: E402
from l2m_fast.ops import triton_segments as ts  # noqa: E402

# Kernels run natively with CUDA, else in the interpreter, which must be on before triton is first
# imported (Triton's own @jit helpers such as tl.philox are built at import). A plain `pytest` run
# imports triton long before this module, so there the kernel tests run in a child pytest with
# TRITON_INTERPRET=1 (test_interpreter_subprocess) and are skipped in the parent.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
RUN_KERNELS = CUDA or INTERPRETED
needs_kernels = pytest.mark.skipif(
    not RUN_KERNELS, reason="runs in the TRITON_INTERPRET child (test_interpreter_subprocess)"
)
parent_only = pytest.mark.skipif(INTERPRETED, reason="runs in the parent process")
_philox_quad = tk._philox_quad


@triton.jit
def _philox_words_kernel(out_ptr, seed, element_offset, q, n, BLOCK: tl.constexpr):
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m = j < n
    r0, r1, r2, r3 = _philox_quad(seed, tl.cast(element_offset, tl.int64) + j, (j * 0 + q).to(tl.uint32))
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


@pytest.mark.skipif(RUN_KERNELS, reason="kernels run in this process")
def test_interpreter_subprocess() -> None:
    """Runs this module's kernel tests on the CPU in Triton's interpreter, in a fresh process."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", str(Path(__file__))]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


U64 = 1 << 64
Z_ATOL = 2e-6
Z_ATOL_FAST = 2e-5
# dtype with its relative tolerance: float32 a few ulp; bfloat16 / float16 one output ulp
DTYPE_TOL = [(torch.float32, 1e-6), (torch.bfloat16, 2.0**-7), (torch.float16, 2.0**-10)]


def _launch(*args: object, block: int = 128, **kwargs: object) -> None:
    """The flat launcher with a fixed block: one compilation per specialization on GPU, no autotuning."""
    tk.sample_diag_gaussian_triton(*args, block=block, **kwargs)


def _launch_segments(*args: object, **kwargs: object) -> None:
    ts.sample_into_segments(*args, block=128, **kwargs)


def _signed(seed: int) -> int:
    return seed - U64 if seed >= 1 << 63 else seed


def _inputs(p: int, g: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed + p)
    theta = torch.randn(p, generator=gen)
    v = torch.rand(p, generator=gen) * 2.0
    a = torch.rand(g, generator=gen) + 0.5
    b = torch.rand(g, generator=gen) + 0.1
    cuts = sorted(torch.randint(0, p + 1, (g - 1,), generator=gen).tolist())
    bounds = torch.tensor([0, *cuts, p], dtype=torch.int64)
    return tuple(t.to(DEVICE) for t in (theta, v, a, b, bounds))


def _assert_samples_close(
    out: torch.Tensor, ref: torch.Tensor, sigma_max: float, rtol: float, z_atol: float = Z_ATOL
) -> None:
    atol = z_atol * sigma_max + 1e-6
    torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), rtol=rtol, atol=atol)


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
        _philox_raw_kernel[(1,)](out, _signed(seed), *ctr)
        assert [w & 0xFFFFFFFF for w in out.tolist()] == list(want)


@needs_kernels
@pytest.mark.parametrize("seed", [0, 12345, (1 << 63) + 7, U64 - 1])
@pytest.mark.parametrize("element_offset", [0, (1 << 32) - 3, (1 << 40) + 11])
def test_philox_words_identical(seed: int, element_offset: int) -> None:
    n, q = 37, 5
    out = torch.empty(n, 4, dtype=torch.int64, device=DEVICE)
    _philox_words_kernel[(triton.cdiv(n, 16),)](out, _signed(seed), element_offset, q, n, BLOCK=16)
    idx = torch.arange(element_offset, element_offset + n, dtype=torch.int64)
    ref = philox4x32_ref(
        idx & 0xFFFFFFFF, idx >> 32, torch.full_like(idx, q), torch.zeros_like(idx), (seed & 0xFFFFFFFF, seed >> 32)
    )
    assert torch.equal(out.cpu() & 0xFFFFFFFF, torch.stack(ref, dim=1))


@needs_kernels
@pytest.mark.parametrize("sample_offset", [0, 1, 6])
@pytest.mark.parametrize("num_samples", [1, 3, 8])
def test_normals_match_reference(sample_offset: int, num_samples: int) -> None:
    p = 130
    zeros, ones = torch.zeros(p, device=DEVICE), torch.ones(1, device=DEVICE)
    out = torch.empty(num_samples, p, device=DEVICE)
    bounds = torch.tensor([0, p], device=DEVICE)
    _launch(zeros, zeros, ones, ones, bounds, 99, sample_offset, 5, out)
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
    if p == 4097 and (num_samples != 5 or dtype != torch.float32):
        pytest.skip("the largest size once: the interpreter is slow")
    theta, v, a, b, bounds = _inputs(p, g)
    seed, eo = (1 << 63) + 2024, 17
    out = torch.empty(num_samples, p, dtype=dtype, device=DEVICE)
    _launch(theta, v, a, b, bounds, _signed(seed), sample_offset, eo, out)
    ref = torch.empty_like(out)
    sample_diag_gaussian_ref(theta, v, a, b, bounds, _signed(seed), sample_offset, eo, ref)
    sigma_max = float((1.0 / torch.sqrt(a.min() * v.min() + b.min())).max())
    _assert_samples_close(out, ref, sigma_max, rtol)


@needs_kernels
def test_chunks_agree_bitwise() -> None:
    """Samples depend only on (seed, i, s): chunking samples or elements changes no bit."""
    p, s = 203, 8
    theta, v, a, b, bounds = _inputs(p, 2)
    whole = torch.empty(s, p, device=DEVICE)
    _launch(theta, v, a, b, bounds, 7, 0, 1000, whole)
    for lo, hi in [(0, 3), (3, 5), (5, 8)]:
        part = torch.empty(hi - lo, p, device=DEVICE)
        _launch(theta, v, a, b, bounds, 7, lo, 1000, part)
        assert torch.equal(part, whole[lo:hi])
    cut = int(bounds[1])
    left = torch.empty(s, cut, device=DEVICE)
    one = torch.tensor([0, cut], device=DEVICE)
    _launch(theta[:cut], v[:cut], a[:1], b[:1], one, 7, 0, 1000, left)
    assert torch.equal(left, whole[:, :cut])
    other = torch.empty(s, p, device=DEVICE)
    _launch(theta, v, a, b, bounds, 7, 0, 1000, other, block=64)
    assert torch.equal(other, whole)


@needs_kernels
@pytest.mark.parametrize("element_offset", [(1 << 32) - 40, (1 << 33) + 5, (1 << 62)])
def test_64bit_element_index(element_offset: int) -> None:
    p = 80
    theta, v, a, b, bounds = _inputs(p)
    out = torch.empty(4, p, device=DEVICE)
    _launch(theta, v, a, b, bounds, -3, 2, element_offset, out)
    ref = torch.empty_like(out)
    sample_diag_gaussian_ref(theta, v, a, b, bounds, -3, 2, element_offset, ref)
    _assert_samples_close(out, ref, float((1.0 / torch.sqrt(b)).max()), 1e-6)
    # the high word matters: a 32-bit index would repeat the samples of index i - 2^32
    c = max(0, (1 << 32) - element_offset)
    low = torch.empty(4, p - c, device=DEVICE)
    one = torch.tensor([0, p - c], device=DEVICE)
    _launch(theta[c:], v[c:], a, b, one, -3, 2, element_offset + c - (1 << 32), low)
    assert not torch.isclose(low, out[:, c:]).any()


@parent_only
def test_op_dispatch_on_this_device() -> None:
    """The registered op: Triton on CUDA, the reference elsewhere (no Triton launch on CPU tensors)."""
    from l2m_fast.ops.sample import sample_diag_gaussian_out

    theta, v, a, b, bounds = (t.cpu() for t in _inputs(50, 2))
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


def _segment_inputs(shapes: list[tuple[int, ...]], num_samples: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    thetas = [torch.randn(sh, generator=gen).to(DEVICE) for sh in shapes]
    vs = [torch.rand(sh, generator=gen).to(DEVICE) for sh in shapes]
    outs = [torch.empty((num_samples, *sh), dtype=dtype, device=DEVICE) for sh in shapes]
    return thetas, vs, outs


@needs_kernels
@pytest.mark.parametrize(("dtype", "rtol"), DTYPE_TOL[:2])
@pytest.mark.parametrize(("num_samples", "sample_offset"), [(1, 0), (6, 3)])
def test_segments_match_reference(dtype: torch.dtype, rtol: float, num_samples: int, sample_offset: int) -> None:
    shapes = [(3, 4), (7,), (0,), (1,), (5, 5), (130,), (2, 1, 3)]
    thetas, vs, outs = _segment_inputs(shapes, num_samples, dtype)
    refs = [torch.empty_like(o) for o in outs]
    kw = {
        "a": [1.0, 2.0],
        "b": [0.5, 0.1],
        "groups": [0, 1, 0, 1, 1, 0, 1],
        "seed": (1 << 63) + 5,
        "sample_offset": sample_offset,
        "element_offsets": [(1 << 32) - 10 + 100 * k for k in range(len(shapes))],
    }
    _launch_segments(thetas, vs, outs, **kw)
    ts.sample_into_segments_ref(thetas, vs, refs, **kw)
    for o, r in zip(outs, refs, strict=True):
        _assert_samples_close(o, r, 1.0 / 0.1**0.5, rtol)


@needs_kernels
def test_segments_equal_flat_op_bitwise() -> None:
    """Default offsets lay the tensors back to back: the result is the flat kernel's, bit for bit."""
    shapes = [(4, 3), (1,), (9,), (2, 5)]
    thetas, vs, outs = _segment_inputs(shapes, 5, torch.float32, seed=1)
    _launch_segments(thetas, vs, outs, a=1.5, b=0.25, seed=11, sample_offset=2)
    flat = torch.empty(5, sum(t.numel() for t in thetas), device=DEVICE)
    one, quarter = torch.full((1,), 1.5, device=DEVICE), torch.full((1,), 0.25, device=DEVICE)
    bounds = torch.tensor([0, flat.shape[1]], device=DEVICE)
    _launch(
        torch.cat([t.reshape(-1) for t in thetas]),
        torch.cat([v.reshape(-1) for v in vs]),
        one,
        quarter,
        bounds,
        11,
        2,
        0,
        flat,
    )
    assert torch.equal(torch.cat([o.reshape(5, -1) for o in outs], dim=1), flat)


@needs_kernels
def test_segments_many_tensors_in_place() -> None:
    """A model-like list of 150 tensors, one sample written into the tensors themselves, one launch."""
    shapes = [(k % 7 + 1,) if k % 3 else (2, k % 5 + 1) for k in range(150)]
    thetas, vs, _ = _segment_inputs(shapes, 1, torch.float32, seed=2)
    live = [t.clone() for t in thetas]
    table = ts.segment_table(live, vs, live, groups=[k % 4 for k in range(150)])
    assert table.table.shape == (150, 5)
    kw = {"a": [1.0, 2.0, 3.0, 4.0], "b": [1.0, 0.5, 0.25, 2.0], "groups": [k % 4 for k in range(150)], "seed": 3}
    _launch_segments(live, vs, live, table=table, **kw)
    refs = [t.clone().unsqueeze(0) for t in thetas]
    ts.sample_into_segments_ref(thetas, vs, refs, **kw)
    for o, r in zip(live, refs, strict=True):
        _assert_samples_close(o, r[0], 2.0, 1e-6)


_SM90_VARIANTS = [
    # (kernel, output pointer type, constexprs): S = 1 and G = 1 arrive as constexprs; bf16 + fast math; segments
    ("flat", "*fp32", {"num_samples": 1, "num_segments": 1, "BLOCK": 1024, "SEG_STEPS": 0, "MATH": 1}),
    ("flat", "*bf16", {"BLOCK": 512, "SEG_STEPS": 3, "MATH": 2}),
    ("segments", None, {"OUT_DTYPE": tl.bfloat16, "BLOCK": 1024, "TAB_STEPS": 8, "MATH": 1}),
]


@parent_only
@pytest.mark.parametrize(("which", "out_type", "consts"), _SM90_VARIANTS)
def test_kernels_compile_for_sm90(which: str, out_type: str | None, consts: dict) -> None:
    """The GPU code path compiles to PTX and through ptxas for sm_90 (H100/H200) without a GPU."""
    if tk.interpret_mode():
        pytest.skip("kernels were built for the interpreter")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        pytest.skip(f"this Triton lacks the ahead-of-time API: {exc}")
    if which == "flat":
        fn = tk._sample_diag_gaussian_kernel
        types = ["*fp32"] * 4 + ["*i64", out_type, "i32", "i32", "i32", "i64", "i32", "i64"]
    else:
        fn = ts._sample_into_segments_kernel
        types = ["*i64", "*i64", "*fp32", "*fp32", "i32", "i32", "i32", "i64", "i32"]
    names = list(fn.arg_names)
    sig = {n: ("constexpr" if n in consts or i >= len(types) else types[i]) for i, n in enumerate(names)}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
    ptx = kernel.asm["ptx"]
    assert "st.global.cs" in ptx  # streaming stores
    assert ("sin.approx.f32" in ptx) == (consts["MATH"] == 2)


@parent_only
def test_segments_reject_bad_lists() -> None:
    thetas, vs, outs = _segment_inputs([(3,), (4,)], 2, torch.float32)
    with pytest.raises(ValueError, match="samples"):
        ts.segment_table(thetas, vs, [outs[0], torch.empty(3, 4, device=DEVICE)])
    big = torch.randn(2, 3, device=DEVICE)
    with pytest.raises(ValueError, match="alias"):
        ts.segment_table([big[0]], vs[:1], [big])
    with pytest.raises(TypeError, match="float32"):
        ts.segment_table([thetas[0].double()], vs[:1], outs[:1])


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


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_op_and_compile_use_triton() -> None:
    """On CUDA the op runs the Triton kernel, eager and under torch.compile (Inductor), bit-identically."""
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

    def f(theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty(6, p, device="cuda")
        torch.ops.l2m_fast.sample_diag_gaussian_out(theta, v, a, b, bounds, 5, 3, kw["element_offset"], out)
        return out

    assert torch.equal(torch.compile(f, fullgraph=True)(theta, v), eager)
    ref = torch.empty_like(eager)
    sample_diag_gaussian_ref(theta, v, a, b, bounds, 5, 3, kw["element_offset"], ref)
    _assert_samples_close(eager, ref, 1.0 / 0.1**0.5, 1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize(("math_mode", "z_atol"), [("precise", Z_ATOL), ("portable", Z_ATOL), ("fast", Z_ATOL_FAST)])
def test_gpu_math_modes(math_mode: str, z_atol: float) -> None:
    """Stated bounds: precise (libdevice) and portable |dz| <= 2e-6; fast (sin/cos.approx) |dz| <= 2e-5."""
    p, s = 1 << 16, 8
    zeros, ones = torch.zeros(p, device="cuda"), torch.ones(1, device="cuda")
    out = torch.empty(s, p, device="cuda")
    tk.sample_diag_gaussian_triton(
        zeros, zeros, ones, ones, torch.tensor([0, p], device="cuda"), 1, 0, 0, out, math_mode=math_mode
    )
    ref = normals_ref(p, s, 1, device="cuda")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=0.0, atol=z_atol)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_autotuned_segments_bf16() -> None:
    shapes = [(k % 300 + 1, 3) for k in range(120)]
    thetas, vs, outs = _segment_inputs(shapes, 4, torch.bfloat16)
    refs = [torch.empty_like(o) for o in outs]
    ts.sample_into_segments(thetas, vs, outs, a=2.0, b=0.5, seed=9)
    ts.sample_into_segments_ref(thetas, vs, refs, a=2.0, b=0.5, seed=9)
    for o, r in zip(outs, refs, strict=True):
        _assert_samples_close(o, r, 2.0**0.5, 2.0**-7)
