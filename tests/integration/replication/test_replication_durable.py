"""`ack: durable` means on the secondary's disk: checked on a copy of that disk taken right after the acks.

The secondary's directory lives on an ext4 in a loop image, mounted with a 60 s journal commit so
nothing reaches the image by itself during a test. Copying the image after the acks and mounting the
copy (ext4 replays its journal) shows what a power cut at that moment would leave.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import pytest

from agent.replication import messages as m
from agent.replication import receiver as receiver_module
from agent.replication.connection import FrameConnection
from agent.replication.dirty import Dirty
from agent.replication.receiver import AckMode
from agent.replication.wire import Frame
from bench.disk import loop_mount, make_ext4
from tests.conftest import ExpectedLogs
from tests.integration.replication.links import open_link

DATA = bytes(range(256)) * 40  # 10 KiB: three pages, the last one partial
OPERATIONS: list[m.Message] = [
    m.Mkdir(b"d", 0o755, 0, 0),
    m.Create(b"d/f", 0o640, 0, 0, 0),
    m.Write(b"d/f", 0, DATA),
    m.Rename(b"d/f", b"d/g", 0),
    m.Setattr(b"d/g", mode=0o600),
    m.Symlink(b"d/l", b"g", 0, 0),
    m.Setattr(b"d/l", uid=1000),  # a symlink is never opened: its directory's fsync commits it
    m.Create(b"gone", 0o644, 0, 0, 0),
    m.Unlink(b"gone"),
    m.Mkdir(b"e", 0o700, 0, 0),
    m.Setxattr(b"e", b"user.k", 0, b"v"),
]


def _state(root: Path) -> dict[str, object]:
    """What the operations above leave, as far as they got."""
    g, d = root / "d" / "g", root / "d"
    return {
        "d": d.is_dir(),
        "g": g.read_bytes() if g.is_file() else None,
        "g mode": stat.S_IMODE(g.stat().st_mode) if g.is_file() else None,
        "f": (d / "f").exists(),
        "l": os.readlink(d / "l") if (d / "l").is_symlink() else None,
        "l owner": os.lstat(d / "l").st_uid if (d / "l").is_symlink() else None,
        "gone": (root / "gone").exists(),
        "e xattr": os.getxattr(root / "e", "user.k") if (root / "e").is_dir() else None,
    }


APPLIED = {
    "d": True,
    "g": DATA,
    "g mode": 0o600,
    "f": False,
    "l": "g",
    "l owner": 1000,
    "gone": False,
    "e xattr": b"v",
}


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """The secondary's disk: a fresh ext4 whose journal commits only when asked (or after 60 s)."""
    if shutil.which("mkfs.ext4") is None:
        pytest.fail("mkfs.ext4 is missing: apt-get install -y e2fsprogs")
    make_ext4(tmp_path / "disk.img", 64 << 20, lazy=True)
    with loop_mount(tmp_path / "disk.img", tmp_path / "mnt", "commit=60") as mnt:
        (mnt / "repl").mkdir()
        os.sync()  # the directory itself is on the image before the test starts
        yield mnt / "repl"


@contextlib.contextmanager
def thin_disk(tmp_path: Path) -> Iterator[Path]:
    """A thin disk: an ext4 mount whose image's host (a 12 MiB tmpfs) fills up before the file
    system does, so data is accepted into the page cache and fails at writeback, as on a full thin
    volume. Yields the mount, with an empty `repl` directory in it."""
    host = tmp_path / "host"
    host.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(host)], check=True)
    try:
        make_ext4(host / "disk.img", 64 << 20, lazy=True)
        with loop_mount(host / "disk.img", tmp_path / "mnt", "noinit_itable") as mnt:
            (mnt / "repl").mkdir()
            yield mnt
    finally:
        subprocess.run(["umount", "-l", str(host)], check=False)


