"""Every benchmark script still runs: each is run once, at its smallest size, in a child process.

No timing is asserted (these machines are shared); a script that no longer runs against the library (a
renamed option, a moved helper) fails here instead of in front of the next person who needs its figures.
``paper_mode_scale.py`` (six trainings of 5,000 epochs) and the GPU scripts (``bench_gpu.py``,
``gpu_check.sh``; ``sm90_report.py`` has its own test) are left out.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "bench_cpu_sampler": (["--elements", "20000", "--samples", "1", "4", "--large-elements", "0", "--rounds", "1"], ()),
    "bench_predictive": (["--cases", "toy", "--rounds", "1"], ()),
    "bench_large_model": (["--sizes", "20000", "--rounds", "1"], ()),
    "classification_prior_sweep": (["--explicit"], ("sklearn",)),
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_script_runs(script: str, tmp_path: Path) -> None:
    args, needs = CASES[script]
    for module in needs:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {module}")
    if script == "bench_large_model":  # its table also goes to a file
        args = [*args, "--out", str(tmp_path / "large.md")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert res.returncode == 0, f"{script} failed:\n{res.stderr[-3000:]}"
    assert "|---" in res.stdout or "| ---" in res.stdout, f"{script} printed no table:\n{res.stdout[-2000:]}"
    if script == "bench_large_model":
        assert "|---" in (tmp_path / "large.md").read_text()
