"""Key declarations: what a field declares is what the derived tables say, and the shared checks
accept and refuse what docs/curricula.md's Types table says. Pure Python."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tripletctl.config import schema


@dataclass(frozen=True)
class Block:
    name: str = schema.key(check=schema.text(), required=True, path=True, help="a name")
    size: int = schema.key(3, check=schema.integer(1), help="a size")
    tags: dict = schema.key(default_factory=dict, check=schema.mapping("a mapping"), extra="kept")
    plain: int = 0  # not a key: no check


def test_tables_come_from_the_fields():
    assert list(schema.checks(Block)) == ["name", "size", "tags"]
    assert schema.required(Block) == ("name",)
    assert schema.paths(Block) == ("name",)
    assert schema.defaults(Block) == {"size": 3, "tags": {}, "plain": 0}
    assert schema.defaults(Block)["tags"] is not schema.defaults(Block)["tags"]  # a fresh dict each time
    fields = Block.__dataclass_fields__
    assert fields["size"].metadata["help"] == "a size" and fields["tags"].metadata["extra"] == "kept"
    assert Block(name="x") == Block(name="x", size=3, tags={}, plain=0)


@pytest.mark.parametrize(
    "check, good, bad",
    [
        (schema.integer(1), [(1, 1), (10, 10)], [0, True, 2.0, "3"]),
        (schema.integer(0, 5), [(0, 0), (5, 5)], [6, -1]),
        (schema.number(), [(2, 2.0), ("3e-5", 3e-5)], [0, True, float("nan"), "fast"]),
        (schema.number(positive=False), [(0, 0.0)], [-1e-9]),
        (schema.boolean, [(True, True), (False, False)], [1, "true"]),
        (schema.text(), [("a", "a")], ["", "  ", None, 3]),
        (schema.text(optional=True), [(None, None)], [""]),
        (schema.choice(("a", "b")), [("a", "a")], ["c", None]),
        (schema.choice(("a", "b"), optional=True), [(None, None)], ["c"]),
        (schema.optional(schema.fraction), [(None, None), (1, 1.0)], [0, 1.5]),
        (schema.relative_delta, [(0, 0.0), (0.5, 0.5)], [1, -0.1]),
        (schema.int_or_auto, [("auto", "auto"), (4, 4)], [0, "fast", None]),
        (schema.int_or_auto_or_null, [(None, None), (4, 4)], [0]),
    ],
)
def test_checks_accept_and_refuse(check, good, bad):
    for value, expected in good:
        assert check(value, None) == expected
    for value in bad:
        with pytest.raises(schema.Invalid):
            check(value, None)


def test_an_override_of_a_text_key_is_the_text_typed():
    assert schema.text()(2020, "2020") == "2020"  # `data.split=2020`: YAML reads a number, the user meant text


def test_a_near_miss_gets_a_did_you_mean_hint():
    with pytest.raises(schema.Invalid) as caught:
        schema.choice(("semi-hard", "batch-hard"))("semi_hard", None)
    assert caught.value.expected == "one of semi-hard, batch-hard"
    assert caught.value.hint == " (did you mean 'semi-hard'?)"
