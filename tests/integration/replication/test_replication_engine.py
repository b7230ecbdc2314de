"""The native data path (agent/replication/native).

On the primary, the writes, fsyncs, creates and unlinks that its own thread serves and ships keep
the secondary equal to the primary while Python renames their directories, renames the files
themselves, truncates them and unlinks others around them, all at once. On the secondary, the Write
frames it applies itself take their place among the frames Python applies, and whatever it is not
sure of (a hostile path, a FIFO, a full disk) goes to Python, which refuses or reports it as
before."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import re
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyfuse3
import pytest

from agent.replication import messages as m
from agent.replication.connection import FrameConnection
from agent.replication.receiver import AckMode
from agent.replication.wire import Frame, decode_body, encode, frame_length
from tests.conftest import ExpectedLogs
from tests.integration.replication.links import open_link
from tests.integration.replication.pairs import Pair
from tests.integration.replication.test_replication_durable import fail_flush_once, fail_fsync_once, thin_disk
from tests.integration.replication.test_replication_resync import assert_same_trees, stop_both

DIRS, FILES, ROUNDS = 4, 4, 300


def _counts(log: str) -> dict[str, int]:
    line = [ln for ln in log.splitlines() if "answered natively:" in ln][-1]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line.split("answered natively:")[1])}


def _workload(top: Path) -> None:
    """Writers through open fds, while other threads rename, truncate and unlink beneath them."""
    fds = {}
    for d in range(DIRS):
        (top / f"d{d}").mkdir()
        for f in range(FILES):
            fds[d, f] = os.open(top / f"d{d}" / f"f{f}", os.O_RDWR | os.O_CREAT, 0o644)
    (top / "scratch").mkdir()
    errors: list[BaseException] = []

    def guarded(fn):  # type: ignore[no-untyped-def]
        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                errors.append(exc)

        return run

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        for i in range(ROUNDS):
            fd = fds[rng.randrange(DIRS), rng.randrange(FILES)]
            os.pwrite(fd, rng.randbytes(rng.choice((1, 512, 3000, 4096, 70_000))), rng.randrange(1 << 20))
            if i % 16 == 0:
                (os.fdatasync if i % 32 else os.fsync)(fd)

    def renamer() -> None:
        # Each directory, and the files of d0, keep changing names while the writers write.
        for i in range(ROUNDS // 5):
            d = i % DIRS
            os.rename(top / f"d{d}", top / f"moved{d}")
            os.rename(top / f"moved{d}", top / f"d{d}")
            os.rename(top / "d0" / "f1", top / "d0" / "renamed")
            os.rename(top / "d0" / "renamed", top / "d0" / "f1")

    def truncater() -> None:
        rng = random.Random(7)
        for _ in range(ROUNDS // 5):
            os.ftruncate(fds[rng.randrange(DIRS), rng.randrange(FILES)], rng.randrange(1 << 20))

    def churn() -> None:
        # Files created, written, synced and unlinked by path: their names come and go.
        for i in range(ROUNDS // 5):
            path = top / "scratch" / f"t{i % 3}"
            with open(path, "wb") as fh:
                fh.write(b"t" * (i + 1))
                fh.flush()
                os.fsync(fh.fileno())
            if i % 2:
                path.unlink()

    def dir_churn() -> None:
        # Files created, linked and unlinked by path in the directories the renamer moves: the
        # native path's creates and unlinks race Python's renames (a name missing for a moment,
        # while its directory is away, is skipped).
        for i in range(ROUNDS):
            d = top / f"d{i % DIRS}"
            path, link = d / f"c{i % 5}", d / f"c{i % 5}.link"
            with contextlib.suppress(FileNotFoundError, FileExistsError):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    os.write(fd, b"c%d" % i * (i % 50 + 1))
                finally:
                    os.close(fd)
                if i % 7 == 0:
                    os.link(path, link)
                if i % 3:
                    path.unlink()
                if i % 11 == 0:
                    link.unlink()

    threads = [threading.Thread(target=guarded(lambda s=s: writer(s))) for s in range(4)]
    threads += [threading.Thread(target=guarded(fn)) for fn in (renamer, truncater, churn, dir_churn)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for fd in fds.values():
        os.close(fd)
    assert not errors, errors


@pytest.mark.slow
@pytest.mark.parametrize("ack", ["received", "durable", "fsync"])
def test_native_writes_among_renames_truncates_and_unlinks_leave_equal_trees(pair: Pair, ack: str) -> None:
    pair.start(ack)
    _workload(pair.primary_dir)
    stop_both(pair)
    assert_same_trees(pair)
    counts = _counts(pair.log("primary"))
    # Most writes and fsyncs went the native way; those a rename caught went through Python. (With
    # the writeback cache of `fsync` mode the kernel merges writes of a page before they come.)
    assert counts["write"] > (ROUNDS if ack != "fsync" else 0) and counts["fsync"] > 0, counts
    assert counts["create"] > 0 and counts["unlink"] > 0, counts
    assert "The native data path serves writes and fsyncs" in pair.log("primary")
    secondary = _counts(pair.log("secondary"))
    assert secondary["applied"] > 0, secondary
    if ack == "fsync":
        # The kernel writes each file's mtime back (SETATTR) before an fsync: served, shipped and
        # applied natively too, and the trees' mtimes above are equal.
        assert counts["setattr"] > 0 and secondary["timed"] > 0, (counts, secondary)


@pytest.mark.slow
def test_fsync_mode_replicates_the_mtime_the_kernel_writes_back(pair: Pair) -> None:
    pair.start("fsync")
    path = pair.primary_dir / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for i in range(20):
            os.pwrite(fd, bytes([65 + i]) * 4096, i * 4096)
            os.fsync(fd)
    finally:
        os.close(fd)
    mtime = os.stat(path).st_mtime_ns
    stop_both(pair)
    assert os.stat(pair.secondary_dir / "f").st_mtime_ns == mtime
    assert_same_trees(pair)
    counts, secondary = _counts(pair.log("primary")), _counts(pair.log("secondary"))
    assert counts["setattr"] >= 10 and counts["fsync"] >= 10, counts
    assert secondary["timed"] >= 10 and secondary["synced"] >= 10, secondary


@pytest.mark.slow
def test_without_native_writes_python_serves_them_all(pair: Pair) -> None:
    pair.extra = ["--no-native-writes"]
    pair.start("received")
    (pair.primary_dir / "f").write_bytes(b"x" * 10_000)
    stop_both(pair)
    assert_same_trees(pair)
    counts = _counts(pair.log("primary"))
    assert counts["write"] == counts["fsync"] == 0, counts


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _assert_fds_released(pair: Pair, baseline: int) -> None:
    """The kernel drops every inode it can; within 10 s the primary holds no more fds than at `baseline`."""
    subprocess.run(["sh", "-c", "echo 2 > /proc/sys/vm/drop_caches"], check=True)
    deadline = time.monotonic() + 10
    while _open_fds(pair.pid("primary")) > baseline + 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _open_fds(pair.pid("primary")) <= baseline + 5, (baseline, os.listdir(f"/proc/{pair.pid('primary')}/fd"))


@pytest.mark.slow
@pytest.mark.parametrize("ack", ["received", "durable", "fsync"])
def test_the_native_path_creates_and_unlinks_and_python_learns_what_it_did(pair: Pair, ack: str) -> None:
    """F creates and unlinks files; Python then renames, links, chmods, stats and forgets them, and
    unlinks what F must not (a name of an open file); no fd of F's inodes is left behind."""
    pair.start(ack)
    top = pair.primary_dir
    (top / "d").mkdir()
    baseline = _open_fds(pair.pid("primary"))
    for i in range(120):
        fd = os.open(top / "d" / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.write(fd, b"%d" % i * 100)
        os.close(fd)
    with open(top / "f-root", "x") as fh:  # in the root directory
        fh.write("root")
    (top / "d" / "sub").mkdir()  # Python's mkdir: files in it are F's at once
    (top / "d" / "sub" / "inner").write_bytes(b"inner")
    for i in range(0, 120, 2):
        (top / "d" / f"f{i}").unlink()
    os.rename(top / "d" / "f1", top / "d" / "renamed")  # Python, on an inode F made
    os.link(top / "d" / "f3", top / "d" / "f3-link")
    (top / "d" / "f3").unlink()  # one of two names
    os.chmod(top / "d" / "f5", 0o600)
    assert (top / "d" / "f3-link").read_bytes() == b"3" * 100
    assert os.stat(top / "d" / "f7").st_size == 100
    # A name of an open file is unlinked by Python (F knows the file is open): its later writes
    # reach no file on the secondary, and a new file of the same name is the new one there.
    held = os.open(top / "d" / "f9", os.O_WRONLY)
    (top / "d" / "f9").unlink()
    os.pwrite(held, b"after", 0)
    (top / "d" / "f9").write_bytes(b"the new f9")
    os.pwrite(held, b"later", 10)
    os.close(held)
    # After a rename of the directory (Python's: a new generation), F creates there again.
    os.rename(top / "d", top / "e")
    for i in range(120, 140):
        (top / "e" / f"f{i}").write_bytes(b"again")
    for i in range(120, 130):
        (top / "e" / f"f{i}").unlink()
    # The kernel forgets every inode it can: Python's table closes the fds of F's inodes too.
    _assert_fds_released(pair, baseline)
    stop_both(pair)
    assert_same_trees(pair)
    assert (pair.secondary_dir / "e" / "f9").read_bytes() == b"the new f9"
    counts = _counts(pair.log("primary"))
    # Each directory's first create or unlink after Python changed a path goes through Python.
    assert counts["create"] >= 130 and counts["unlink"] >= 65, counts
    if ack == "fsync":
        # The writeback cache writes an unlinked file's mtime back as the kernel evicts it: F sets
        # it and ships nothing, as Python would.
        assert counts["setattr"] >= 60, counts
    assert "creates and unlinks" in pair.log("primary")


@pytest.mark.slow
@pytest.mark.parametrize("ack", ["received", "fsync"])
def test_the_native_path_opens_files_for_reading_and_python_reads_and_syncs_them(pair: Pair, ack: str) -> None:
    """F opens for reading (O_RDONLY, no O_TRUNC); pyfuse3 reads through the handles it learns, Python
    serves an fsync of one, the unlink and the rename of an open file's name; an O_TRUNC open and
    every writable open stay Python's; no fd is left behind."""
    pair.start(ack)
    top = pair.primary_dir
    (top / "d").mkdir()
    baseline = _open_fds(pair.pid("primary"))
    for i in range(40):
        (top / "d" / f"f{i}").write_bytes(b"%02d" % i * 3000)  # 6,000 bytes, F's creates
    os.rename(top / "d" / "f0", top / "d" / "moved")  # an inode Python renamed
    for i in range(1, 40):
        fd = os.open(top / "d" / f"f{i}", os.O_RDONLY)
        try:
            assert os.pread(fd, 10, 5996) == b"%02d" % i * 2 and os.read(fd, 6) == b"%02d" % i * 3
        finally:
            os.close(fd)
    assert (top / "d" / "moved").read_bytes() == b"00" * 3000
    # A reader sees what a writer writes meanwhile, through the same page cache.
    reader = os.open(top / "d" / "f1", os.O_RDONLY)
    writer = os.open(top / "d" / "f1", os.O_WRONLY)
    try:
        os.pwrite(writer, b"fresh", 100)
        assert os.pread(reader, 5, 100) == b"fresh"
        os.fsync(reader)  # a read-only handle of F's: Python syncs it
        (top / "d" / "f2").write_bytes(b"replaced")  # a writable open: Python's
        # The name of a file open for reading: Python unlinks it (F knows it is open); it still reads.
        held = os.open(top / "d" / "f3", os.O_RDONLY)
        (top / "d" / "f3").unlink()
        assert os.pread(held, 4, 0) == b"0303"
        os.close(held)
        held = os.open(top / "d" / "f4", os.O_RDONLY)
        os.rename(top / "d" / "f4", top / "d" / "f4-renamed")
        assert os.pread(held, 4, 0) == b"0404"
        os.close(held)
        os.close(os.open(top / "d" / "f5", os.O_RDONLY | os.O_TRUNC))  # Python's: a truncate shipped
    finally:
        os.close(reader)
        os.close(writer)
    _assert_fds_released(pair, baseline)
    stop_both(pair)
    assert_same_trees(pair)
    assert (pair.secondary_dir / "d" / "f5").read_bytes() == b""
    assert not (pair.secondary_dir / "d" / "f3").exists()
    counts = _counts(pair.log("primary"))
    assert counts["engine_open"] >= 42, counts


@pytest.mark.slow
def test_python_unlinking_an_open_files_name_or_an_rmdir_leaves_the_other_paths_to_the_native_path(
    pair: Pair,
) -> None:
    """Python serves the unlink of an open file's name (F does not) and rmdir, and each takes only its
    own path from the native path: the other open files' writes and the next creates stay F's."""
    pair.start("received")
    top = pair.primary_dir
    (top / "d").mkdir()
    (top / "gone" / "deeper").mkdir(parents=True)
    (top / "gone" / "deeper" / "f").write_bytes(b"f")
    fds = [os.open(top / "d" / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644) for i in range(8)]
    held = os.open(top / "d" / "held", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for fd in fds:
            os.write(fd, b"before ")
        (top / "d" / "held").unlink()  # open: Python's
        os.write(held, b"reaches no file on the secondary")
        (top / "gone" / "deeper" / "f").unlink()
        (top / "gone" / "deeper").rmdir()
        (top / "gone").rmdir()
        (top / "gone").mkdir()  # the same path again, a new directory: F creates in it
        (top / "gone" / "again").write_bytes(b"again")
        for fd in fds:
            os.write(fd, b"after")
        for i in range(8):
            (top / "d" / f"new{i}").write_bytes(b"new")
            (top / f"root{i}").write_bytes(b"root")
    finally:
        for fd in [*fds, held]:
            os.close(fd)
    stop_both(pair)
    assert_same_trees(pair)
    assert not (pair.secondary_dir / "d" / "held").exists()
    counts = _counts(pair.log("primary"))
    # Writes: 8 before and 8 after the unlink, and the 18 new files'; creates: 10 + 17.
    assert counts["write"] >= 34 and counts["create"] >= 27, counts


@pytest.mark.slow
def test_without_native_creates_python_serves_them(pair: Pair) -> None:
    pair.extra = ["--no-native-creates"]
    pair.start("received")
    (pair.primary_dir / "f").write_bytes(b"x" * 10_000)
    (pair.primary_dir / "f").unlink()
    stop_both(pair)
    assert_same_trees(pair)
    counts = _counts(pair.log("primary"))
    assert counts["create"] == counts["unlink"] == 0 and counts["write"] > 0, counts


# --- the secondary's side: Write frames applied by the native data path (tandem_receiver.c) ------


def _write(path: bytes, offset: int, data: bytes) -> m.Write:
    # As the primary sends them: one time fix, for the written file itself.
    return m.Write(path, offset, data, (m.TimeFix(path, 1_600_000_000_123_456_789, 1_700_000_000_987_654_321),))


async def _answers(
    conn: FrameConnection, until: Callable[[dict[int, list[m.Message]]], bool]
) -> dict[int, list[m.Message]]:
    got: dict[int, list[m.Message]] = {}
    while not until(got):
        frame = await asyncio.wait_for(conn.read(), 10)
        if frame is None:
            break
        got.setdefault(frame.seq, []).append(frame.msg)
    return got


async def _applied(probe: Callable[[], bool]) -> None:
    """Wait until the secondary applied what a probe checks: in `received` mode a frame's Ack says it
    was received, and may come before the frame is applied."""
    for _ in range(1000):
        if probe():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never applied")


def _merge(into: dict[int, list[m.Message]], more: dict[int, list[m.Message]]) -> None:
    for seq, answers in more.items():
        into.setdefault(seq, []).extend(answers)


async def test_the_secondary_applies_writes_itself_in_order_with_python(tmp_path: Path) -> None:
    root = tmp_path / "repl"
    root.mkdir()
    before = pyfuse3.receiver_counts()["applied"]
    ops: list[m.Message] = [m.Create(b"f", 0o644, 0, 0, 0)]
    ops += [_write(b"f", i * 3, b"abc") for i in range(50)]
    ops += [m.Rename(b"f", b"g", 0), _write(b"g", 150, b"after the rename"), m.Fsync(b"g", False)]
    ops += [m.Truncate(b"g", 100), _write(b"g", 100, b"z" * 10), m.Unlink(b"g"), m.Create(b"g", 0o600, 0, 0, 0)]
    ops += [_write(b"g", 0, b"new file")]
    got: dict[int, list[m.Message]] = {}
    async with open_link(root, AckMode.RECEIVED, native=True) as link:
        # As a primary's writer sends them: each once the one before is acknowledged.
        for seq, op in enumerate(ops, 1):
            link.conn.send_nowait(Frame(seq, op))
            _merge(got, await _answers(link.conn, lambda answers, seq=seq: seq in answers))
        # Then all at once: while Python has frames to apply, the writes after them go to Python too.
        more: list[m.Message] = [m.Truncate(b"g", 2), *(_write(b"g", i, bytes([65 + i])) for i in range(20))]
        for seq, op in enumerate(more, len(ops) + 1):
            link.conn.send_nowait(Frame(seq, op))
        _merge(got, await _answers(link.conn, lambda answers: len(answers) == len(more)))
    assert sorted(got) == list(range(1, len(ops) + len(more) + 1))
    assert all(answers == [m.Ack()] for answers in got.values()), got
    assert (root / "g").read_bytes() == b"ABCDEFGHIJKLMNOPQRST"  # never the truncate after a write
    assert os.stat(root / "g").st_mtime_ns == 1_700_000_000_987_654_321
    # The first frame, and now and then a write right after one of Python's, go through Python.
    assert pyfuse3.receiver_counts()["applied"] - before >= 40


T1, T2, T3 = 1_500_000_000_111_111_111, 1_500_000_000_222_222_222, 1_500_000_000_333_333_333


@pytest.mark.parametrize("mode", [AckMode.RECEIVED, AckMode.DURABLE])
async def test_the_secondary_creates_and_unlinks_files_itself_in_order_with_python(
    tmp_path: Path, mode: AckMode
) -> None:
    # As the primary sends them: a Create with time fixes for the new file and its directory (the
    # root's path is empty), an Unlink with one for its directory.
    root = tmp_path / "repl"
    root.mkdir()
    named = pyfuse3.receiver_counts()["named"]
    ops: list[m.Message] = [
        m.Mkdir(b"d", 0o755, 0, 0),
        m.Create(b"d/f", 0o640, 1234, 5678, os.O_WRONLY, (m.TimeFix(b"d/f", T1, T1), m.TimeFix(b"d", T2, T2))),
        _write(b"d/f", 0, b"first"),
        m.Create(b"top", 0o600, 0, 0, 0, (m.TimeFix(b"top", T1, T1), m.TimeFix(b"", T3, T3))),
    ]
    async with open_link(root, mode, native=True) as link:
        for seq, op in enumerate(ops, 1):
            link.conn.send_nowait(Frame(seq, op))
            assert await _answers(link.conn, lambda got, seq=seq: seq in got) == {seq: [m.Ack()]}
        await _applied(lambda: os.stat(root).st_mtime_ns == T3)
        st, top = os.stat(root / "d" / "f"), os.stat(root / "top")
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size) == (0o640, 1234, 5678, 5)
        assert stat.S_IMODE(top.st_mode) == 0o600 and top.st_mtime_ns == T1
        assert os.stat(root / "d").st_mtime_ns == T2 and os.stat(root).st_mtime_ns == T3
        # The file's name is removed and made again: the next write reaches the new file only.
        seq = len(ops)
        for op in (m.Unlink(b"d/f", (m.TimeFix(b"d", T3, T3),)), m.Create(b"d/f", 0o644, 0, 0, 0)):
            seq += 1
            link.conn.send_nowait(Frame(seq, op))
            assert await _answers(link.conn, lambda got, seq=seq: seq in got) == {seq: [m.Ack()]}
            if isinstance(op, m.Unlink):
                await _applied(lambda: os.stat(root / "d").st_mtime_ns == T3)
                assert not (root / "d" / "f").exists()
        seq += 1
        link.conn.send_nowait(Frame(seq, _write(b"d/f", 0, b"2nd")))
        assert await _answers(link.conn, lambda got: seq in got) == {seq: [m.Ack()]}
        await _applied(lambda: (root / "d" / "f").read_bytes() == b"2nd")
    assert pyfuse3.receiver_counts()["named"] - named == 4


def _times(path: bytes, atime: int, mtime: int, fixes: m.Times | None = None) -> m.Setattr:
    # As the primary's engine sends them (te_setattr): the times, and a fix of the file itself.
    return m.Setattr(path, atime_ns=atime, mtime_ns=mtime, times=fixes or (m.TimeFix(path, atime, mtime),))


@pytest.mark.parametrize("mode", [AckMode.RECEIVED, AckMode.DURABLE, AckMode.FSYNC])
async def test_the_secondary_sets_a_files_times_itself_and_leaves_the_rest_to_python(
    tmp_path: Path, mode: AckMode, expected_logs: ExpectedLogs
) -> None:
    expected_logs.expect(r"Replication error applying seq=8: Setattr b'missing': No such file or directory")
    root = tmp_path / "repl"
    root.mkdir()
    timed = pyfuse3.receiver_counts()["timed"]
    ops: list[m.Message] = [m.Mkdir(b"d", 0o755, 0, 0), m.Create(b"d/f", 0o644, 0, 0, 0), _write(b"d/f", 0, b"x")]
    ops += [_times(b"d/f", T1, T2)]
    # Python's: a mode changed too, a fix of the directory, a directory's own times, a missing file.
    ops += [m.Setattr(b"d/f", mode=0o600, atime_ns=T2, mtime_ns=T2, times=(m.TimeFix(b"d/f", T2, T2),))]
    ops += [_times(b"d/f", T3, T3, (m.TimeFix(b"d/f", T3, T3), m.TimeFix(b"d", T1, T1)))]
    ops += [_times(b"d", T2, T3), _times(b"d/missing", T1, T1)]
    got: dict[int, list[m.Message]] = {}
    async with open_link(root, mode, native=True) as link:
        for seq, op in enumerate(ops, 1):
            link.conn.send_nowait(Frame(seq, op))
            _merge(got, await _answers(link.conn, lambda answers, seq=seq: seq in answers))
            if seq == 4:  # `received`: acknowledged on receipt, perhaps before it is applied
                f = root / "d" / "f"
                await _applied(lambda f=f: (os.stat(f).st_atime_ns, os.stat(f).st_mtime_ns) == (T1, T2))
        last = len(ops)
        if mode is not AckMode.DURABLE:  # Ack on receipt, then a Fault
            _merge(got, await _answers(link.conn, lambda answers: isinstance(answers.get(last, [None])[-1], m.Fault)))
    st = os.stat(root / "d" / "f")
    assert stat.S_IMODE(st.st_mode) == 0o600 and (st.st_atime_ns, st.st_mtime_ns) == (T3, T3)
    assert (os.stat(root / "d").st_atime_ns, os.stat(root / "d").st_mtime_ns) == (T2, T3)
    assert all(answers == [m.Ack()] for seq, answers in got.items() if seq < last), got
    # The missing file: reported, as Python reports it (durable: in its Ack).
    assert got[last][-1] != m.Ack(), got[last]
    assert pyfuse3.receiver_counts()["timed"] - timed == 1


async def test_after_the_native_path_makes_a_name_again_python_reaches_the_new_file(tmp_path: Path) -> None:
    # Python keeps files open by name too: after the native path removed and made that name again,
    # Python's next operation on it reaches the new file. The event loop is held while a mkdir and
    # a write go out, so that Python applies both (and keeps the file open).
    root = tmp_path / "repl"
    root.mkdir()
    ops: list[m.Message] = [m.Mkdir(b"d", 0o755, 0, 0), m.Create(b"d/f", 0o644, 0, 0, 0), _write(b"d/f", 0, b"old")]
    async with open_link(root, AckMode.RECEIVED, native=True) as link:
        for seq, op in enumerate(ops, 1):
            link.conn.send_nowait(Frame(seq, op))
            assert await _answers(link.conn, lambda got, seq=seq: seq in got) == {seq: [m.Ack()]}
        seq = len(ops)
        with _raw(link.conn) as sock:
            frames = (Frame(seq + 1, m.Mkdir(b"e", 0o755, 0, 0)), Frame(seq + 2, _write(b"d/f", 0, b"PY")))
            sock.sendall(b"".join(encode(frame) for frame in frames))
            assert _read_frames(sock, 2) == {seq + 1: [m.Ack()], seq + 2: [m.Ack()]}
        seq += 2
        for _ in range(200):
            if (root / "d" / "f").read_bytes() == b"PYd":
                break
            await asyncio.sleep(0.01)
        assert (root / "d" / "f").read_bytes() == b"PYd"
        named = pyfuse3.receiver_counts()["named"]
        for op in (m.Unlink(b"d/f"), m.Create(b"d/f", 0o644, 0, 0, 0), m.Truncate(b"d/f", 3)):
            seq += 1
            link.conn.send_nowait(Frame(seq, op))
            assert await _answers(link.conn, lambda got, seq=seq: seq in got) == {seq: [m.Ack()]}
        for _ in range(200):
            if os.stat(root / "d" / "f").st_size == 3:
                break
            await asyncio.sleep(0.01)
        assert (root / "d" / "f").read_bytes() == b"\0\0\0"
        assert pyfuse3.receiver_counts()["named"] - named == 2


async def test_a_create_or_unlink_the_native_path_cannot_apply_goes_to_python_which_reports_it(
    tmp_path: Path, expected_logs: ExpectedLogs
) -> None:
    # A name that exists already (divergence: the primary created a new file) and one that is
    # missing: the native path changes nothing, and Python applies them and reports the error.
    expected_logs.expect(r"Replication error applying seq=3: Create b'f': File exists")
    expected_logs.expect(r"Replication error applying seq=4: Unlink b'missing': No such file or directory")
    root = tmp_path / "repl"
    root.mkdir()
    ops: list[m.Message] = [
        m.Mkdir(b"d", 0o755, 0, 0),
        m.Create(b"d/f", 0o600, 0, 0, 0),
        m.Create(b"d/f", 0o644, 0, 0, 0),
        m.Unlink(b"d/missing"),
        _write(b"d/f", 0, b"still here"),
    ]
    got: dict[int, list[m.Message]] = {}
    async with open_link(root, AckMode.RECEIVED, native=True) as link:
        for seq, op in enumerate(ops, 1):
            link.conn.send_nowait(Frame(seq, op))
            _merge(got, await _answers(link.conn, lambda answers, seq=seq: seq in answers))
        while len(got.get(3, [])) < 2 or len(got.get(4, [])) < 2:
            _merge(got, await _answers(link.conn, lambda answers: bool(answers)))
    assert [type(a) for a in got[3]] == [m.Ack, m.Fault] and got[3][1].status == errno.EEXIST, got
    assert [type(a) for a in got[4]] == [m.Ack, m.Fault] and got[4][1].status == errno.ENOENT, got
    assert stat.S_IMODE(os.stat(root / "d" / "f").st_mode) == 0o600
    assert (root / "d" / "f").read_bytes() == b"still here"


@contextlib.contextmanager
def _raw(conn: FrameConnection) -> Iterator[socket.socket]:
    """The connection's socket, blocking, for a test that holds the event loop meanwhile."""
    with socket.socket(fileno=os.dup(conn.transport.get_extra_info("socket").fileno())) as sock:
        sock.setblocking(True)
        sock.settimeout(10)
        try:
            yield sock
        finally:
            sock.setblocking(False)


def _read_frames(sock: socket.socket, count: int, patience: float = 0.0) -> dict[int, list[m.Message]]:
    """`count` frames; with `patience`, those that come before a pause of that many seconds."""
    got: dict[int, list[m.Message]] = {}
    for _ in range(count):
        if patience:
            sock.settimeout(patience)
            try:
                word = _recv_exactly(sock, 4)
            except TimeoutError:
                break
            finally:
                sock.settimeout(10)
        else:
            word = _recv_exactly(sock, 4)
        frame = decode_body(_recv_exactly(sock, frame_length(word)))
        got.setdefault(frame.seq, []).append(frame.msg)
    return got


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, "the secondary ended the stream"
        buf += chunk
    return buf


async def test_the_secondary_acknowledges_on_receipt_without_waiting_for_python(tmp_path: Path) -> None:
    # A mkdir goes to Python to apply, and the frames behind it with it (creates, a write, a rename,
    # an unlink); the native data path acknowledges them on receipt. The test blocks the event loop,
    # and the receiver's Python with it, while it sends them and reads their acks on the socket.
    root = tmp_path / "repl"
    root.mkdir()
    async with open_link(root, AckMode.RECEIVED, native=True) as link:
        # The session's first frame is Python's to acknowledge (it checks it against the handshake).
        link.conn.send_nowait(Frame(1, m.Mkdir(b"d", 0o755, 0, 0)))
        assert await _answers(link.conn, lambda got: 1 in got) == {1: [m.Ack()]}
        ops: list[m.Message] = [m.Mkdir(b"d/sub", 0o755, 0, 0)]
        ops += [m.Create(b"d/f%d" % i, 0o644, 0, 0, 0) for i in range(10)]
        ops += [_write(b"d/f0", 0, b"data"), m.Rename(b"d/f0", b"d/g", 0), m.Unlink(b"d/f1")]
        with _raw(link.conn) as sock:
            sock.sendall(b"".join(encode(Frame(seq, op)) for seq, op in enumerate(ops, 2)))
            got = _read_frames(sock, len(ops))
            applied_meanwhile = sorted(p.name for p in (root / "d").iterdir())
        assert got == {seq: [m.Ack()] for seq in range(2, len(ops) + 2)}, got
        assert applied_meanwhile == [], applied_meanwhile
        # Then Python applies them, in order.
        for _ in range(200):
            if not (root / "d" / "f1").exists() and (root / "d" / "g").exists():
                break
            await asyncio.sleep(0.05)
        assert (root / "d" / "g").read_bytes() == b"data"
        assert sorted(p.name for p in (root / "d").iterdir()) == sorted(["sub", "g", *(f"f{i}" for i in range(2, 10))])
        # Past RX_AHEAD frames waiting for Python, Python acknowledges them itself when it reads them.
        first = len(ops) + 2
        more: list[m.Message] = [m.Mkdir(b"e", 0o755, 0, 0)]
        more += [m.Create(b"e/f%d" % i, 0o644, 0, 0, 0) for i in range(39)]
        with _raw(link.conn) as sock:
            sock.sendall(b"".join(encode(Frame(seq, op)) for seq, op in enumerate(more, first)))
            early = _read_frames(sock, 40, patience=0.5)
        assert early == {seq: [m.Ack()] for seq in range(first, first + 16)}, early
        late = await _answers(link.conn, lambda got: len(got) == 24)
        assert late == {seq: [m.Ack()] for seq in range(first + 16, first + 40)}, late


_HOSTILE: dict[str, Callable[[bytes], m.Message]] = {
    "write": lambda path: _write(path, 0, b"x"),
    "create": lambda path: m.Create(path, 0o644, 0, 0, 0, (m.TimeFix(path, 1, 1),)),
    "unlink": lambda path: m.Unlink(path),
}


@pytest.mark.parametrize("kind", sorted(_HOSTILE))
@pytest.mark.parametrize(
    "path, why",
    [
        (b"../outside", "component b'..' is not allowed"),
        (b"/etc/passwd", "absolute path"),
        (b"a//b", "empty component"),
        (b"l/escaped", "crosses a symlink"),
        (b"l/outside", "crosses a symlink"),
    ],
)
async def test_a_hostile_operation_goes_to_python_which_refuses_it(
    tmp_path: Path, kind: str, path: bytes, why: str, expected_logs: ExpectedLogs
) -> None:
    expected_logs.expect(f"Disconnecting replication peer .*{re.escape(why)}")
    root = tmp_path / "repl"
    root.mkdir()
    (tmp_path / "outside").write_bytes(b"untouched")
    async with open_link(root, AckMode.RECEIVED, native=True) as link:
        frames = [m.Symlink(b"l", b"..", 0, 0), m.Create(b"f", 0o644, 0, 0, 0), _write(b"f", 0, b"ok")]
        for seq, op in enumerate(frames, 1):
            link.conn.send_nowait(Frame(seq, op))
            await _answers(link.conn, lambda answers, seq=seq: seq in answers)
        link.conn.send_nowait(Frame(4, _HOSTILE[kind](path)))
        link.conn.send_nowait(Frame(5, _write(b"f", 0, b"never")))
        await _answers(link.conn, lambda got: False)  # until the secondary ends the stream
        await asyncio.wait_for(link.server, 5)
    assert (tmp_path / "outside").read_bytes() == b"untouched"
    assert not (tmp_path / "escaped").exists()
    assert (root / "f").read_bytes() == b"ok"


async def test_a_write_to_a_fifo_or_a_device_is_never_opened_natively(
    tmp_path: Path, expected_logs: ExpectedLogs
) -> None:
    expected_logs.expect(r"Replication error applying seq=3: Write b'fifo'")
    expected_logs.expect(r"Replication error applying seq=4: Write b'null'")
    root = tmp_path / "repl"
    root.mkdir()
    async with open_link(root, AckMode.RECEIVED, native=True) as link:
        frames: list[m.Message] = [
            m.Mknod(b"fifo", stat.S_IFIFO | 0o644, 0, 0, 0),
            m.Mknod(b"null", stat.S_IFCHR | 0o666, os.makedev(1, 3), 0, 0),
            _write(b"fifo", 0, b"x"),
            _write(b"null", 0, b"x"),
        ]
        for seq, op in enumerate(frames, 1):
            link.conn.send_nowait(Frame(seq, op))
        got = await _answers(link.conn, lambda got: sum(len(a) for a in got.values()) == 6)
    faults = {seq for seq, answers in got.items() if any(isinstance(a, m.Fault) for a in answers)}
    assert faults == {3, 4}, got


@pytest.mark.parametrize("size", [1 << 16, 1 << 18])
async def test_a_full_disk_on_the_secondary_is_a_replication_error(
    tmp_path: Path, expected_logs: ExpectedLogs, size: int
) -> None:
    # Writes the native data path applies, one at a time: its pwrite meets ENOSPC, and the frame
    # goes to Python, which applies it again and reports the error as it always did. A large write
    # (256 KiB) is acknowledged before its pwrite: then Python only reports the error, once.
    expected_logs.expect(r"Replication error applying seq=\d+: Write b'big': No space left on device")
    root = tmp_path / "small"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root)], check=True)
    got: dict[int, list[m.Message]] = {}
    try:
        applied = pyfuse3.receiver_counts()["applied"]
        async with open_link(root, AckMode.RECEIVED, native=True) as link:
            frames: list[m.Message] = [m.Create(b"big", 0o644, 0, 0, 0)]
            frames += [_write(b"big", i * size, b"x" * size) for i in range(24 * (1 << 16) // size)]
            for seq, op in enumerate(frames, 1):
                link.conn.send_nowait(Frame(seq, op))
                _merge(got, await _answers(link.conn, lambda answers, seq=seq: seq in answers))
            last = len(frames)
            _merge(
                got,
                await _answers(link.conn, lambda answers: any(isinstance(a, m.Fault) for a in answers.get(last, []))),
            )
        applied = pyfuse3.receiver_counts()["applied"] - applied
    finally:
        subprocess.run(["umount", str(root)], check=True)
    faults = [seq for seq in sorted(got) if any(isinstance(a, m.Fault) for a in got[seq])]
    assert faults and all(isinstance(got[s][0], m.Ack) for s in faults), got
    assert all([type(a) for a in answers].count(m.Ack) == 1 for answers in got.values()), got
    # The writes before the disk filled were the native data path's own.
    assert applied >= (1 << 19) // size, applied


async def test_after_a_native_fsync_meets_a_disk_error_no_later_fsync_is_acknowledged(
    tmp_path: Path, expected_logs: ExpectedLogs, caplog: pytest.LogCaptureFixture
) -> None:
    # A thin disk (test_replication_durable.thin_disk): the secondary's fsync meets the error that
    # the page cache hid from its writes.
    # Each round writes less than INLINE_SYNC_BYTES, in writes below STREAM_WRITE_BYTES, so that
    # the native data path applies the writes and then their Fsync (a write that went to Python
    # would leave it behind, and the Fsync after it would go to Python too).
    expected_logs.expect(r"native data path's sync of seq \d+ failed: Fsync b'big'")
    expected_logs.expect(r"Replication error applying seq=\d+")
    with thin_disk(tmp_path) as mnt:
        ops: list[m.Message] = [m.Create(b"big", 0o644, 0, 0, 0)]
        for r in range(24):
            ops += [_write(b"big", (r * 4 + i) * (192 << 10), b"x" * (192 << 10)) for i in range(4)]
            ops.append(m.Fsync(b"big", False))
        answers: dict[int, list[m.Message]] = {}
        synced = pyfuse3.receiver_counts()["synced"]
        async with open_link(mnt / "repl", AckMode.RECEIVED, native=True) as link:
            for seq, op in enumerate(ops, 1):
                link.conn.send_nowait(Frame(seq, op))
                _merge(answers, await _answers(link.conn, lambda got, seq=seq: seq in got))
        synced = pyfuse3.receiver_counts()["synced"] - synced

    fsyncs = [seq for seq, op in enumerate(ops, 1) if isinstance(op, m.Fsync)]
    failed = [seq for seq in fsyncs if any(isinstance(a, m.Ack) and a.status for a in answers[seq])]
    assert failed, "18 MiB reached a 12 MiB disk"
    # From the first failed fsync on, none is acknowledged as done (Python keeps the error).
    assert failed == [seq for seq in fsyncs if seq >= failed[0]], failed
    # The first failure was the native data path's own fsync: Python did not apply that frame.
    assert synced >= 2 and f"applying seq={failed[0]}:" not in caplog.text, caplog.text


async def test_after_python_syncs_a_large_write_the_next_fsyncs_are_native_again(tmp_path: Path) -> None:
    # More than INLINE_SYNC_BYTES before an Fsync: Python syncs it in a thread of its own. The bytes
    # it synced no longer count, so the small rounds after it are the native data path's again.
    root = tmp_path / "repl"
    root.mkdir()
    ops: list[m.Message] = [m.Create(b"f", 0o644, 0, 0, 0)]
    ops += [_write(b"f", i << 18, b"x" * (1 << 18)) for i in range(5)]
    ops.append(m.Fsync(b"f", False))
    for r in range(10):
        ops += [_write(b"f", r << 12, b"y" * 4096), m.Fsync(b"f", True)]
    synced = pyfuse3.receiver_counts()["synced"]
    async with open_link(root, AckMode.RECEIVED, native=True) as link:
        for seq, op in enumerate(ops, 1):
            link.conn.send_nowait(Frame(seq, op))
            assert await _answers(link.conn, lambda got, seq=seq: seq in got) == {seq: [m.Ack()]}
    synced = pyfuse3.receiver_counts()["synced"] - synced
    assert synced >= 8, synced
    assert (root / "f").read_bytes() == b"y" * (10 << 12) + b"x" * ((5 << 18) - (10 << 12))


async def test_after_python_meets_a_disk_error_the_native_path_acknowledges_no_later_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, expected_logs: ExpectedLogs
) -> None:
    # More than INLINE_SYNC_BYTES before the first Fsync: Python syncs it, and that fsync fails
    # once. The small write and Fsync after it, which the native data path would apply itself (and
    # whose fsync would succeed), are answered with the error Python keeps.
    expected_logs.expect(r"fsync of seq 3 failed")
    expected_logs.expect(r"Replication error applying seq=\d+")
    fail_fsync_once(monkeypatch)
    root = tmp_path / "repl"
    root.mkdir()
    ops: list[m.Message] = [m.Create(b"f", 0o644, 0, 0, 0), _write(b"f", 0, b"x" * (2 << 20)), m.Fsync(b"f", False)]
    ops += [_write(b"f", 0, b"y" * 4096), m.Fsync(b"f", False)]
    got: dict[int, list[m.Message]] = {}
    async with open_link(root, AckMode.RECEIVED, native=True) as link:
        for seq, op in enumerate(ops, 1):
            link.conn.send_nowait(Frame(seq, op))
            _merge(got, await _answers(link.conn, lambda answers, seq=seq: seq in answers))
    statuses = {seq: [a.status for a in answers if isinstance(a, m.Ack)] for seq, answers in got.items()}
    assert statuses[3] == [errno.EIO] and statuses[5] == [errno.EIO], got


async def test_after_a_failed_flush_in_python_the_native_path_acknowledges_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, expected_logs: ExpectedLogs
) -> None:
    # `durable`: Python's flush of the Create fails once; the Write after it, which the native data
    # path would apply and flush itself (successfully), is answered with that failure.
    expected_logs.expect(r"flushing seq 1-1 to disk failed")
    fail_flush_once(monkeypatch)
    root = tmp_path / "repl"
    root.mkdir()
    applied = pyfuse3.receiver_counts()["applied"]
    async with open_link(root, AckMode.DURABLE, native=True) as link:
        link.conn.send_nowait(Frame(1, m.Create(b"f", 0o644, 0, 0, 0)))
        first = await _answers(link.conn, lambda got: 1 in got)
        link.conn.send_nowait(Frame(2, _write(b"f", 0, b"x")))
        second = await _answers(link.conn, lambda got: 2 in got)
    assert first == {1: [m.Ack(errno.EIO, "flushing to disk: Input/output error")]}
    assert second == {2: [m.Ack(errno.EIO, "flushing to disk: Input/output error")]}
    assert pyfuse3.receiver_counts()["applied"] == applied
