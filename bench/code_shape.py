"""The figures issue 20 asks for, read from a checkout's source with `ast`: the biggest modules, the
longest functions, import circles (with tests/test_layers.py's own reader, type-hint imports
included) and the quoted mining-mode and layout names outside the modules that own them.

    python bench/code_shape.py .                                              # this checkout
    git worktree add --detach /tmp/before cc79a8e && python bench/code_shape.py /tmp/before

tests/test_layers.py enforces the rules (layers, no circle, sizes); this prints the numbers.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_layers import _cycles, _internal_graph, _modules  # noqa: E402

MODES = ("random", "semi-hard", "hard-negative", "batch-hard", "batch-all")
LAYOUTS = ("labelled", "pairs", "triplets")
MODE_OWNERS = ("tripletctl.curriculum", "tripletctl.mining", "tripletctl.config.choices", "tripletctl.train.mining")
LAYOUT_OWNERS = ("tripletctl.curriculum", "tripletctl.sources", "tripletctl.config.layouts")


def quoted(modules: dict[str, Path], names: tuple[str, ...], owners: tuple[str, ...]) -> dict[str, int]:
    found = {}
    for module, path in modules.items():
        if module in owners:
            continue
        count = sum(len(re.findall(rf"[\"']{re.escape(name)}[\"']", path.read_text())) for name in names)
        if count:
            found[module] = count
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path)
    package = parser.parse_args().checkout.resolve() / "tripletctl"
    modules = _modules(package)
    sizes = sorted(((path.read_text().count("\n"), name) for name, path in modules.items()), reverse=True)
    functions = sorted(
        (node.end_lineno - node.lineno + 1, f"{name}.{node.name}")
        for name, path in modules.items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    )[::-1]
    print(f"modules: {len(modules)}, lines: {sum(size for size, _ in sizes)}")
    print(f"biggest modules: {sizes[:3]}")
    print(f"longest functions: {functions[:3]}")
    print(f"functions over 80 lines: {sum(n > 80 for n, _ in functions)}, over 50: {sum(n > 50 for n, _ in functions)}")
    print(f"import circles: {_cycles(_internal_graph(package))}")
    print(f"quoted mode names outside their owners: {quoted(modules, MODES, MODE_OWNERS)}")
    print(f"quoted layout names outside their owners: {quoted(modules, LAYOUTS, LAYOUT_OWNERS)}")


if __name__ == "__main__":
    main()
