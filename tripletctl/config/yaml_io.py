"""Safe YAML reading for text from users: curricula, overrides and the copies a checkpoint keeps.

Bounded in depth and in alias expansion (a "billion laughs" bomb is refused before it is walked),
duplicate keys reported instead of silently resolved. Used by every layer that reads YAML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tripletctl.config.problems import Problems
from tripletctl.core.errors import ConfigError
from tripletctl.core.files import MIB, FileRefused, read_text

MAX_YAML_NODES = 100_000  # a curriculum is a few hundred nodes; an alias bomb expands to billions
MAX_YAML_DEPTH = 100  # nesting; PyYAML's recursive constructor dies near 1,000
MAX_YAML_BYTES = 16 * MIB  # a curriculum is a few kB; read no further (a device never ends)


class _DuplicateKeyLoader(yaml.SafeLoader):
    """SafeLoader that records duplicate mapping keys, which PyYAML would resolve silently (the
    last one wins), hiding the first value from the user."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.duplicates: list[tuple[int, str]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    self.duplicates.append((key_node.start_mark.line + 1, key_node.value))
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


class YamlTooBig(yaml.YAMLError):
    """A document nested too deep or expanding (through aliases) to too many values."""


def check_yaml_size(text: str) -> None:
    """Refuse, before anything is built, documents nested deeper than MAX_YAML_DEPTH (PyYAML's
    recursive composer would die with RecursionError) or whose aliases expand past MAX_YAML_NODES
    values (a "billion laughs" bomb: tiny on disk, gigabytes once walked or printed)."""
    depth = 0
    events = yaml.parse(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # flat, no recursion
    try:
        for event in events:
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    raise YamlTooBig(f"line {event.start_mark.line + 1}: nested more than {MAX_YAML_DEPTH} levels deep")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
    except yaml.YAMLError as error:
        if "nesting depth" in str(error):  # libyaml's own limit, hit before ours while scanning ahead
            raise YamlTooBig(f"nested more than {MAX_YAML_DEPTH} levels deep") from None
        raise
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
    finally:
        loader.dispose()
    if root is not None:
        _expanded_size(root)


def _expanded_size(root: yaml.Node) -> None:
    """Values and depth of the node graph as a reader would see it (every alias expanded), counted
    without expanding anything: each node once, iteratively, with what it expands to remembered."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    open_nodes: set[int] = set()
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in size:
            continue
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        if not children_done:
            if key in open_nodes:
                raise YamlTooBig(f"line {node.start_mark.line + 1}: an alias refers to the collection that contains it")
            open_nodes.add(key)
            stack.append((node, True))
            for child in children:
                if id(child) in open_nodes:
                    raise YamlTooBig(
                        f"line {child.start_mark.line + 1}: an alias refers to the collection that contains it"
                    )
                if id(child) not in size:
                    stack.append((child, False))
            continue
        open_nodes.discard(key)
        size[key] = 1 + sum(size[id(c)] for c in children)
        depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
        if size[key] > MAX_YAML_NODES:
            raise YamlTooBig(
                f"line {node.start_mark.line + 1}: the document expands (through &anchors and "
                f"*aliases) to more than {MAX_YAML_NODES:,} values"
            )
        if depth[key] > MAX_YAML_DEPTH:
            raise YamlTooBig(
                f"line {node.start_mark.line + 1}: nested (through &anchors and *aliases) more "
                f"than {MAX_YAML_DEPTH} levels deep"
            )


def safe_yaml_load(text: str) -> Any:
    """yaml.safe_load for text from users: bounded in depth and in alias expansion (raises YamlTooBig)."""
    check_yaml_size(text)
    return yaml.safe_load(text)


def read_yaml_file(path: str | Path) -> str:
    """The text of a YAML file (a curriculum, a checkpoint's copy): a regular file of at most
    MAX_YAML_BYTES, else FileRefused; OSError and UnicodeDecodeError as `read_text` raises them."""
    return read_text(path, MAX_YAML_BYTES)


def read_yaml(path: str, problems: Problems) -> Any:
    try:
        text = read_yaml_file(path)
    except FileRefused as error:
        raise ConfigError([str(error)]) from None
    except OSError as error:
        raise ConfigError([f"{path}: cannot read the curriculum: {error.strerror or error}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: cannot read the curriculum: not UTF-8 text"]) from None
    try:
        check_yaml_size(text)
    except YamlTooBig as error:
        raise ConfigError([f"{path}: {error}; refused"]) from None
    except yaml.YAMLError:
        pass  # malformed: the loader below reports where
    loader = _DuplicateKeyLoader(text)
    try:
        tree = loader.get_single_data()
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None) or str(error)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError([f"{path}: {where}malformed YAML: {problem}"]) from None
    finally:
        loader.dispose()
    for line, key in loader.duplicates:
        problems.add(f"line {line}: duplicate key '{key}' (YAML would silently keep only the last value)")
    return tree
