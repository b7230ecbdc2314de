"""The secondary's read-only mount: replicated data is readable there, every local change gets EROFS."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.replication.pairs import Pair, mounted


def _eventually(probe: Callable[[], bool]) -> None:
    # Acks in `durable` mode come after the apply, so this only waits on the test's own read path.
    deadline = time.monotonic() + 10
    while not probe():
        assert time.monotonic() < deadline, "the secondary's mount never showed the replicated change"
        time.sleep(0.02)


def _erofs(action: Callable[[], object]) -> None:
    with pytest.raises(OSError) as info:
        action()
    assert info.value.errno == errno.EROFS, info.value


def _mutations(top: Path) -> list[Callable[[], object]]:
    return [
        lambda: (top / "new").touch(),
        lambda: (top / "f").write_text("local change"),
        lambda: open(top / "f", "ab"),
        lambda: os.truncate(top / "f", 0),
        lambda: (top / "newdir").mkdir(),
        lambda: os.unlink(top / "f"),
        lambda: os.rmdir(top / "d"),
        lambda: os.rename(top / "f", top / "g"),
        lambda: os.chmod(top / "f", 0o777),
        lambda: os.chown(top / "f", 1000, 1000),
        lambda: os.utime(top / "f", (1, 1)),
        lambda: os.setxattr(top / "f", "user.x", b"1"),
        lambda: os.removexattr(top / "f", "user.color"),
        lambda: os.symlink("f", top / "l"),
        lambda: os.link(top / "f", top / "h"),
        lambda: os.mkfifo(top / "fifo"),
    ]


@pytest.mark.slow
def test_secondary_mount_reads_replicated_data_and_refuses_changes(pair: Pair) -> None:
    pair.start("durable")
    primary, secondary = pair.primary_dir, pair.secondary_dir
    (primary / "d").mkdir()
    (primary / "d" / "inner").write_bytes(b"x" * 100_000)
    (primary / "f").write_text("replicated")
    os.setxattr(primary / "f", "user.color", b"blue")
    assert mounted(secondary)
    assert (secondary / "f").read_text() == "replicated"
    assert (secondary / "d" / "inner").read_bytes() == b"x" * 100_000
    assert sorted(os.listdir(secondary)) == ["d", "f"]
    assert os.getxattr(secondary / "f", "user.color") == b"blue"
    with open(secondary / "f", "rb") as fh:
        os.fsync(fh.fileno())  # a reader's fsync is harmless
    for action in _mutations(secondary):
        _erofs(action)
    touch = subprocess.run(["touch", str(secondary / "by-touch")], capture_output=True, text=True)
    assert touch.returncode != 0 and "Read-only file system" in touch.stderr
    # Later changes show through the mount: nothing is cached as fresh on the secondary.
    (primary / "f").write_text("changed again")
    os.unlink(primary / "d" / "inner")
    _eventually(lambda: (secondary / "f").read_text() == "changed again")
    _eventually(lambda: not (secondary / "d" / "inner").exists())
    assert pair.stop("primary") == 0, pair.log("primary")
    assert pair.stop("secondary") == 0, pair.log("secondary")
    assert not mounted(secondary)
    assert (secondary / "f").read_text() == "changed again"
    assert os.getxattr(secondary / "f", "user.color") == b"blue"
    assert not (secondary / "new").exists() and not (secondary / "by-touch").exists()
    logs = pair.log("primary") + pair.log("secondary")
    assert "ERROR" not in logs and "Traceback" not in logs, logs


def test_secondary_mount_reads_what_the_applier_wrote_even_with_the_same_size_and_mtime(pair: Pair) -> None:
    """The applier gives each file the primary's mtime, so a change can keep both the size and the
    mtime that the kernel compares before it keeps cached pages: every open drops them instead."""
    pair.start("durable")
    primary, secondary = pair.primary_dir / "same", pair.secondary_dir / "same"
    primary.write_bytes(b"a" * 4096)
    os.utime(primary, ns=(10**18, 10**18))
    _eventually(lambda: os.stat(secondary).st_mtime_ns == 10**18)
    assert secondary.read_bytes() == b"a" * 4096  # now in the secondary's page cache
    with open(primary, "r+b", buffering=0) as f:
        f.write(b"b" * 4096)
        os.utime(f.fileno(), ns=(10**18, 10**18))
    _eventually(lambda: secondary.read_bytes() == b"b" * 4096)
    assert os.stat(secondary).st_mtime_ns == 10**18
