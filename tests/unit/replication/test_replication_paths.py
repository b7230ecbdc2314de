"""Validation of root-relative paths: what is refused and what round-trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.replication.beneath import PathEscape, split_relpath


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        (b"/etc/passwd", "absolute"),
        (b"../x", "'..'"),
        (b"a/../../b", "'..'"),
        (b"a/./b", "'.'"),
        (b"a//b", "empty component"),
        (b"a/", "empty component"),
        (b"a\0b", "NUL"),
        (b"x" * 256, "longer than 255"),
    ],
)
def test_refused(path: bytes, reason: str) -> None:
    with pytest.raises(PathEscape, match=reason):
        split_relpath(path)


def test_root_and_non_bytes() -> None:
    assert split_relpath(b"") == ()
    with pytest.raises(PathEscape, match="not bytes"):
        split_relpath("a")  # type: ignore[arg-type]


@given(st.binary(max_size=40))
def test_any_bytes_either_split_cleanly_or_are_refused(path: bytes) -> None:
    try:
        parts = split_relpath(path)
    except PathEscape:
        return
    assert b"/".join(parts) == path
    assert all(p and p not in (b".", b"..") and b"\0" not in p for p in parts)
