"""Segment-table Triton sampler and launch tuning: one launch for many tensors; tuning never on aliased data.

Runs natively with CUDA, else in the interpreter child started by
``test_triton.py::test_interpreter_subprocess`` (set-up and tolerances: ``triton_testing.py``).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
from triton_testing import (  # noqa: E402
    DEVICE,
    DTYPE_TOL,
    RepeatingBench,
    assert_samples_close,
    inputs,
    launch,
    launch_segments,
    needs_cuda,
    needs_kernels,
    parent_only,
    segment_inputs,
    sigma_max,
)

from l2m_fast.ops import triton_kernel as tk  # noqa: E402
from l2m_fast.ops import triton_segments as ts  # noqa: E402
from l2m_fast.ops.reference import sample_diag_gaussian_ref  # noqa: E402

# ------------------------------------------------------------------------- tuning never on aliased data


@pytest.fixture
def forced_tuning(monkeypatch: pytest.MonkeyPatch) -> RepeatingBench:
    bench = RepeatingBench()
    for tuner in (tk.FLAT_TUNER, ts.SEG_TUNER):
        monkeypatch.setattr(tuner, "force", True)
        monkeypatch.setattr(tuner, "bench", bench)
        monkeypatch.setattr(tuner, "cache", {})
    return bench


@needs_kernels
def test_tuning_an_in_place_call_samples_once(forced_tuning: RepeatingBench) -> None:
    """out aliases theta (S = 1): tuning launches every candidate several times, yet theta moves by one sample."""
    p = 300
    theta, v, a, b, bounds = inputs(p)
    before = theta.clone()
    ref = torch.empty(1, p, device=DEVICE)
    sample_diag_gaussian_ref(before, v, a, b, bounds, 11, 0, 0, ref)
    tk.sample_diag_gaussian_triton(theta, v, a, b, bounds, 11, 0, 0, theta.view(1, p))
    assert forced_tuning.calls == len(tk.CONFIGS)  # the tuner really ran, 3 launches per candidate
    assert_samples_close(theta, ref[0], sigma_max(a, v, b), 1e-6)
    # The same tuning on the aliased output itself (what a naive autotuner does) samples 7 times over:
    # this is the failure the scratch buffer prevents, and the check above detects it.
    naive = before.clone()
    for cfg in tk.CONFIGS:
        for _ in range(forced_tuning.reps):
            launch(naive, v, a, b, bounds, 11, 0, 0, naive.view(1, p), block=cfg.block)
    launch(naive, v, a, b, bounds, 11, 0, 0, naive.view(1, p))
    assert not torch.allclose(naive, ref[0], atol=1e-3)


@needs_kernels
def test_tuning_in_place_segments_samples_once(forced_tuning: RepeatingBench) -> None:
    """sample_into_segments on live parameters (outs are thetas): tuning runs on scratch outputs."""
    shapes = [(5, 7), (3,), (64,), (2, 9)]
    thetas, vs, _ = segment_inputs(shapes, 1, torch.float32, seed=4)
    before = [t.clone() for t in thetas]
    refs = [t.clone().unsqueeze(0) for t in thetas]
    ts.sample_into_segments_ref(before, vs, refs, a=2.0, b=0.5, seed=8)
    table = ts.segment_table(thetas, vs, thetas)
    assert table.aliased and not ts.segment_table(before, vs, refs).aliased
    ts.sample_into_segments(thetas, vs, thetas, a=2.0, b=0.5, seed=8, table=table)
    assert forced_tuning.calls == len(ts.SEG_CONFIGS)
    for t, r in zip(thetas, refs, strict=True):
        assert_samples_close(t, r[0], 2.0**0.5, 1e-6)


@parent_only
def test_tuner_caches_and_skips_when_it_cannot_time() -> None:
    tuner = tk.Tuner((tk.LaunchConfig(64, 1), tk.LaunchConfig(128, 1)))
    tuner.bench = lambda fn: 1.0
    assert tuner.pick("k", None) == tuner.configs[0] and "k" not in tuner.cache
    ran: list[tk.LaunchConfig] = []
    tuner.bench = lambda fn: (fn(), 2.0 - len(ran))[1]
    best = tuner.pick("k", ran.append)
    assert ran == list(tuner.configs) and best == tuner.configs[1] and tuner.cache["k"] == best
    assert tuner.pick("k", None) == best
    x = torch.zeros(8)
    assert tk.overlaps(x[2:5], x[4:]) and not tk.overlaps(x[:4], x[4:])


# -------------------------------------------------------------------------------------------- segments


@needs_kernels
@pytest.mark.parametrize(("dtype", "rtol"), DTYPE_TOL[:2])
@pytest.mark.parametrize(("num_samples", "sample_offset"), [(1, 0), (1, 7), (6, 3)])
def test_segments_match_reference(dtype: torch.dtype, rtol: float, num_samples: int, sample_offset: int) -> None:
    """Aligned and unaligned tensors mixed (sizes 12, 7, 0, 1, 25, 130, 6, 64): both paths in one launch."""
    shapes = [(3, 4), (7,), (0,), (1,), (5, 5), (130,), (2, 1, 3), (64,)]
    thetas, vs, outs = segment_inputs(shapes, num_samples, dtype)
    refs = [torch.empty_like(o) for o in outs]
    kw = {
        "a": [1.0, 2.0],
        "b": [0.5, 0.1],
        "groups": [0, 1, 0, 1, 1, 0, 1, 0],
        "seed": (1 << 63) + 5,
        "sample_offset": sample_offset,
        "element_offsets": [(1 << 32) - 10 + 100 * k for k in range(len(shapes))],
    }
    table = ts.segment_table(thetas, vs, outs, groups=kw["groups"], element_offsets=kw["element_offsets"])
    assert table.align_kind == 2
    launch_segments(thetas, vs, outs, **kw)
    ts.sample_into_segments_ref(thetas, vs, refs, **kw)
    for o, r in zip(outs, refs, strict=True):
        assert_samples_close(o, r, 1.0 / 0.1**0.5, rtol)


@needs_kernels
def test_segments_equal_flat_op_bitwise() -> None:
    """Default offsets lay the tensors back to back: the result is the flat kernel's, bit for bit."""
    shapes = [(4, 3), (1,), (9,), (2, 5)]
    thetas, vs, outs = segment_inputs(shapes, 5, torch.float32, seed=1)
    launch_segments(thetas, vs, outs, a=1.5, b=0.25, seed=11, sample_offset=2)
    flat = torch.empty(5, sum(t.numel() for t in thetas), device=DEVICE)
    one, quarter = torch.full((1,), 1.5, device=DEVICE), torch.full((1,), 0.25, device=DEVICE)
    bounds = torch.tensor([0, flat.shape[1]], device=DEVICE)
    cat = (torch.cat([t.reshape(-1) for t in thetas]), torch.cat([v.reshape(-1) for v in vs]))
    launch(*cat, one, quarter, bounds, 11, 2, 0, flat)
    assert torch.equal(torch.cat([o.reshape(5, -1) for o in outs], dim=1), flat)


