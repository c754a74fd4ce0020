"""kvxfer.ops is layered one way: each module imports only modules of a lower layer, uses no
private name of another module, and importing any of them loads neither cupy nor torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

OPS = Path(__file__).resolve().parents[1] / "kvxfer" / "ops"

# lower layers first; a module may import only modules of a smaller number
LAYERS = {
    "reference": 0, "jobs": 0, "workloads": 0, "loader": 0,
    "host": 1, "operands": 1, "runtime": 1,
    "kernels": 2,
    "jobcopy": 3, "pairs": 3,
    "cuda": 4,
}


def _ops_imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(ops module imported, name taken from it or None, line) for each import of a sibling."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1 and mod:  # from .x import a, b
                out += [(mod.split(".")[0], a.name, node.lineno) for a in node.names]
            elif node.level == 1:  # from . import x
                out += [(a.name, None, node.lineno) for a in node.names]
            elif mod.startswith("kvxfer.ops."):
                out += [(mod.split(".")[2], a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name.split(".")[2], None, node.lineno) for a in node.names if a.name.startswith("kvxfer.ops.")]
    return out


def _private_attributes(path: Path) -> list[tuple[str, str, int]]:
    """(alias, attribute, line) for ``alias._name`` where alias is a sibling ops module."""
    tree = ast.parse(path.read_text())
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and not node.module:
            aliases.update({a.asname or a.name: a.name for a in node.names})
    return [(n.value.id, n.attr, n.lineno) for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases
            and n.attr.startswith("_")]


def test_every_ops_module_has_a_layer():
    mods = {p.stem for p in OPS.glob("*.py") if p.stem != "__init__"}
    assert mods == set(LAYERS), f"modules without a layer: {mods - set(LAYERS)}; gone: {set(LAYERS) - mods}"


def test_ops_modules_import_only_downward_and_no_private_names():
    wrong = []
    for path in sorted(OPS.glob("*.py")):
        if path.stem == "__init__":
            continue
        for mod, name, line in _ops_imports(path):
            if LAYERS[mod] >= LAYERS[path.stem]:
                wrong.append(f"{path.name}:{line} imports {mod} (layer {LAYERS[mod]} >= {LAYERS[path.stem]})")
            if name is not None and name.startswith("_"):
                wrong.append(f"{path.name}:{line} takes the private name {name} from {mod}")
        wrong += [f"{path.name}:{line} uses {alias}.{attr}" for alias, attr, line in _private_attributes(path)]
    assert not wrong, "\n".join(wrong)


def test_importing_the_ops_loads_neither_cupy_nor_torch():
    code = ("import json, sys, kvxfer, kvxfer.ops\n"
            + "".join(f"import kvxfer.ops.{m}\n" for m in LAYERS)
            + "print(json.dumps([m for m in ('cupy', 'torch', 'ucxx') if m in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