def fail_flush_once(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The receiver's first group flush fails with EIO, the later ones succeed; one entry per flush."""
    flushes: list[int] = []

    def flushed_once(dirty: Dirty) -> OSError | None:
        flushes.append(1)
        dirty.discard()
        return OSError(errno.EIO, "injected") if len(flushes) == 1 else None

    monkeypatch.setattr(receiver_module, "_flushed", flushed_once)
    return flushes


def fail_fsync_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process's first os.fsync fails with EIO, the later ones are real."""
    real, calls = os.fsync, []

    def fsync_fails_once(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, "injected")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync_fails_once)


def _after_power_cut(tmp_path: Path) -> contextlib.AbstractContextManager[Path]:
    """The secondary's disk as a power cut now would leave it, mounted (its journal replayed)."""
    shutil.copyfile(tmp_path / "disk.img", tmp_path / "cut.img")
    return loop_mount(tmp_path / "cut.img", tmp_path / "cut")


async def _acks(conn: FrameConnection, count: int) -> dict[int, m.Message]:
    got: dict[int, m.Message] = {}
    while len(got) < count:
        frame = await asyncio.wait_for(conn.read(), 10)
        assert frame is not None, f"connection ended after {sorted(got)}"
        got[frame.seq] = frame.msg
    return got


async def _send(conn: FrameConnection, ops: list[m.Message]) -> None:
    for seq, op in enumerate(ops, 1):
        conn.send_nowait(Frame(seq, op))
    await conn.drain()


async def test_acknowledged_durable_operations_survive_a_power_cut(disk: Path, tmp_path: Path) -> None:
    async with open_link(disk, AckMode.DURABLE) as link:
        await _send(link.conn, OPERATIONS)
        acks = await _acks(link.conn, len(OPERATIONS))
        assert all(ack == m.Ack() for ack in acks.values()), acks
        with _after_power_cut(tmp_path) as cut:
            assert _state(cut / "repl") == APPLIED


# As the primary sends a Write: one time fix, for the written file itself (the native data path's).
FIX = (m.TimeFix(b"f", 1_600_000_000_000_000_000, 1_700_000_000_000_000_000),)


def _writes(count: int, size: int, first_seq: int) -> list[Frame]:
    return [Frame(first_seq + i, m.Write(b"f", i * size, bytes([i % 256]) * size, FIX)) for i in range(count)]


async def test_writes_the_native_data_path_acknowledges_survive_a_power_cut(disk: Path, tmp_path: Path) -> None:
    # Once Python flushed the Create, the native data path applies the writes itself, and
    # acknowledges each batch only after its own flush.
    applied = pyfuse3.receiver_counts()["applied"]
    async with open_link(disk, AckMode.DURABLE, native=True) as link:
        await _send(link.conn, [m.Create(b"f", 0o644, 0, 0, 0)])
        assert await _acks(link.conn, 1) == {1: m.Ack()}
        for frame in _writes(20, 4096, 2):
            link.conn.send_nowait(frame)
            assert await _acks(link.conn, 1) == {frame.seq: m.Ack()}
        for frame in _writes(20, 4096, 22)[:10]:  # and in one batch
            link.conn.send_nowait(frame)
        acks = await _acks(link.conn, 10)
        # A write of STREAM_WRITE_BYTES and more too: nothing is acknowledged before its flush anyway.
        link.conn.send_nowait(Frame(32, m.Write(b"f", 20 * 4096, b"B" * (1 << 20), FIX)))
        acks |= await _acks(link.conn, 1)
        assert all(ack == m.Ack() for ack in acks.values()), acks
        with _after_power_cut(tmp_path) as cut:
            expected = b"".join(bytes([i]) * 4096 for i in range(20)) + b"B" * (1 << 20)
            assert (cut / "repl" / "f").read_bytes() == expected
    assert pyfuse3.receiver_counts()["applied"] - applied >= 21


