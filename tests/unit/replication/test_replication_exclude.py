"""The exclude matcher (ReplicatedDir.exclude): one for the live path, the resync and the native path."""

from __future__ import annotations

import fnmatch
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.replication.exclude import NOTHING, Exclude, pattern_error


@pytest.mark.parametrize(
    ("patterns", "path", "excluded"),
    [
        # Without '/': one component at any depth; an excluded directory takes its subtree.
        (["*.tmp"], b"a.tmp", True),
        (["*.tmp"], b"d/e/a.tmp", True),
        (["*.tmp"], b"x.tmp/inner/file", True),
        (["*.tmp"], b"a.tmpx", False),
        (["*.tmp"], b"d/a.tmp.keep", False),
        (["cache"], b"cache", True),
        (["cache"], b"srv/cache/blob", True),
        (["cache"], b"cached", False),
        (["?.log"], b"a.log", True),
        (["?.log"], b"ab.log", False),
        (["[ab].bin"], b"b.bin", True),
        (["[ab].bin"], b"c.bin", False),
        # With '/': the leading components; '*' never crosses '/'.
        (["cache/*"], b"cache/x", True),
        (["cache/*"], b"cache/x/y", True),
        (["cache/*"], b"cache", False),
        (["cache/*"], b"srv/cache/x", False),
        (["var/run"], b"var/run/pid", True),
        (["var/run"], b"var/running", False),
        (["a/*/c"], b"a/b/c", True),
        (["a/*/c"], b"a/b/x/c", False),
        (["logs/"], b"logs/today", True),
        (["logs/"], b"srv/logs", True),  # a trailing '/' does not anchor, as in a .gitignore
        # Several patterns; the root and an unnamed inode are never excluded.
        (["*.tmp", "cache/*"], b"cache/a", True),
        (["*.tmp", "cache/*"], b"", False),
        (["*.tmp"], None, False),
        # Names that are no UTF-8 are matched by their bytes.
        (["*.tmp"], b"\xff\xfe.tmp", True),
        (["*.tmp"], b"\xff\xfe", False),
    ],
)
def test_a_path_is_excluded_when_it_or_an_ancestor_matches(
    patterns: list[str], path: bytes | None, excluded: bool
) -> None:
    assert Exclude(patterns).excluded(path) is excluded
    assert Exclude(patterns).kept(path) == (None if excluded else path)


def test_no_patterns_exclude_nothing() -> None:
    assert not NOTHING
    assert not NOTHING.excluded(b"a.tmp")
    assert Exclude(["*"])
    assert Exclude(["*"]).excluded(b"anything/at/all")


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("/abs", "must be relative"),
        ("", "must be relative"),
        ("a/../b", "'..' component"),
        ("./a", "'.' or '..' component"),
        ("a//b", "an empty"),
        ("**/x", "'**' is not supported"),
        ("a\0b", "NUL byte"),
    ],
)
def test_a_bad_pattern_is_named_with_its_problem(pattern: str, problem: str) -> None:
    error = pattern_error(pattern)
    assert error is not None and problem in error and repr(pattern) in error
    with pytest.raises(ValueError, match="exclude pattern"):
        Exclude([pattern])


def test_a_good_pattern_has_no_problem() -> None:
    for pattern in ["*.tmp", "cache/*", "logs/", "a/b/c", "[!x]*"]:
        assert pattern_error(pattern) is None


@pytest.mark.parametrize(
    ("patterns", "directory", "in_reach"),
    [
        (["*.tmp"], b"", True),  # a name anywhere: every directory
        (["cache/*"], b"", False),
        (["cache/*"], b"cache", True),
        (["cache/*"], b"cache/sub", True),  # excluded itself
        (["cache/*"], b"other", False),
        (["a/*/c"], b"a", False),
        (["a/*/c"], b"a/b", True),
        (["a/*/c"], b"a/b/c", True),
        (["a/*/c"], b"a/b/d", False),
        ([], b"", False),
    ],
)
def test_a_directory_is_in_reach_when_an_entry_made_in_it_may_be_excluded(
    patterns: list[str], directory: bytes, in_reach: bool
) -> None:
    assert Exclude(patterns).in_reach(directory) is in_reach
    assert Exclude(patterns).anywhere is any("/" not in p.rstrip("/") for p in patterns)


@pytest.mark.parametrize(
    ("patterns", "directory", "in_reach"),
    [
        (["*.tmp"], b"", False),  # the name is the caller's to match
        (["*.tmp"], b"d/x.tmp", True),  # excluded itself
        (["*.tmp", "cache/*"], b"cache", True),
        (["*.tmp", "cache/*"], b"srv", False),
    ],
)
def test_without_names_only_the_directory_and_anchored_patterns_count(
    patterns: list[str], directory: bytes, in_reach: bool
) -> None:
    assert Exclude(patterns).in_reach(directory, names=False) is in_reach


@pytest.mark.parametrize(
    ("patterns", "names"),
    [
        (["*.tmp"], [b"*.tmp"]),
        (["cache", "core/"], [b"cache", b"core"]),
        (["[ab]*.log", "x?y", "a*b*c", ".nfs*", "*~"], [b"*.log", b"x*y", b"a*c", b".nfs*", b"*~"]),
        (["[unclosed"], [b"*unclosed"]),
        (["]x"], [b"*x"]),
        (["*.é"], [b"*.\xc3\xa9"]),
        (["cache/*", "a/b"], []),  # anchored: not names
        (["*.tmp", "*.tmp/"], [b"*.tmp"]),
    ],
)
def test_names_are_the_patterns_without_slash_widened_to_a_prefix_and_a_suffix(
    patterns: list[str], names: list[bytes]
) -> None:
    assert Exclude(patterns).names() == names


def widened_match(form: bytes, name: bytes) -> bool:
    """tandem_engine.c's te_excluded, for one widened pattern."""
    if b"*" not in form:
        return form == name
    pre, post = form.split(b"*")
    return len(pre) + len(post) <= len(name) and name.startswith(pre) and name.endswith(post)


_CHARS = "ab.*?[]!-^é€\\"
_GLOB = st.text(alphabet=_CHARS, min_size=1, max_size=8).filter(lambda g: pattern_error(g) is None and "/" not in g)


@settings(max_examples=2000, deadline=None)
@given(glob=_GLOB, data=st.data())
def test_every_name_a_pattern_excludes_matches_its_widened_form(glob: str, data: st.DataObject) -> None:
    """The native data path leaves a name to Python when its widened form matches: it must never
    miss a name that excluded() would exclude (then F would ship an excluded entry). The names are
    drawn from what the pattern matches."""
    name = os.fsencode(data.draw(st.from_regex(fnmatch.translate(glob), fullmatch=True, alphabet=_CHARS).filter(bool)))
    exclude = Exclude([glob])
    (form,) = exclude.names()
    assert exclude.excluded(name)
    assert widened_match(form, name), (glob, name, form)
