"""The package's import structure, read from the source (nothing is imported): no module of
kvxfer/ imports one that imports it back, and no backend uses another backend's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import kvxfer

ROOT = Path(kvxfer.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) of every import in ``path`` (TYPE_CHECKING ones
    included: they tie the modules as much)."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name in mods]
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            target = ".".join(base + (node.module.split(".") if node.module else []))
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in mods:
                    out.append((sub, []))
                elif target in mods:
                    out.append((target, [a.name]))
    return out


def _graph() -> dict[str, dict[str, list[str]]]:
    mods = _modules()
    g: dict[str, dict[str, list[str]]] = {m: {} for m in mods}
    for m, p in mods.items():
        for target, names in _imports(m, p, mods):
            if target != m:
                g[m].setdefault(target, []).extend(names)
    return g


def _circles(g: dict[str, dict[str, list[str]]]) -> list[frozenset[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in g:
        if v not in index:
            visit(v)
    return out


def test_no_new_import_circle():
    found = set(_circles(_graph()))
    assert not found, f"import circles: {[sorted(c) for c in found]}"


def test_the_walk_sees_a_circle():
    g = {"a": {"b": []}, "b": {"c": []}, "c": {"a": []}, "d": {"a": []}}
    assert _circles(g) == [frozenset({"a", "b", "c"})]


def _backend_of(module: str) -> str | None:
    """The backend a module belongs to (its package or its ``ucx*`` prefix), None for shared ones."""
    parts = module.split(".")
    if parts[:2] != ["kvxfer", "backends"] or len(parts) < 3:
        return None
    name = parts[2].lstrip("_")
    if name in ("base", "staging", "wire"):  # shared by every backend (wire: UCX's until it imports protocol)
        return None
    return "ucx" if name.startswith("ucx") or name == "ucp" else name


def test_no_backend_uses_another_backends_private_names():
    bad = []
    for m, targets in _graph().items():
        mine = _backend_of(m)
        for t, names in targets.items():
            theirs = _backend_of(t)
            if mine and theirs and mine != theirs and (any(n.startswith("_") for n in names) or t.rsplit(".", 1)[-1].startswith("_")):
                bad.append((m, t, names))
    assert not bad, bad
    assert _backend_of("kvxfer.backends.cuda_ipc.link") == "cuda_ipc" and _backend_of("kvxfer.backends._ucp") == "ucx"


def test_cuda_ipc_reaches_tcp_through_its_public_interface_only():
    g = _graph()
    for m in (k for k in g if k.startswith("kvxfer.backends.cuda_ipc")):
        assert not [t for t in g[m] if t.startswith("kvxfer.backends.tcp.")], m
    # the TCP objects it holds (its backend's ``tcp``, a link's control channel ``ctrl``) are
    # used through public members only
    for p in (ROOT / "backends" / "cuda_ipc").glob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and isinstance(node.value, ast.Attribute)
                    and node.value.attr in ("tcp", "ctrl")):
                raise AssertionError(f"{p.name}:{node.lineno} uses {node.value.attr}.{node.attr}")
