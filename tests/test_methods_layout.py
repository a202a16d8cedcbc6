"""The methods package's layout: its modules import each other without a cycle, and nothing of the project
outside it (bench, tasks, results) nor diffusers. Read from the source (every `import` statement, also those inside
functions), so a lazy import cannot hide a cycle."""

import ast
import graphlib
from pathlib import Path

import methods
from methods import registry

PACKAGE = Path(methods.__file__).parent
OUTSIDE = ("bench", "tasks", "results", "diffusers")


def imported_modules(path: Path) -> set[str]:
    """The dotted names a file imports (for `from methods import x`, the submodule methods.x where it is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            if node.module == "methods":
                found |= {f"methods.{a.name}" for a in node.names if (PACKAGE / f"{a.name}.py").exists()}
    return found


def module_graph() -> dict[str, set[str]]:
    """{module of the package: the package's modules it imports}."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        inside = {m.split(".")[1] for m in imported_modules(path) if m.startswith("methods.")}
        graph[path.stem] = inside - {path.stem}
    return graph


def test_the_methods_modules_import_each_other_without_a_cycle():
    graphlib.TopologicalSorter(module_graph()).prepare()  # raises CycleError naming the cycle


def test_the_contract_and_its_helpers_import_no_method_and_no_machinery():
    graph = module_graph()
    helpers = {"errors", "cost", "linalg", "batching", "hparams", "kernels"}
    assert graph["errors"] == graph["cost"] == graph["linalg"] == graph["batching"] == set()
    assert graph["base"] <= {"errors", "cost"}
    for name in helpers:
        assert graph[name] <= helpers | {"base"}, f"methods.{name} imports {sorted(graph[name] - helpers)}"


def test_the_methods_package_imports_nothing_of_the_project_outside_it():
    for path in PACKAGE.glob("*.py"):
        outside = sorted(m for m in imported_modules(path) if m.split(".")[0] in OUTSIDE)
        assert not outside, f"methods/{path.name} imports {outside}"


def test_infrastructure_names_the_package_modules_that_register_nothing():
    registering = {cls.__module__.split(".")[1] for cls in map(registry.method_class, methods.available())
                   if cls.__module__.startswith("methods.")}
    modules = {p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("_")}
    assert registry.INFRASTRUCTURE <= modules, sorted(registry.INFRASTRUCTURE - modules)
    assert modules - registry.INFRASTRUCTURE == registering
