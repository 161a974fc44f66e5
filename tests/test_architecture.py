"""The layout's rules, checked on the source: imports run one way (no circle among the project's modules,
no import of a project module inside a function to dodge one), no project file over 600 lines (tests and
bench.py aside: a file that long holds two things), and no test module imports another (shared helpers
live in tests/fixtures.py and tests/conftest.py)."""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINES = 600


def python_files(folder: str = "") -> list[str]:
    """The project's .py files in `folder` (relative to the root), by relative path."""
    return sorted(os.path.join(folder, name) for name in os.listdir(os.path.join(ROOT, folder))
                  if name.endswith(".py"))


PRODUCT = python_files()
TESTS = python_files("tests")
MODULES = {os.path.splitext(path)[0].replace(os.sep, "."): path for path in PRODUCT + TESTS}


def parse(path: str) -> ast.Module:
    with open(os.path.join(ROOT, path)) as f:
        return ast.parse(f.read(), path)


def imported_modules(node: ast.AST) -> list[str]:
    """The project modules an import statement names (`import x`, `from x import y`, `from tests.x import y`)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    else:
        return []
    return [name for name in names if name in MODULES]


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports at its top level."""
    return {module: {target for node in parse(path).body for target in imported_modules(node)} - {module}
            for module, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` (a list of modules, the first repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every import below was seen

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target, path + [target])
                if found:
                    return found
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module, [module])
            if found:
                return found
    return None


def test_find_cycle_finds_a_circle_and_only_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imports_run_one_way():
    cycle = find_cycle(import_graph())
    assert cycle is None, "an import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("path", PRODUCT + TESTS)
def test_no_project_module_is_imported_inside_a_function(path):
    """An import inside a function hides an edge of the graph (it is how a circle is dodged)."""
    late = [f"line {inner.lineno}: {', '.join(imported_modules(inner))}"
            for node in ast.walk(parse(path)) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            for inner in ast.walk(node) if imported_modules(inner)]
    assert not late, f"{path} imports project modules inside functions: {'; '.join(late)}"


@pytest.mark.parametrize("path", [path for path in PRODUCT if path != "bench.py"])
def test_no_project_file_passes_600_lines(path):
    with open(os.path.join(ROOT, path)) as f:
        lines = sum(1 for _ in f)
    assert lines <= MAX_LINES, f"{path} has {lines} lines: it holds two things, split it"


@pytest.mark.parametrize("path", [path for path in TESTS if os.path.basename(path).startswith("test_")])
def test_no_test_module_imports_another(path):
    others = {target for node in ast.walk(parse(path)) for target in imported_modules(node)
              if target.startswith("tests.test_")}
    assert not others, f"{path} imports from {sorted(others)}: move the shared helpers to tests/fixtures.py"


SCRIPTS = ["setup.sh", ".ci/run", ".ci/gpu"] + [os.path.join("sweeps", name) for name in
                                               sorted(os.listdir(os.path.join(ROOT, "sweeps"))) if name.endswith(".sh")]


@pytest.mark.parametrize("path", SCRIPTS)
def test_the_shell_scripts_python_names_what_the_modules_define(path):
    """`python -c "from config import x"` in a shell script is outside the import graph: a moved name breaks
    a fresh machine's set-up, not a test. Each project module such a line names must define the names."""
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    wanted = [(module, name.strip()) for module, names in re.findall(r"from (\w+) import ([\w, ]+)", text)
              for name in names.split(",")]
    wanted += re.findall(r"import (\w+); \1\.(\w+)", text)
    missing = [f"{module}.{name}" for module, name in wanted
               if module in MODULES and name not in top_level_names(MODULES[module])]
    assert not missing, f"{path} names what the modules do not define: {missing}"


def top_level_names(path: str) -> set[str]:
    """The names a module defines or imports at its top level."""
    names = set()
    for node in parse(path).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return names
