"""The repository itself: no build outputs tracked, no pointers to documents users do not have."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_ARTEFACT = re.compile(r"(\.so|\.pyd|\.dll|\.dylib|\.o)$|(^|/)[^/]+\.egg-info/|^(build|dist)/|__pycache__/")


def _tracked() -> list[str]:
    try:
        res = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"git unavailable: {err}")
    if res.returncode != 0:
        pytest.skip("not a git checkout")
    return res.stdout.splitlines()


def test_no_build_artefact_is_tracked() -> None:
    tracked = _tracked()
    assert "setup.py" in tracked
    artefacts = [f for f in tracked if _ARTEFACT.search(f)]
    assert not artefacts, f"build outputs are tracked in git (users would load a stale binary): {artefacts[:5]}"


def test_code_and_docs_state_their_own_contract() -> None:
    """Users have the package and the README, not the team's design notes: nothing may point there."""
    pattern = re.compile(r"DESIGN section|DESIGN\.md|\.\./shared")
    offenders = []
    for f in _tracked():
        if f.startswith(("l2m_fast/", "csrc/", "benchmarks/")) or f == "README.md":
            path = ROOT / f
            if path.suffix in (".py", ".cpp", ".h", ".inc", ".md", ".sh") and pattern.search(path.read_text()):
                offenders.append(f)
    assert not offenders, f"these files point to documents users do not have: {offenders}"
