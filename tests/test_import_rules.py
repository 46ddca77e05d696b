"""The layering rules, checked on the source (every import statement, including those inside
functions, transitively), not by grepping and not by what one run happens to import:

- nothing reachable from server/ imports data loading, pretext tasks or DP training;
- fedssl never imports clients/ or server/;
- no import loops between fedssl's folders (subpackages) and root modules;
- fedssl.layout, fedssl.fl.keys and fedssl.typed_yaml stay leaves every layer may use.

Imports under ``if TYPE_CHECKING:`` are annotations only and never run: they are skipped.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fedssl", "clients", "server")
# What the server must never load, even lazily: data loading, pretext tasks (training code), DP training.
SERVER_FORBIDDEN = ("fedssl.data", "fedssl.pretext", "fedssl.training", "fedssl.experiment", "fedssl.site_round", "opacus")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@lru_cache(maxsize=1)
def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "__pycache__" not in path.parts:
                found[_module_name(path)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Every dotted name imported anywhere under ``node`` (absolute; relative imports resolved)."""
    names: list[str] = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            names += [n for stmt in child.orelse for n in _imported_names(stmt, module, is_package)]
            continue
        if isinstance(child, ast.Import):
            names += [alias.name for alias in child.names]
        elif isinstance(child, ast.ImportFrom):
            base = child.module or ""
            if child.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (child.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names += [f"{base}.{alias.name}" for alias in child.names] + [base]
        names += _imported_names(child, module, is_package)
    return names


def _resolve(name: str) -> set[str]:
    """The project modules that importing ``name`` runs: the module (or the one holding the name)
    and every package ``__init__`` above it. A name outside the project resolves to its top package."""
    known = modules()
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return {parts[0]}
    for cut in range(len(parts), 0, -1):
        candidate = ".".join(parts[:cut])
        if candidate in known:
            return {".".join(parts[:i]) for i in range(1, cut + 1) if ".".join(parts[:i]) in known}
    return set()


@lru_cache(maxsize=1)
def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for module, path in modules().items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets: set[str] = set()
        for name in _imported_names(tree, module, path.name == "__init__.py"):
            targets |= _resolve(name)
        edges[module] = targets - {module}
    return edges


def reachable(start: str) -> dict[str, str]:
    """Every module reachable from ``start``, mapped to the module that first imported it."""
    seen = {start: ""}
    stack = [start]
    while stack:
        current = stack.pop()
        for target in graph().get(current, ()):
            if target not in seen:
                seen[target] = current
                stack.append(target)
    return seen


def _chain(seen: dict[str, str], module: str) -> str:
    path = [module]
    while seen[path[-1]]:
        path.append(seen[path[-1]])
    return " <- ".join(path)


def _unit(module: str) -> str:
    """A module's folder: ``fedssl.privacy.ledger`` -> ``fedssl.privacy``; root modules are their own unit."""
    parts = module.split(".")
    if parts[0] != "fedssl" or len(parts) == 1:
        return parts[0]
    if len(parts) == 2 and module in modules() and not modules()[module].name == "__init__.py":
        return module  # a root module such as fedssl.config
    return ".".join(parts[:2])


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


SERVER_MODULES = sorted(m for m in modules() if m.startswith("server."))


@pytest.mark.parametrize("start", SERVER_MODULES)
def test_nothing_reachable_from_the_server_loads_data_pretext_or_dp_training(start):
    seen = reachable(start)
    bad = sorted(m for m in seen if any(m == f or m.startswith(f + ".") for f in SERVER_FORBIDDEN))
    assert not bad, "\n".join(_chain(seen, m) for m in bad)


def test_fedssl_never_imports_the_apps():
    bad = {m: sorted(t for t in targets if t.split(".")[0] in ("clients", "server"))
           for m, targets in graph().items() if m.split(".")[0] == "fedssl"}
    assert not {m: t for m, t in bad.items() if t}


def test_no_import_loops_between_folders():
    units: dict[str, set[str]] = {}
    for module, targets in graph().items():
        if module.split(".")[0] != "fedssl":
            continue
        units.setdefault(_unit(module), set()).update(
            _unit(t) for t in targets if t.split(".")[0] == "fedssl" and _unit(t) not in ("fedssl", _unit(module))
        )
    assert _cycles(units) == []


@pytest.mark.parametrize("leaf", ["fedssl.layout", "fedssl.fl.keys", "fedssl.typed_yaml", "fedssl.errors", "fedssl.inputs"])
def test_leaves_stay_leaves(leaf):
    # Everyone may import these (the ServerApp, the config loader, every layer): they import no
    # other project module but fedssl.errors (and their packages' docstring-only __init__).
    allowed = {"fedssl", "fedssl.errors", "fedssl.fl"}
    internal = {t for t in reachable(leaf) if t.split(".")[0] in PACKAGES} - {leaf}
    assert internal <= allowed, sorted(internal - allowed)


# The preflight answers before torch loads (seconds): nothing it reaches may import the training stack.
TORCH_FREE = ("fedssl.preflight", "fedssl.config", "fedssl.inputs", "fedssl.sample_format", "fedssl.data.probe",
              "fedssl.privacy.feasibility")
HEAVY = ("torch", "flwr", "ray", "opacus", "sklearn")


@pytest.mark.parametrize("start", TORCH_FREE)
def test_the_preflight_never_imports_the_training_stack(start):
    seen = reachable(start)
    bad = sorted(m for m in seen if m in HEAVY)
    assert not bad, "\n".join(_chain(seen, m) for m in bad)


def test_the_rules_see_function_level_imports(tmp_path):
    # The checker itself: an import inside a function body counts, one under TYPE_CHECKING does not.
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import fedssl.data\ndef f():\n    import fedssl.pretext\n"
    names = _imported_names(ast.parse(source), "x", False)
    assert "fedssl.pretext" in names and "fedssl.data" not in names
    assert "fedssl.data.loaders" in reachable("fedssl.experiment")  # a real edge the graph must hold
