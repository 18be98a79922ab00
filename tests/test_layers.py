"""The package's layers, read from the source with `ast` (docs/architecture.md is the map).

Each subpackage imports only its own layer and the layers below it; the config layer imports no
torch; nothing imports in a circle. Every import counts, also those inside functions and under
`if TYPE_CHECKING:`, since a circle through a type hint is still a circle a reader has to follow.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tripletctl"
LAYERS = ("core", "config", "data", "model", "outputs", "evaluation", "train", "commands")  # lowest first
TOP = (
    "cli",
    "cli_models",
    "cli_options",
    "cli_faults",
    "api",
    "__main__",
    "__init__",
)  # tripletctl/*.py: above every layer
HEAVY = ("torch", "transformers", "datasets", "safetensors", "numpy", "matplotlib")  # config imports none


def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted name -> file, for every module of the package (not the shipped curricula's scripts)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).with_suffix("").parts
        if parts[0] == "curricula":
            continue
        found[".".join(("tripletctl", *parts))] = path
    return found


def _imports(path: Path) -> set[str]:
    """Every module name an import statement in the file names, wherever the statement is."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from pkg import module`
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{path}: relative import; write `from tripletctl.X import ...`")
    return names


@functools.cache
def _internal_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    modules = _modules(package)
    return {name: {i for i in _imports(path) if i in modules} for name, path in modules.items()}


def _layer(module: str) -> int:
    part = module.split(".")[1]
    return LAYERS.index(part) if part in LAYERS else len(LAYERS)


def test_every_module_belongs_to_a_layer():
    for name in _modules():
        part = name.split(".")[1]
        assert part in LAYERS or part in TOP, f"{name} is in no layer: add it to a subpackage"


@pytest.mark.parametrize("module", sorted(_modules()))
def test_a_module_imports_only_its_layer_and_those_below(module):
    upward = sorted(i for i in _internal_graph()[module] if _layer(i) > _layer(module))
    assert not upward, f"{module} (layer {module.split('.')[1]}) imports a higher layer: {upward}"


def test_the_config_layer_imports_no_torch_and_no_other_layer():
    for name, path in _modules().items():
        if name.split(".")[1] != "config":
            continue
        imported = _imports(path)
        heavy = sorted(i for i in imported if i.split(".")[0] in HEAVY)
        other = sorted(i for i in imported if i.startswith("tripletctl.") and i.split(".")[1] not in ("config", "core"))
        assert not heavy and not other, f"{name} imports {heavy + other}"


def test_package_init_files_import_nothing():
    """Tokenizer workers and `validate` import subpackages: an __init__ that imports pulls in the layer."""
    for name, path in _modules().items():
        if path.name == "__init__.py" and name != "tripletctl.__init__":
            assert not _imports(path), f"{path} imports {sorted(_imports(path))}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself): Tarjan."""
    index, low, on_stack, stack, result, counter = {}, {}, set(), [], [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                result.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return result


def test_no_import_circle():
    assert _cycles(_internal_graph()) == []


def test_the_circle_finder_finds_circles():
    """The check above can fail: a made-up graph with one circle and one chain."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert _cycles(graph) == [["a", "b", "c"], ["e"]]


MODULE_LINES, FUNCTION_LINES = 500, 60  # the package: a module or function past these is split by concern
BENCH_MODULE_LINES, BENCH_FUNCTION_LINES = 600, 80  # bench/'s scripts, beside the package: looser


def _too_long(files: dict[str, Path], module_lines: int, function_lines: int) -> list[str]:
    too_long = []
    for name, path in files.items():
        text = path.read_text()
        if text.count("\n") > module_lines:
            too_long.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > function_lines:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    return too_long


def test_no_module_over_500_lines_and_no_function_over_60():
    too_long = _too_long(_modules(), MODULE_LINES, FUNCTION_LINES)
    assert not too_long, too_long


def test_the_size_check_finds_long_modules_and_functions(tmp_path):
    """The check above can fail: a made-up module of 7 lines holding a function of 4, limits 5 and 3."""
    module = tmp_path / "long.py"
    module.write_text("def f():\n    a = 1\n    b = 2\n    return a + b\n\n\nX = 1\n")
    assert _too_long({"long": module}, 5, 3) == ["long: 7 lines", "long.f: 4 lines"]
    assert _too_long({"long": module}, 7, 4) == []


def test_the_bench_scripts_keep_their_sizes():
    """bench/ is no layer of the package (nothing imports it), but its scripts are read and changed
    the same way: limits too, a little looser than the package's."""
    scripts = {f"bench.{path.stem}": path for path in sorted((PACKAGE.parent / "bench").glob("*.py"))}
    too_long = _too_long(scripts, BENCH_MODULE_LINES, BENCH_FUNCTION_LINES)
    assert not too_long, too_long
