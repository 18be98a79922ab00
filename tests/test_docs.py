"""The docs link to code rather than copy it: every relative link in README.md and docs/ must
point at a file or folder that exists, so a moved module cannot leave a dead link behind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
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
