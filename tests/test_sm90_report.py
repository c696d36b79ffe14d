"""benchmarks/sm90_report.py: the kernels compiled for an H100 (sm_90) without a GPU, and what they became.

The report runs in a subprocess (it replaces Triton's driver with an sm_90 stand-in, which must not
leak into other tests). Skipped cleanly where the toolchain (Triton with its bundled ptxas and
cuobjdump) is missing. Static facts only: no spills, 16-byte (or for bfloat16 8-byte) streaming
vector stores, no layout conversion or barrier in the sample loop, the segment kernel under 128
registers, hardware sine/cosine exactly in the fast mode, and the arithmetic per written value
under the break-even of memory speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import sm90_report
finally:
    sys.path.remove(str(ROOT / "benchmarks"))

MISSING = sm90_report.toolchain_missing() if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else "interpreter"


@pytest.fixture(scope="module")
def report() -> dict:
    if MISSING:
        pytest.skip(f"sm_90 toolchain unavailable: {MISSING}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sm90_report.py"), "--json", "--quick"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if proc.returncode == 3:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_no_spills_and_vector_streaming_stores(report: dict) -> None:
    assert report["spill_bytes"] == 0
    assert report["min_store_bits"] >= 64
    for row in report["rows"]:
        assert row["store_ops"] and all(".EF" in op for op in row["store_ops"]), row  # st.global.cs
        if row["dtype"] == "float32":
            assert row["store_bits"] == [128], row


def test_no_layout_conversion_or_barrier_in_the_loop(report: dict) -> None:
    assert report["convert_in_loop"] == 0 and report["barriers_in_loop"] == 0


def test_arithmetic_per_value(report: dict) -> None:
    """Instructions per written value in the hot loop: under the ~40 break-even (S = 16, P = 1e6)."""
    assert report["flat_precise_fp32"] <= 45
    assert report["flat_fast_fp32"] <= 32
    assert report["segments_registers"] <= 128


def test_fast_mode_uses_hardware_sine_and_precise_does_not(report: dict) -> None:
    for row in report["rows"]:
        mufu = dict(row["mufu"])
        hardware = mufu.get("MUFU.SIN", 0) + mufu.get("MUFU.COS", 0)
        assert (hardware > 0) == (row["math"] == "fast"), row


def test_sass_parsing() -> None:
    """The hot-loop finder on a hand-written listing: the innermost storing loop, slow-path calls left out."""
    sass = "\n".join(
        f"        /*{a:04x}*/   {t} ;"
        for a, t in [
            (0x00, "MOV R1, c[0x0][0x28]"),
            (0x10, "IADD3 R2, R2, 0x1, RZ"),  # outer loop head
            (0x20, "FFMA R3, R3, R3, R3"),  # inner loop head
            (0x30, "@!P0 BRA 0x60"),
            (0x40, "MOV R9, 0x60"),
            (0x50, "CALL.REL.NOINC 0xa0"),
            (0x60, "STG.E.EF.128 desc[UR4][R4.64], R8"),
            (0x70, "@P1 BRA 0x20"),
            (0x80, "@P2 BRA 0x10"),
            (0x90, "EXIT"),
            (0xA0, "FADD R0, R0, R0"),
            (0xB0, "RET.REL.NODEC R9 0x0"),
        ]
    )
    ins = sm90_report.parse_sass(sass)
    loop = sm90_report.hot_loop_blocks(ins)
    ops = [i.op for b in loop for i in b]
    assert ops == ["FFMA", "BRA", "STG.E.EF.128", "BRA"]
    main = [i.op for b in sm90_report.main_path_blocks(ins) for i in b]
    assert "CALL.REL.NOINC" not in main and "FADD" not in main and "EXIT" in main
    assert sm90_report._store_bits("STG.E.EF.128") == 128 and sm90_report._store_bits("STG.E.U16") == 16
