"""The package's import graph, read from the source (top-level and function-local imports; TYPE_CHECKING blocks
are annotations only): no circle, no component importing a recipe, and the stdlib-only leaves stay leaves."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"nash_fast.train", "nash_fast.selfplay"}  # self-play runs the trainer; nothing else imports either
# Modules every other layer may use: they import no other nash_fast module...
LEAVES = {"nash_fast.rundir", "nash_fast.cli", "nash_fast.console", "nash_fast.interrupt", "nash_fast.options",
          "nash_fast.checks", "nash_fast.capabilities", "nash_fast.tiny"}
# ... and these only the standard library (PyYAML when options reads a YAML file).
STDLIB_LEAVES = {"nash_fast.rundir", "nash_fast.cli", "nash_fast.interrupt", "nash_fast.options"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((REPO / "nash_fast").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((REPO / "kernels").rglob("*.py")):
        parts = ("nash_fast", "kernels") + path.relative_to(REPO / "kernels").with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict, type_checking: bool = False) -> dict[str, set[str]]:
    """{"nash_fast": {imported nash_fast modules}, "external": {top-level names of other imports}};
    type_checking: count the imports of `if TYPE_CHECKING:` blocks too (a dependency all the same)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = {"nash_fast": set(), "external": set()}

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test) and not type_checking:
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    target = alias.name
                    (found["nash_fast"] if target in modules else found["external"]).add(
                        target if target in modules else target.split(".")[0])
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                if base.split(".")[0] != "nash_fast":
                    found["external"].add(base.split(".")[0])
                    continue
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    found["nash_fast"].add(full if full in modules else base)
            visit(child)

    visit(ast.parse(path.read_text()))
    found["nash_fast"].discard(name)
    return found


def _graph(type_checking: bool = False):
    modules = _modules()
    return modules, {name: _imports(name, path, modules, type_checking) for name, path in modules.items()}


def test_no_import_circle():
    modules, imports = _graph()
    graph = {name: {m for m in found["nash_fast"] if m in modules} for name, found in imports.items()}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                circle = stack[stack.index(target):] + [target]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_no_component_imports_a_recipe():
    _, imports = _graph(type_checking=True)
    offenders = sorted((name, recipe) for name, found in imports.items() for recipe in found["nash_fast"] & RECIPES
                       if not (name == "nash_fast.selfplay" and recipe == "nash_fast.train"))
    assert not offenders, f"components importing a recipe: {offenders}"


def test_the_leaves_import_only_the_standard_library():
    import sys

    _, imports = _graph()
    for name in sorted(LEAVES):
        assert not imports[name]["nash_fast"], (name, imports[name]["nash_fast"])
    for name in sorted(STDLIB_LEAVES):
        found = imports[name]
        third_party = sorted(m for m in found["external"] if m not in sys.stdlib_module_names and m != "yaml")
        assert not third_party, (name, third_party)
