"""The package's import graph points down: each module of `trl_kd` imports only modules on its own floor or below,
and no modules import each other in a circle. Imports inside functions count (they are arrows all the same);
`if TYPE_CHECKING:` blocks do not (they never run). A new module must be given a floor here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parents[1] / "trl_kd"

# the floors, bottom first: a module (or a method's folder) by its name under `trl_kd`; "" is the package itself
FLOORS = (
    ("errors", "registry", "_compat", "guards"),  # leaves: nothing of trl_kd
    ("losses", "data", "checkpoints", "testing", "evaluation", "cross_tokenizer"),  # maths and data
    ("sampler", "teacher_cache", "placement", "planner", "model_card"),  # engines, no trainer
    ("kd",),  # the base trainer
    ("skd", "switch", "promptkd"),  # the methods, one folder each
    ("scripts", "cli", ""),  # entry points and the public facade
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for level, names in enumerate(FLOORS):
        if top in names:
            return level
    raise AssertionError(f"{module} is on no floor: add it to FLOORS in {__file__}")


def _runtime_nodes(tree: ast.AST):
    """Every node outside `if TYPE_CHECKING:` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            test = getattr(child, "test", None)
            if isinstance(child, ast.If) and isinstance(test, ast.Name | ast.Attribute):
                if (test.id if isinstance(test, ast.Name) else test.attr) == "TYPE_CHECKING":
                    stack.extend(child.orelse)
                    continue
            stack.append(child)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The `trl_kd` modules that the file at `path` imports (`from . import x` resolves to the module `x` if it is
    one)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        else:
            continue
        found.update(t for t in targets if t == "trl_kd" or t.startswith("trl_kd."))
    return found - {name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def test_the_walk_sees_the_imports(graph):
    """The walk can fail: it finds arrows the package is known to have, lazy and relative ones included, and none
    from a `TYPE_CHECKING` block."""
    assert "trl_kd.sampler" in graph["trl_kd.kd.trainer"]  # relative, at the top
    assert "trl_kd.model_card" in graph["trl_kd.cli"]  # inside a function
    assert "trl_kd.scripts.default" in graph["trl_kd.scripts.distill"]  # `from . import default`
    assert "trl_kd.kd.config" not in graph["trl_kd.placement"]  # only for type annotations


def test_every_import_points_down(graph):
    upward = [
        f"{module} (floor {floor_of(module)}) imports {target} (floor {floor_of(target)})"
        for module, targets in graph.items()
        for target in sorted(targets)
        if floor_of(target) > floor_of(module)
    ]
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def test_no_import_circle(graph):
    # a package importing its own submodules (`skd/__init__.py` -> `skd.trainer`) is how packages are built,
    # not a circle; every other arrow counts
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            circle = path[path.index(module) :] + [module]
            raise AssertionError("import circle: " + " -> ".join(circle))
        if module in done:
            return
        for target in sorted(edges.get(module, ())):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(edges):
        visit(module, [])
