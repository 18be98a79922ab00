"""The docs link to code rather than copy it: every relative link in README.md, docs/ and notes/ must
point at a file or folder that exists, so a moved module cannot leave a dead link behind; and no
docstring or comment of the package names a module that is not there."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "notes").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _relative_links(page: Path) -> list[str]:
    links = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a web address or an anchor on the same page
        links.append(target.split("#", 1)[0])
    return links


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_points_at_something(page):
    dead = [link for link in _relative_links(page) if not (page.parent / link).exists()]
    assert not dead, f"{page.relative_to(ROOT)}: dead links {dead}"


def test_the_architecture_map_names_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    package = ROOT / "tripletctl"
    missing = [
        str(path.relative_to(package))
        for path in sorted(package.glob("*/*.py"))
        if path.name != "__init__.py" and path.parent.name != "curricula"
        if f"(../tripletctl/{path.relative_to(package)})" not in text
    ]
    assert not missing, f"docs/architecture.md has no row for {missing}"


IMPORT = re.compile(r"^\s*from (tripletctl[\w.]*) import ([\w, ]+)", re.M)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_import_the_docs_show_works(page):
    """Code in the docs names real modules and names (`from tripletctl.X import Y` lines)."""
    import importlib
    import importlib.util

    for module, names in IMPORT.findall(page.read_text(encoding="utf-8")):
        loaded = importlib.import_module(module)
        for name in (n.strip() for n in names.split(",")):
            assert hasattr(loaded, name) or importlib.util.find_spec(f"{module}.{name}"), (
                f"{page.name}: {module}.{name}"
            )


PACKAGE = ROOT / "tripletctl"
MODULE_NAME = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.py)\b")


def _texts(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every docstring and comment of a Python file."""
    import ast
    import io
    import tokenize

    source = path.read_text(encoding="utf-8")
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                found.append((node.body[0].lineno, doc))
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            found.append((token.start[0], token.string))
    return found


def stale_module_names(files: list[Path]) -> list[str]:
    """`name.py` or `dir/name.py` named in a docstring or comment that is no file: a path resolves
    against the package, then the repository; a bare name must be a module of the package."""
    modules = {p.name for p in PACKAGE.rglob("*.py")}
    stale = []
    for path in files:
        for line, text in _texts(path):
            for name in MODULE_NAME.findall(text):
                exists = (PACKAGE / name).exists() or (ROOT / name).exists() if "/" in name else name in modules
                if not exists:
                    stale.append(f"{path.relative_to(ROOT)}:{line}: {name}")
    return stale


def test_docstrings_and_comments_name_only_modules_that_exist():
    """A module renamed or split leaves no docstring pointing at its old name (`curriculum.py`)."""
    assert stale_module_names(sorted(PACKAGE.rglob("*.py"))) == []


def test_the_stale_name_finder_finds_stale_names(tmp_path, monkeypatch):
    """The check above can fail: a made-up module naming one real and two missing modules."""
    module = tmp_path / "module.py"
    module.write_text('"""Reads config/choices.py and curriculum.py."""\n\nX = 1  # see train/nowhere.py\n')
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert stale_module_names([module]) == ["module.py:1: curriculum.py", "module.py:3: train/nowhere.py"]


def test_ci_runs_the_readmes_test_commands_line_for_line():
    """.ci/run is the README's "Run the tests" block, so the command a newcomer pastes is the one CI runs."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("Run the tests", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    setup = ("#", "set ", "cd ", "export ")
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(setup)]
    assert ci == block.strip().splitlines()
    assert ci[-1].endswith("python -m pytest -q")  # every test, the slow ones too


TEST_NAME = re.compile(r"(test_\w+\.py)::(test_\w+)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_test_the_docs_name_exists(page):
    """`test_file.py::test_name` in the docs (reliability.md's table) names a test of that file."""
    missing = []
    for file, name in TEST_NAME.findall(page.read_text(encoding="utf-8")):
        test_file = ROOT / "tests" / file
        if not test_file.exists() or not re.search(rf"^def {name}\(", test_file.read_text(), re.M):
            missing.append(f"{file}::{name}")
    assert not missing, f"{page.relative_to(ROOT)}: {missing}"


def test_the_architecture_map_lists_exactly_the_modules_without_a_test_file():
    """docs/architecture.md's "Tests" section names each module tested only through others."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8").split("\n## Tests\n", 1)[1]
    listed = set(re.findall(r"`((?:core|config|data|model|outputs|evaluation|train|commands)/\w+\.py)`", text))
    without = {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.glob("*/*.py")
        if path.name != "__init__.py" and path.parent.name != "curricula"
        if not (ROOT / "tests" / f"test_{path.stem}.py").exists()
    }
    assert listed == without
