"""The tables each mount hands to Tandem's pyfuse3 patch, whose answers stand in for Python methods."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.replication.passthrough import Passthrough
from agent.replication.primary import ReplicatedFS
from agent.replication.readonly import ReadOnlyFS
from agent.replication.sender import Sender


@pytest.fixture
def root_fd(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    yield fd
    os.close(fd)


def test_the_answered_requests_are_the_ones_no_mount_overrides() -> None:
    # pyfuse3 answers GETATTR, READ and RELEASE without calling these: an override would be bypassed.
    for cls in (ReplicatedFS, ReadOnlyFS):
        for name in ("getattr", "read", "release"):
            assert getattr(cls, name) is getattr(Passthrough, name), f"{cls.__name__}.{name}"
    # A missing name: ENOENT (Passthrough, ReadOnlyFS) or a negative entry (ReplicatedFS's tables say so).
    assert ReadOnlyFS.lookup is Passthrough.lookup


def test_the_primary_hands_over_its_live_tables(root_fd: int) -> None:
    fs = ReplicatedFS(root_fd, Sender(node="n", secret=None, ack="received"))
    tables = fs.native_tables()
    # The very objects the handlers change in place, never copies.
    assert tables["nodes"] is fs.inodes.nodes
    assert tables["files"] is fs._files
    assert tables["no_caps"] is fs._no_caps
    assert tables["attr_timeout"] == tables["negative_timeout"] == fs.timeout
    assert tables["release"] is True


def test_the_secondary_caches_nothing_and_keeps_no_negative_entries(root_fd: int) -> None:
    tables = ReadOnlyFS(root_fd).native_tables()
    assert tables["attr_timeout"] == 0.0
    assert "negative_timeout" not in tables and "no_caps" not in tables
    assert tables["nodes"] is not None and tables["files"] is not None
