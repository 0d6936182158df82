"""The import structure: layers import only downward, no cycles, and no library module imports the command line."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "geca"
# Bottom-up, as the README's layout table lists them: a unit may import only units listed before it.
LAYERS = ["errors", "utils", "presets", "data", "latent", "models", "diffusion", "run", "sampling", "metrics", "config",
          "training", "downstream", "experiment", "api", "cli",
          "__main__"]


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """geca module → the geca modules it imports anywhere in its body (lazy imports inside functions count)."""
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        found = edges.setdefault(_module(path), set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "geca":
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.split(".")[0] == "geca")
    return edges


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "geca"


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, if it has any."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_every_unit_has_a_layer() -> None:
    units = {_unit(m) for m in _imports()} - {"geca"}
    assert units == set(LAYERS), f"units without a layer: {units - set(LAYERS)}; layers without code: " \
                                 f"{set(LAYERS) - units}"


def test_layers_import_only_downward() -> None:
    rank = {u: i for i, u in enumerate(LAYERS)}
    upward = sorted(f"{a} → {b}" for a, targets in _imports().items() for b in targets
                    if _unit(a) in rank and _unit(b) in rank and rank[_unit(b)] > rank[_unit(a)])
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_no_import_cycles_between_units_or_modules() -> None:
    edges = _imports()
    units: dict[str, set[str]] = {}
    for a, targets in edges.items():
        units.setdefault(_unit(a), set()).update(_unit(b) for b in targets if _unit(b) != _unit(a))
    assert _cycle(units) is None, f"a cycle between packages: {' → '.join(_cycle(units) or [])}"
    assert _cycle(edges) is None, f"a cycle between modules: {' → '.join(_cycle(edges) or [])}"


def test_the_library_never_imports_the_command_line() -> None:
    offenders = sorted(a for a, targets in _imports().items() if _unit(a) not in ("cli", "__main__")
                       and any(_unit(b) == "cli" for b in targets))
    assert not offenders, f"library modules importing geca.cli: {offenders}"


def test_the_checks_would_catch_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None
