"""The package's layering (issue 18): no import cycle among fdgbench's
modules (top-level imports; ``if TYPE_CHECKING`` blocks are types only), and
no module hides an import inside a function to dodge one, memory.py first."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fdgbench"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The package's modules ``path`` imports at its top level."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
            for alias in node.names:  # `from . import x` imports the module x
                full = f"{target}.{alias.name}"
                found.add(full if full in modules else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, name, set(paths)) for name, path in paths.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle():
    graph = _graph()
    assert len(graph) > 30 and graph["fdgbench.train"]  # the walk found the package and its imports
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def _own(node: ast.AST) -> bool:
    """An import of the package's own modules (an optional third-party one, psutil, may wait for its use)."""
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or (node.module or "").startswith("fdgbench")
    return isinstance(node, ast.Import) and any(a.name.startswith("fdgbench") for a in node.names)


# The run's path from its config to its first iteration (and the memory guard on it).
@pytest.mark.parametrize("module", ["memory.py", "config.py", "plan.py", "method.py", "train.py", "execute.py"])
def test_no_import_of_the_package_hides_in_a_function(module):
    tree = ast.parse((PACKAGE / module).read_text())
    hidden = [f"line {node.lineno}" for func in ast.walk(tree) if isinstance(func, ast.FunctionDef)
              for node in ast.walk(func) if _own(node)]
    assert not hidden, f"{module}: imports inside functions at {', '.join(hidden)}"
