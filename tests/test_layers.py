"""The package's architecture, checked from its source: layers import only
downwards (ops < memory < hf < train < apps), no module-level import circle,
and no function-local import but of an optional dependency, commented."""
from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "memkernels"
LAYERS = {"ops": 0, "memory": 1, "hf": 2, "train": 3, "apps": 4}
FACADE = 2.5  # memkernels/__init__.py re-exports ops, memory and hf
OPTIONAL = ("transformers", "tokenizers", "triton", "matplotlib", "rank_bm25")


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> float:
    parts = module.split(".")
    return FACADE if len(parts) == 1 else LAYERS[parts[1]]


def imports(path: pathlib.Path):
    """(imported memkernels module, line, at module level?) for each import."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import sub` imports the submodule pkg.sub where there is one
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES
                     else node.module for a in node.names]
        else:
            continue
        for name in names:
            yield name, node.lineno, id(node) in top


def test_every_module_is_in_a_layer():
    for module in MODULES:
        parts = module.split(".")
        assert len(parts) == 1 or parts[1] in LAYERS, f"{module} is in no layer ({sorted(LAYERS)})"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    for name, line, _ in imports(MODULES[module]):
        if name.split(".")[0] != "memkernels" or name == "memkernels._C":
            continue
        assert name in MODULES, f"{module}:{line} imports {name}, which does not exist"
        assert layer(name) <= layer(module), (f"{module}:{line} imports {name}: a layer above "
                                              f"its own (ops < memory < hf < train < apps)")
        if layer(module) < FACADE:
            assert name != "memkernels", (f"{module}:{line} imports the package facade; "
                                          f"import from the layer's own module")


def test_no_import_circle():
    graph = {m: {n for n, _, top in imports(p) if top and n in MODULES and n != m}
             for m, p in MODULES.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(path + [m, n]))
            if n not in state:
                visit(n, path + [m])
        state[m] = 2
    for m in graph:
        if m not in state:
            visit(m, [])


@pytest.mark.parametrize("module", sorted(MODULES))
def test_function_local_imports_are_optional_dependencies_and_commented(module):
    source = MODULES[module].read_text().splitlines()
    for name, line, top in imports(MODULES[module]):
        if top:
            continue
        assert name.split(".")[0] in OPTIONAL, (f"{module}:{line} imports {name} inside a "
                                                f"function: only optional dependencies may be")
        assert "#" in source[line - 1], f"{module}:{line}: say why {name} is imported here"
