"""The benchmark harness (l2m_fast/benchmarking.py): timing protocol, bandwidth, labels from what ran."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from l2m_fast import benchmarking as bm
from l2m_fast.ops import cpu as cpu_backend


def test_time_interleaved_warms_up_then_interleaves_rounds() -> None:
    calls: list[str] = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    timings = bm.time_interleaved(fns, rounds=3, min_time_s=0.0)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # one untimed warm-up each, then round after round
    assert all(len(t.times) == 3 and t.inner == 1 for t in timings.values())


def test_short_calls_repeat_within_a_round_and_slow_ones_get_fewer_rounds() -> None:
    count = {"fast": 0, "slow": 0}

    def fast() -> None:
        count["fast"] += 1

    def slow() -> None:
        count["slow"] += 1
        time.sleep(0.03)

    timings = bm.time_interleaved({"fast": fast, "slow": slow}, rounds=4, min_time_s=0.01, slow_s=0.02, slow_rounds=2)
    assert timings["fast"].inner > 1 and count["fast"] == 1 + 4 * timings["fast"].inner
    assert len(timings["slow"].times) == 2 and count["slow"] == 1 + 2
    assert timings["slow"].median >= 0.03
    with pytest.raises(ValueError, match="rounds"):
        bm.time_interleaved({"fast": fast}, rounds=0)


def test_bandwidth_definitions() -> None:
    assert bm.sampler_bytes(1000, 16) == 8 * 1000 + 16 * 1000 * 4
    assert bm.sampler_bytes(1000, 16, torch.bfloat16) == 8 * 1000 + 16 * 1000 * 2
    assert bm.gbs(2e9, 2.0) == pytest.approx(1.0)
    assert bm.copy_gbs(1 << 20, rounds=2) > 0


def test_labels() -> None:
    assert "torch" in bm.machine_label("cpu")
    header = bm.run_header("cpu")
    assert "date:" in header and "commit:" in header and "UTC" in header
    label = bm.sampler_backend("cpu")
    assert label == cpu_backend._get().label  # what the CPU kernel reports it is


@pytest.mark.parametrize("force_reference", [False, True])
def test_cli_bench_names_the_backend_that_ran(force_reference: bool) -> None:
    if not force_reference and cpu_backend.backend() == "reference":
        pytest.skip("no compiled CPU kernel here")
    env = {k: v for k, v in os.environ.items() if k != "L2M_FAST_FORCE_REFERENCE"}
    if force_reference:
        env["L2M_FAST_FORCE_REFERENCE"] = "1"
    args = ["bench", "--params", "2000", "--samples", "4", "--repeats", "1", "--device", "cpu"]
    code = "import sys; from l2m_fast.cli import main; sys.exit(main(sys.argv[1:]))"
    res = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    backend = res.stdout.split("fused op backend:", 1)[1].splitlines()[0]
    if force_reference:
        assert "pure-PyTorch reference" in backend and "L2M_FAST_FORCE_REFERENCE" in backend
    else:
        assert "C++ kernel" in backend
