"""The shape of the code: no import circle among the modules, none too long, Keras' private names in one place.

Read from the source with `ast`, without importing anything.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
LIBRARY = SCRIPTS / "imgcls"
MAX_LINES = 430


def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def imported_modules(path: Path) -> set[str]:
    """The imgcls modules `path` imports anywhere in it (at the top or inside a function)."""
    found = set()
    for node in ast.walk(parsed(path)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "imgcls":  # from imgcls import batches, training
                found |= {f"imgcls.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("imgcls.")}


def import_graph() -> dict[str, set[str]]:
    modules = {f"imgcls.{path.stem}": path for path in LIBRARY.glob("*.py") if path.stem != "__init__"}
    return {name: imported_modules(path) & modules.keys() for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state = {}  # module -> "open" while its imports are being followed, "done" after

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                return path[path.index(imported):] + [imported]
            if imported not in state:
                cycle = visit(imported, path + [imported])
                if cycle:
                    return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [module])
            if cycle:
                return cycle
    return None


def test_the_library_modules_import_each_other_without_a_circle():
    graph = import_graph()
    assert "imgcls.batches" in graph["imgcls.calibration"]  # the graph is really read
    cycle = find_cycle(graph)
    assert cycle is None, f"import circle: {' -> '.join(cycle)}; move what both sides need into a module of its own"


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_is_over_430_lines():
    lengths = {path.relative_to(REPO).as_posix(): len(path.read_text().splitlines())
               for path in sorted(SCRIPTS.rglob("*.py"))}
    too_long = {path: lines for path, lines in lengths.items() if lines > MAX_LINES}
    assert not too_long, f"over {MAX_LINES} lines: {too_long}; split them by idea"


def project_private_names() -> tuple[set[str], set[str]]:
    """(the _names the project defines: functions, classes, attributes set on self; those it reads or calls),
    keras_internals aside."""
    defined, used = set(), set()
    for path in SCRIPTS.rglob("*.py"):
        if path.name == "keras_internals.py":
            continue
        for node in ast.walk(parsed(path)):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                if isinstance(node.value, ast.Name) and node.value.id == "self":
                    defined.add(node.attr)
            elif isinstance(node, ast.Attribute):
                used.add(node.attr)
            elif isinstance(node, ast.Name):
                used.add(node.id)
    return {name for name in defined if name.startswith("_")}, used


def _documented_standard_library(node: ast.Attribute) -> bool:
    """os._exit and the like: an underscore, but documented public API of the standard library."""
    return isinstance(node.value, ast.Name) and node.value.id in ("os", "sys")


def private_keras_uses(path: Path, own: set[str], used: set[str]) -> list[str]:
    found = []
    for node in ast.walk(parsed(path)):
        where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("keras.src"):
            found.append(f"{where} imports {node.module}")
        elif isinstance(node, ast.Import) and any(alias.name.startswith("keras.src") for alias in node.names):
            found.append(f"{where} imports keras.src")
        elif (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
              and node.attr not in own and not _documented_standard_library(node)):
            found.append(f"{where} uses .{node.attr}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr") and len(node.args) > 1
              and isinstance(node.args[1], ast.Constant) and str(node.args[1].value).startswith("_")):
            found.append(f"{where} {node.func.id}(..., {node.args[1].value!r})")
        elif isinstance(node, ast.ClassDef):
            # A private method the project never calls (nor registers with a decorator, as pydantic's
            # validators are) is one that a library calls: an override of a Keras internal.
            found += [f"{where} overrides {item.name}" for item in node.body
                      if isinstance(item, ast.FunctionDef) and item.name.startswith("_")
                      and not item.name.startswith("__") and not item.decorator_list and item.name not in used]
    return found


def test_private_keras_names_are_used_only_in_keras_internals():
    own, used = project_private_names()
    found = [use for path in sorted(SCRIPTS.rglob("*.py")) if path.name != "keras_internals.py"
             for use in private_keras_uses(path, own, used)]
    assert not found, ("private names outside imgcls/keras_internals.py (move each there, with why no public"
                       f" API serves and a test in tests/test_keras_internals.py): {found}")
