"""The package's shape: dependencies run one way, modules use each other's public names only, and
``import l2m_fast`` loads the library alone (no demo, no plotting, no progress bars)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "l2m_fast"

# Lowest first. A module may import, at module level, only from its own layer or below.
LAYERS: list[tuple[str, ...]] = [
    ("_env", "_build_config", "_version", "ops"),
    ("layout", "modes", "optim", "sharding", "posterior_state", "evidence", "fisher", "snapshot", "construction"),
    ("holds",),
    ("posterior",),
    ("inplace",),
    ("predictive",),
    ("ensemble", "integrations", "distributed", "calibration"),
    ("benchmarking", "cli", "demo", "examples", "__init__"),
]
# Function-level imports of a higher layer: only the posterior's one-line delegating methods.
DELEGATORS = {"posterior": {"inplace", "predictive", "calibration", "integrations"}}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _layer(name: str) -> int:
    top = name.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"module l2m_fast.{name} is in no layer: add it to LAYERS")


def _resolve(module: str, node: ast.ImportFrom) -> list[str]:
    """The l2m_fast modules an import statement names (relative imports resolved)."""
    if node.level == 0:
        if not (node.module or "").startswith("l2m_fast"):
            return []
        base = node.module.split(".")[1:]
    else:
        pkg = module.split(".") if (PKG / module.replace(".", "/") / "__init__.py").exists() else module.split(".")[:-1]
        if module == "__init__":
            pkg = []
        base = pkg[: len(pkg) - (node.level - 1)] + (node.module.split(".") if node.module else [])
    if not base:
        return [alias.name for alias in node.names]
    return [".".join(base)]


def _imports() -> list[tuple[str, str, bool, ast.ImportFrom]]:
    """(importer, imported, at module level, node) for every import of an l2m_fast module."""
    out = []
    for path in sorted(PKG.rglob("*.py")):
        mod = _module_name(path)
        tree = ast.parse(path.read_text())
        top_level = {id(n) for n in tree.body}
        type_checking = set()
        for n in tree.body:
            if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
                type_checking |= {id(x) for x in ast.walk(n)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and id(node) not in type_checking:
                for target in _resolve(mod, node):
                    out.append((mod, target, id(node) in top_level, node))
    return out


def test_dependencies_run_one_way() -> None:
    wrong = []
    for mod, target, top, node in _imports():
        if _layer(target) <= _layer(mod):
            continue
        allowed = DELEGATORS.get(mod.split(".")[0], set())
        if top or target.split(".")[0] not in allowed:
            wrong.append(f"l2m_fast.{mod} imports l2m_fast.{target} (line {node.lineno})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_modules_use_public_names_of_other_modules() -> None:
    """A leading underscore is private to its module, or to its subpackage (ops, predictive, demo, ...)."""
    wrong = []
    for mod, target, _, node in _imports():
        same_subpackage = "." in mod and mod.split(".")[0] == target.split(".")[0]
        for alias in node.names:
            if alias.name.startswith("_") and not alias.name.startswith("__") and not same_subpackage:
                wrong.append(f"l2m_fast.{mod} imports the private {alias.name} of l2m_fast.{target}")
    assert not wrong, "\n".join(wrong)


def test_import_loads_the_library_alone() -> None:
    """Beyond what torch itself imports: no demo, no baselines, no CLI, no plotting, no sklearn, no tqdm."""
    code = (
        "import sys, torch; before = set(sys.modules); import l2m_fast; "
        "new = sorted(set(sys.modules) - before); print('\\n'.join(new))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    new = res.stdout.split()
    assert "l2m_fast.posterior" in new  # the library itself is there
    banned = ("l2m_fast.demo", "l2m_fast.cli", "l2m_fast.benchmarking", "matplotlib", "sklearn", "tqdm", "scipy")
    loaded = [m for m in new if m.startswith(banned)]
    assert not loaded, f"import l2m_fast loads {loaded}"