@needs_kernels
def test_segments_many_tensors_in_place() -> None:
    """A model-like list of 150 tensors, one sample written into the tensors themselves, one launch."""
    shapes = [(k % 7 + 1,) if k % 3 else (2, k % 5 + 1) for k in range(150)]
    thetas, vs, _ = segment_inputs(shapes, 1, torch.float32, seed=2)
    live = [t.clone() for t in thetas]
    table = ts.segment_table(live, vs, live, groups=[k % 4 for k in range(150)])
    assert table.table.shape == (150, 5) and table.aliased
    assert table.program_map(128).shape == (150, 8)  # one program per tensor: each has fewer than 128 elements
    kw = {"a": [1.0, 2.0, 3.0, 4.0], "b": [1.0, 0.5, 0.25, 2.0], "groups": [k % 4 for k in range(150)], "seed": 3}
    launch_segments(live, vs, live, table=table, **kw)
    refs = [t.clone().unsqueeze(0) for t in thetas]
    ts.sample_into_segments_ref(thetas, vs, refs, **kw)
    for o, r in zip(live, refs, strict=True):
        assert_samples_close(o, r[0], 2.0, 1e-6)


@parent_only
def test_program_map_is_built_once_per_block() -> None:
    """One map row per (tensor, block of BLOCK elements): pointers advanced, counts in vector units."""
    thetas, vs, outs = segment_inputs([(300,), (7,), (0,), (64,)], 2, torch.float32)
    table = ts.segment_table(thetas, vs, outs, element_offsets=[10, 500, 600, 700])
    pmap = table.program_map(128)
    assert pmap is table.program_map(128) and table.aligned == (True, False, True)
    rows = pmap.tolist()
    assert len(rows) == 3 + 1 + 1
    th, v, o = thetas[0].data_ptr(), vs[0].data_ptr(), outs[0].data_ptr()
    assert rows[1][:7] == [th + 512, v + 512, o + 512, 138, 0, (300 - 128) // 4, 300 // 4]
    assert rows[3][3:] == [500, 0, 7, 7, 0]


@parent_only
def test_segments_reject_bad_lists() -> None:
    thetas, vs, outs = segment_inputs([(3,), (4,)], 2, torch.float32)
    with pytest.raises(ValueError, match="samples"):
        ts.segment_table(thetas, vs, [outs[0], torch.empty(3, 4, device=DEVICE)])
    big = torch.randn(2, 3, device=DEVICE)
    with pytest.raises(ValueError, match="alias"):
        ts.segment_table([big[0]], vs[:1], [big])
    with pytest.raises(TypeError, match="float32"):
        ts.segment_table([thetas[0].double()], vs[:1], outs[:1])


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@needs_cuda
def test_gpu_tuned_segments_bf16() -> None:
    shapes = [(k % 300 + 1, 3) for k in range(120)]
    thetas, vs, outs = segment_inputs(shapes, 4, torch.bfloat16)
    refs = [torch.empty_like(o) for o in outs]
    ts.sample_into_segments(thetas, vs, outs, a=2.0, b=0.5, seed=9)
    ts.sample_into_segments_ref(thetas, vs, refs, a=2.0, b=0.5, seed=9)
    for o, r in zip(outs, refs, strict=True):
        assert_samples_close(o, r, 2.0**0.5, 2.0**-7)


@pytest.mark.gpu
@needs_cuda
def test_gpu_tuned_in_place_model_samples_once() -> None:
    """The real tuner (CUDA timings) on live parameters: each parameter moves by exactly one sample."""
    shapes = [(768, 768), (768,), (3 * 768, 768), (17,)]
    thetas, vs, _ = segment_inputs(shapes, 1, torch.float32, seed=6)
    before = [t.clone() for t in thetas]
    refs = [t.clone().unsqueeze(0) for t in thetas]
    ts.sample_into_segments_ref(before, vs, refs, a=1.0, b=0.5, seed=21)
    ts.SEG_TUNER.cache.clear()
    ts.sample_into_segments(thetas, vs, thetas, a=1.0, b=0.5, seed=21)
    for t, r in zip(thetas, refs, strict=True):
        assert_samples_close(t, r[0], 2.0**0.5, 1e-6)
    flat, ref = before[0].reshape(-1).clone(), refs[0].reshape(1, -1)
    tk.FLAT_TUNER.cache.clear()
    ones, halves = torch.ones(1, device="cuda"), torch.full((1,), 0.5, device="cuda")
    bounds = torch.tensor([0, flat.numel()], device="cuda")
    tk.sample_diag_gaussian_triton(flat, vs[0].reshape(-1), ones, halves, bounds, 21, 0, 0, flat.view(1, -1))
    assert_samples_close(flat, ref[0], 2.0**0.5, 1e-6)
