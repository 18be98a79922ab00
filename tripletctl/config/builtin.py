"""The curricula that ship inside the package, so `pip install tripletctl` users have a quickstart.

They live in tripletctl/curricula/ (the repository's top-level `curricula/` is a link to it): each
NAME.yaml, plus a NAME/ directory of assets its `./` paths point into (the quickstart's tiny BERT
and data). `tripletctl train NAME` runs one in place; `tripletctl curricula copy NAME` writes an
editable copy whose relative paths still work, because they resolve against the file's directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tripletctl.core.errors import TripletctlError

CURRICULA_DIR = Path(__file__).resolve().parent.parent / "curricula"  # tripletctl/curricula/


def names() -> list[str]:
    return sorted(path.stem for path in CURRICULA_DIR.glob("*.yaml"))


def describe(name: str) -> str:
    """The first sentence of the curriculum's leading comment: what it is for."""
    words = []
    for line in (CURRICULA_DIR / f"{name}.yaml").read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        words.append(line.lstrip("#").strip())
    text = " ".join(words)
    return text.split(". ")[0].rstrip(".") + "." if text else ""


def resolve(argument: str | Path) -> tuple[Path, bool]:
    """A curriculum argument as a file: the path if that file exists, else the built-in of that
    name. Returns (path, is_builtin); an argument that is neither is returned unchanged for
    `load_curriculum` to report."""
    path = Path(argument)
    if path.is_file():
        return path, False
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if str(argument) in (name, f"{name}.yaml") and name in names():
        return CURRICULA_DIR / f"{name}.yaml", True
    return path, False


def copy(name: str, dest: str | Path = ".") -> list[Path]:
    """Write NAME.yaml (and its NAME/ assets) into `dest`; refuses to overwrite anything."""
    if name not in names():
        raise TripletctlError(f"no built-in curriculum named '{name}' (built-in: {', '.join(names())})")
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise TripletctlError(f"{dest}: not a directory")
    sources = [CURRICULA_DIR / f"{name}.yaml"] + [p for p in [CURRICULA_DIR / name] if p.is_dir()]
    targets = [dest / source.name for source in sources]
    existing = [str(t) for t in targets if t.exists()]
    if existing:
        raise TripletctlError(f"{', '.join(existing)} already exist(s): choose another destination or remove them")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for source, target in zip(sources, targets):
            if source.is_dir():
                shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copyfile(source, target)
    except OSError as error:
        for target in targets:  # nothing half-written: none of these existed before
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        raise TripletctlError(f"{dest}: cannot write the copy: {error.strerror or error}") from None
    return targets
