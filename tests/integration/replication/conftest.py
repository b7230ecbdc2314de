"""The `pair` fixture: two replicators over two fresh directories, always stopped and unmounted."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.replication.pairs import Pair


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    if shutil.which("fusermount3") is None:
        pytest.fail("fusermount3 is missing: apt-get install -y fuse3")
    p = Pair(tmp_path / "node1" / "data", tmp_path / "node2" / "data", tmp_path)
    p.primary_dir.mkdir(parents=True)
    p.secondary_dir.mkdir(parents=True)
    try:
        yield p
    finally:
        p.close()