async def test_creates_and_unlinks_the_native_data_path_acknowledges_survive_a_power_cut(
    disk: Path, tmp_path: Path
) -> None:
    # As the primary sends them (time fixes for the entry and its directory), one at a time: the
    # native data path applies all but the first, and its flush syncs the new files and their
    # directories before each ack.
    named = pyfuse3.receiver_counts()["named"]
    t = 1_650_000_000_000_000_000
    ops: list[m.Message] = [
        m.Mkdir(b"d", 0o755, 0, 0),
        m.Create(b"d/gone", 0o644, 0, 0, 0, (m.TimeFix(b"d/gone", t, t), m.TimeFix(b"d", t, t))),
        m.Create(b"d/f", 0o640, 1000, 1000, 0, (m.TimeFix(b"d/f", t, t), m.TimeFix(b"d", t, t))),
        m.Write(b"d/f", 0, b"kept", (m.TimeFix(b"d/f", t, t),)),
        m.Create(b"top", 0o600, 0, 0, 0, (m.TimeFix(b"top", t, t), m.TimeFix(b"", t, t))),
        m.Unlink(b"d/gone", (m.TimeFix(b"d", t, t),)),
    ]
    async with open_link(disk, AckMode.DURABLE, native=True) as link:
        for seq, op in enumerate(ops, 1):
            link.conn.send_nowait(Frame(seq, op))
            assert await _acks(link.conn, 1) == {seq: m.Ack()}
        with _after_power_cut(tmp_path) as cut:
            repl = cut / "repl"
            st = os.stat(repl / "d" / "f")
            assert (repl / "d" / "f").read_bytes() == b"kept"
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 1000, 1000)
            assert (repl / "top").exists() and not (repl / "d" / "gone").exists()
    assert pyfuse3.receiver_counts()["named"] - named == 4


async def test_a_batch_too_large_for_an_fsync_each_is_flushed_whole(disk: Path, tmp_path: Path) -> None:
    # 300 files sent at once: the batches hold more inodes than dirty.MAX_INODES, one syncfs each.
    ops: list[m.Message] = []
    for i in range(300):
        ops += [m.Create(b"f%d" % i, 0o644, 0, 0, 0), m.Write(b"f%d" % i, 0, b"%d" % i)]
    async with open_link(disk, AckMode.DURABLE) as link:
        await _send(link.conn, ops)
        acks = await _acks(link.conn, len(ops))
        assert all(ack == m.Ack() for ack in acks.values()), {s: a for s, a in acks.items() if a != m.Ack()}
        with _after_power_cut(tmp_path) as cut:
            assert all((cut / "repl" / f"f{i}").read_bytes() == b"%d" % i for i in range(300))


async def test_received_mode_makes_no_such_promise(disk: Path, tmp_path: Path) -> None:
    # The control: the same check sees that acknowledged-on-receipt operations are not on the disk yet.
    async with open_link(disk, AckMode.RECEIVED) as link:
        await _send(link.conn, OPERATIONS)
        await _acks(link.conn, len(OPERATIONS))
        for _ in range(500):
            if _state(disk) == APPLIED:
                break
            await asyncio.sleep(0.01)
        assert _state(disk) == APPLIED
        with _after_power_cut(tmp_path) as cut:
            assert _state(cut / "repl") != APPLIED


async def test_a_batch_that_cannot_reach_the_disk_is_acknowledged_as_failed(
    tmp_path: Path, expected_logs: ExpectedLogs
) -> None:
    expected_logs.expect(r"flushing seq \d+-\d+ to disk failed")
    expected_logs.expect(r"Replication error applying seq=\d+: Write b'big': Read-only file system")
    with thin_disk(tmp_path) as mnt:
        chunk = b"x" * (1 << 20)
        ops: list[m.Message] = [m.Create(b"big", 0o644, 0, 0, 0)]
        ops += [m.Write(b"big", i << 20, chunk) for i in range(24)]
        async with open_link(mnt / "repl", AckMode.DURABLE) as link:
            await _send(link.conn, ops)
            acks = await _acks(link.conn, len(ops))
            failed = {seq: ack.status for seq, ack in acks.items() if isinstance(ack, m.Ack) and ack.status}
            assert failed, "24 MiB reached a 12 MiB disk"
            # Once a flush failed nothing after it is acknowledged as done (ext4 also turns read-only).
            assert set(failed) == set(range(min(failed), len(ops) + 1)), failed
            assert set(failed.values()) <= {errno.ENOSPC, errno.EIO, errno.EROFS}, failed


