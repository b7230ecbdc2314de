"""Message layout: FIELDS and DATA come from the field annotations, and every kind has a validator."""

from __future__ import annotations

import pytest

from agent.replication import messages as m
from agent.replication import wire


def test_every_wire_kind_has_a_validator() -> None:
    kinds = {kind for cls in m.MESSAGES.values() for _, kind in cls.FIELDS}
    assert kinds <= wire._KINDS.keys()


def test_layout_follows_declaration_order_with_data_apart() -> None:
    assert m.Write.FIELDS == (("path", "entry"), ("offset", "off"), ("times", "times"))
    assert m.Write.DATA == "data"
    assert m.Setattr.FIELDS[1] == ("mode", "perm?")


def test_a_field_without_a_wire_kind_is_refused() -> None:
    with pytest.raises(TypeError, match=r"Bad\.size: annotate with a wire kind"):

        @m.message
        class Bad(m.Message):
            size: int


def test_two_data_fields_are_refused() -> None:
    with pytest.raises(TypeError, match="at most one Data field, got a, b"):

        @m.message
        class Bad(m.Message):
            a: m.Data
            b: m.Data
