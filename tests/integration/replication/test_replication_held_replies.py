"""The operations Python serves on the primary whose reply the native data path holds until the ack.

Python applies a create, an unlink, a rename, a chmod, ... and ships its frame; the engine holds the
reply pyfuse3 writes for that request and sends it to the kernel once the secondary answered the
frame (or the stream ended), so Python never waits for that ack itself. The promise stays the
mode's: the call returns only once the secondary has the change. A stopped secondary holds every
such call back; a killed one lets it complete locally; an error it reports still reaches Python.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ExpectedLogs
from tests.daemons import freeze
from tests.integration.replication.pairs import Pair
from tests.integration.replication.test_replication_engine import _counts
from tests.integration.replication.test_replication_partition import in_background
from tests.integration.replication.test_replication_resync import assert_same_trees, stop_both


def _setup(top: Path) -> None:
    (top / "old").write_bytes(b"o" * 5000)
    (top / "gone").write_bytes(b"g")
    (top / "emptydir").mkdir()
    os.setxattr(top / "old", b"user.tag", b"before")


# Each one a single request that Python serves and ships: (what it does, what the secondary then shows).
_OPERATIONS: dict[str, tuple[Callable[[Path], None], Callable[[Path], bool]]] = {
    "create": (
        lambda t: os.close(os.open(t / "new", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)),
        lambda t: (t / "new").exists(),
    ),
    "mkdir": (lambda t: os.mkdir(t / "newdir"), lambda t: (t / "newdir").is_dir()),
    "unlink": (lambda t: os.unlink(t / "gone"), lambda t: not (t / "gone").exists()),
    "rmdir": (lambda t: os.rmdir(t / "emptydir"), lambda t: not (t / "emptydir").exists()),
    "rename": (lambda t: os.rename(t / "old", t / "renamed"), lambda t: (t / "renamed").exists()),
    "symlink": (lambda t: os.symlink("old", t / "sym"), lambda t: os.path.lexists(t / "sym")),
    "link": (lambda t: os.link(t / "old", t / "hard"), lambda t: (t / "hard").exists()),
    "chmod": (lambda t: os.chmod(t / "old", 0o600), lambda t: (t / "old").stat().st_mode & 0o777 == 0o600),
    "truncate": (lambda t: os.truncate(t / "old", 10), lambda t: (t / "old").stat().st_size == 10),
    "setxattr": (
        lambda t: os.setxattr(t / "old", b"user.tag", b"after"),
        lambda t: os.getxattr(t / "old", b"user.tag") == b"after",
    ),
    "removexattr": (lambda t: os.removexattr(t / "old", b"user.tag"), lambda t: not os.listxattr(t / "old")),
    "open-trunc": (
        lambda t: os.close(os.open(t / "old", os.O_WRONLY | os.O_TRUNC)),
        lambda t: (t / "old").stat().st_size == 0,
    ),
}


@pytest.mark.parametrize("ack", ["received", "durable"])
@pytest.mark.parametrize("op", sorted(_OPERATIONS))
def test_a_call_python_serves_returns_only_once_the_secondary_has_it(pair: Pair, op: str, ack: str) -> None:
    # No read-only mount on the secondary: its daemon is the process stopped here.
    pair.start(ack, secondary_mount=False)
    _setup(pair.primary_dir)
    do, shows = _OPERATIONS[op]
    freeze(pair.pid("secondary"))
    try:
        done, errors = in_background(lambda: do(pair.primary_dir))
        # The frame sits unread in the stopped secondary's socket: no ack, so no reply. A reply the
        # engine let through (or Python's, not held) would return in well under a millisecond.
        assert not done.wait(0.5), f"{op} returned before the secondary acknowledged it: {errors}"
        assert not errors, errors
    finally:
        os.kill(pair.pid("secondary"), signal.SIGCONT)
    assert done.wait(30), f"{op} still waits after the secondary went on"
    assert not errors, errors
    if ack == "durable":
        # Acknowledged in durable mode means applied (and on the secondary's disk) already.
        assert shows(pair.secondary_dir), op
    stop_both(pair)
    assert shows(pair.secondary_dir), op
    assert_same_trees(pair)
    assert _counts(pair.log("primary"))["held"] >= 1, pair.log("primary")


def test_a_held_call_completes_locally_when_the_secondary_dies(pair: Pair, expected_logs: ExpectedLogs) -> None:
    expected_logs.expect("Replication stream lost")
    pair.start("received", secondary_mount=False)
    seen = len(pair.events("primary"))
    freeze(pair.pid("secondary"))
    done, errors = in_background(lambda: os.mkdir(pair.primary_dir / "during"))
    assert not done.wait(0.5), f"mkdir returned before the secondary acknowledged it: {errors}"
    # Its kernel closes the stream for it: the engine releases the held reply.
    pair.kill("secondary")
    assert done.wait(30), "mkdir still waits for a secondary that is gone"
    assert not errors, errors
    assert (pair.primary_dir / "during").is_dir()
    pair.wait_event("primary", lambda e: e.get("state") == "disconnected", 30, seen)
    # Back: the resync brings the directory over.
    pair.start_secondary("received", mount=False)
    pair.wait_in_sync(after=seen)
    assert (pair.secondary_dir / "during").is_dir()
    stop_both(pair)
    assert_same_trees(pair)


def test_an_error_the_secondary_reports_for_a_held_call_reaches_python(pair: Pair, expected_logs: ExpectedLogs) -> None:
    expected_logs.expect("Replication error")
    expected_logs.expect("Replication stream lost")
    pair.start("durable", secondary_mount=False)
    seen = len(pair.events("primary"))
    # The secondary's copy diverged behind the replicators' back: its Create of this name fails.
    (pair.secondary_dir / "clash").write_bytes(b"secondary only")
    fd = os.open(pair.primary_dir / "clash", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.write(fd, b"primary")
    os.close(fd)
    error = pair.wait_event("primary", lambda e: e.get("event") == "error", 30, seen)
    assert "clash" in error["message"] and f"errno {errno.EEXIST}" in error["message"], error
    # Dropped and resynced: the primary's file wins.
    pair.wait_in_sync(after=seen)
    assert (pair.secondary_dir / "clash").read_bytes() == b"primary"
    stop_both(pair)
    assert_same_trees(pair)
    assert _counts(pair.log("primary"))["held"] >= 1


def test_without_the_native_path_nothing_is_held(pair: Pair) -> None:
    pair.extra = ["--no-native-writes"]
    pair.start("received")
    for op, (do, _) in _OPERATIONS.items():
        (pair.primary_dir / op).mkdir()
        _setup(pair.primary_dir / op)
        do(pair.primary_dir / op)
    stop_both(pair)
    assert_same_trees(pair)
    assert _counts(pair.log("primary")).get("held", 0) == 0


def test_with_a_writeback_cache_creates_and_unlinks_return_at_once_and_a_close_waits_for_them(pair: Pair) -> None:
    """`fsync` mode: the native data path answers a CREATE and an UNLINK as soon as their frames
    are sent (the promise of a local disk, as Python's handlers in that mode); the next close still
    returns only once the secondary has received them, on any file (its FLUSH, the native data
    path's too, waits for the secondary's answer to the last frame sent)."""
    pair.start("fsync", secondary_mount=False)
    _setup(pair.primary_dir)
    other = os.open(pair.primary_dir / "old", os.O_RDWR)
    fds: list[int] = []

    def create_and_unlink() -> None:
        fds.append(os.open(pair.primary_dir / "new", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640))
        os.unlink(pair.primary_dir / "gone")

    freeze(pair.pid("secondary"))
    try:
        done, errors = in_background(create_and_unlink)
        assert done.wait(10), "a create or an unlink waited for the stopped secondary"
        assert not errors, errors
        closed, close_errors = in_background(lambda: os.close(other))
        # The stopped secondary reads nothing: no Pong, so no close.
        assert not closed.wait(0.5), f"close returned before the secondary received the create: {close_errors}"
    finally:
        os.kill(pair.pid("secondary"), signal.SIGCONT)
    assert closed.wait(30), "close still waits after the secondary went on"
    assert not close_errors, close_errors
    os.close(fds[0])
    stop_both(pair)
    assert (pair.secondary_dir / "new").exists() and not (pair.secondary_dir / "gone").exists()
    assert_same_trees(pair)
    counts = _counts(pair.log("primary"))
    # The close was the native data path's too (FLUSH, answered once the secondary answered).
    assert counts["create"] >= 1 and counts["unlink"] >= 1 and counts["engine_flush"] >= 1, counts