async def test_a_native_flush_that_cannot_reach_the_disk_fails_every_later_ack(
    tmp_path: Path, expected_logs: ExpectedLogs
) -> None:
    # Writes below STREAM_WRITE_BYTES, one at a time: the native data path applies and flushes each.
    expected_logs.expect(r"native data path's sync of seq \d+ failed: flushing to disk")
    expected_logs.expect(r"Replication error applying seq=\d+")
    applied = pyfuse3.receiver_counts()["applied"]
    with thin_disk(tmp_path) as mnt:
        async with open_link(mnt / "repl", AckMode.DURABLE, native=True) as link:
            await _send(link.conn, [m.Create(b"f", 0o644, 0, 0, 0)])
            assert await _acks(link.conn, 1) == {1: m.Ack()}
            acks: dict[int, m.Message] = {}
            for frame in _writes(96, 192 << 10, 2):
                link.conn.send_nowait(frame)
                acks |= await _acks(link.conn, 1)
    failed = {seq: ack.status for seq, ack in acks.items() if isinstance(ack, m.Ack) and ack.status}
    assert failed, "18 MiB reached a 12 MiB disk"
    assert set(failed) == set(range(min(failed), 98)), failed
    assert set(failed.values()) <= {errno.ENOSPC, errno.EIO, errno.EROFS}, failed
    # The first failure was the native data path's own flush.
    assert pyfuse3.receiver_counts()["applied"] - applied >= min(failed) - 2


async def test_after_a_failed_flush_no_later_batch_is_acknowledged(
    disk: Path, monkeypatch: pytest.MonkeyPatch, expected_logs: ExpectedLogs
) -> None:
    # fsync reports a writeback error once: a later flush may succeed although the earlier data
    # never reached the disk. Here the first flush fails and a second one would succeed.
    expected_logs.expect(r"flushing seq \d+-\d+ to disk failed")
    expected_logs.expect(r"Replication error applying seq=\d+")
    flushes = fail_flush_once(monkeypatch)
    async with open_link(disk, AckMode.DURABLE) as link:
        await _send(link.conn, [m.Create(b"f", 0o644, 0, 0, 0)])
        first = await _acks(link.conn, 1)
        assert first == {1: m.Ack(errno.EIO, "flushing to disk: Input/output error")}
        for seq, op in enumerate([m.Write(b"f", 0, b"x"), m.Mkdir(b"d", 0o755, 0, 0)], 2):
            link.conn.send_nowait(Frame(seq, op))
            (ack,) = (await _acks(link.conn, 1)).values()
            assert isinstance(ack, m.Ack) and ack.status == errno.EIO, ack
    assert flushes == [1], "a flush was tried again after one failed"


@pytest.mark.parametrize("mode", [AckMode.RECEIVED, AckMode.DURABLE])
async def test_after_a_failed_fsync_no_later_fsync_is_acknowledged(
    disk: Path, mode: AckMode, monkeypatch: pytest.MonkeyPatch, expected_logs: ExpectedLogs
) -> None:
    expected_logs.expect(r"fsync of seq \d+ failed")
    expected_logs.expect(r"Replication error applying seq=\d+")
    expected_logs.expect(r"flushing seq \d+-\d+ to disk failed")
    fail_fsync_once(monkeypatch)
    async with open_link(disk, mode) as link:
        await _send(link.conn, [m.Create(b"f", 0o644, 0, 0, 0), m.Fsync(b"f", False)])
        acks = await _acks(link.conn, 2)
        assert isinstance(acks[2], m.Ack) and acks[2].status == errno.EIO, acks
        link.conn.send_nowait(Frame(3, m.Fsync(b"f", False)))
        (ack,) = (await _acks(link.conn, 1)).values()
        assert isinstance(ack, m.Ack) and ack.status == errno.EIO, ack
