"""The secondary's applier on a real directory: every operation, duplicates, gaps, disk full."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.replication import blocks, listing, syscalls
from agent.replication import messages as m
from agent.replication.applier import Applier
from agent.replication.beneath import PathEscape
from agent.replication.wire import Frame, ProtocolError, decode, encode

T0 = 1_600_000_000_123_456_789


@pytest.fixture(params=[True, False], ids=["openat2", "walk"])
def applier(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Applier]:
    root = tmp_path / "repl"
    root.mkdir()
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        app = Applier(fd, use_openat2=request.param)
        assert app.beneath.use_openat2 is request.param
        app.begin(b"s" * 16)
        yield app
    finally:
        os.close(fd)


def feed(app: Applier, msg: m.Message) -> m.Ack:
    """Send a message through the codec, as the receiver does, and apply it with the next seq."""
    frame = decode(encode(Frame(app.applied_seq + 1, msg)))
    return app.apply(frame)


def ok(app: Applier, msg: m.Message) -> None:
    ack = feed(app, msg)
    assert ack.status == 0, ack.message


def fix(path: bytes, k: int) -> m.TimeFix:
    return m.TimeFix(path, T0 + k, T0 + 1000 * k)


def build_tree(app: Applier) -> None:
    ok(app, m.Mkdir(b"d", 0o2750, 1000, 1001, (fix(b"d", 1), fix(b"", 2))))
    ok(app, m.Create(b"d/f", 0o640, 1002, 1003, os.O_EXCL, (fix(b"d/f", 3), fix(b"d", 4))))
    ok(app, m.Write(b"d/f", 0, b"hello world", (fix(b"d/f", 5),)))
    ok(app, m.Write(b"d/f", 1 << 20, b"tail"))
    ok(app, m.Fallocate(b"d/f", syscalls.FALLOC_FL_PUNCH_HOLE | syscalls.FALLOC_FL_KEEP_SIZE, 0, 4096))
    ok(app, m.Write(b"d/f", 0, b"HELLO"))
    ok(app, m.Truncate(b"d/f", 2 << 20))
    ok(app, m.Setattr(b"d/f", mode=0o4755, uid=1004, gid=1005))
    ok(app, m.Setxattr(b"d/f", b"user.k", 0, b"v\0binary"))
    ok(app, m.Setxattr(b"d/f", b"user.gone", 0, b"x"))
    ok(app, m.Removexattr(b"d/f", b"user.gone"))
    ok(app, m.Symlink(b"d/l", b"../../outside/secret", 1006, 1007, (fix(b"d/l", 6),)))
    ok(app, m.Link(b"d/f", b"d/f2"))
    ok(app, m.Mknod(b"d/p", stat.S_IFIFO | 0o620, 0, 1000, 1000))
    ok(app, m.Mknod(b"d/s", stat.S_IFSOCK | 0o600, 0, 1000, 1000))
    ok(app, m.Mknod(b"d/null", stat.S_IFCHR | 0o666, os.makedev(1, 3), 0, 0))
    ok(app, m.Rename(b"d/f2", b"d/g", 0))
    ok(app, m.Rename(b"d/p", b"d/s", syscalls.RENAME_EXCHANGE))
    ok(app, m.Mkdir(b"e", 0o755, 0, 0))
    ok(app, m.Rmdir(b"e"))
    ok(app, m.Create(b"gone", 0o600, 0, 0, 0))
    ok(app, m.Unlink(b"gone"))
    ok(app, m.Setattr(b"d/f", atime_ns=T0 + 7, mtime_ns=T0 + 8))
    ok(app, m.Fsync(b"d/f", False))
    ok(app, m.Fsync(b"d", True))
    ok(app, m.Setattr(b"", mode=0o711, times=(fix(b"d", 9), fix(b"", 10))))


def test_every_operation_builds_the_expected_tree(applier: Applier, tmp_path: Path) -> None:
    build_tree(applier)
    root = tmp_path / "repl"
    d, f = os.lstat(root / "d"), os.lstat(root / "d/f")
    assert (stat.S_IMODE(d.st_mode), d.st_uid, d.st_gid) == (0o2750, 1000, 1001)
    assert (stat.S_IMODE(f.st_mode), f.st_uid, f.st_gid, f.st_nlink) == (0o4755, 1004, 1005, 2)
    assert (f.st_atime_ns, f.st_mtime_ns) == (T0 + 7, T0 + 8)
    assert (d.st_atime_ns, d.st_mtime_ns) == (T0 + 9, T0 + 9000)
    assert os.lstat(root).st_mtime_ns == T0 + 10000
    content = (root / "d/f").read_bytes()
    assert len(content) == 2 << 20
    assert content[:16] == b"HELLO\0" + b"\0" * 10
    assert content[1 << 20 : (1 << 20) + 4] == b"tail"
    with open(root / "d/f", "rb") as fh:
        assert os.lseek(fh.fileno(), 0, os.SEEK_DATA) == 0  # "HELLO" re-filled the punched block
        assert os.lseek(fh.fileno(), 4096, os.SEEK_HOLE) == 4096  # the gap up to 1 MiB stays a hole
    assert os.getxattr(root / "d/f", "user.k") == b"v\0binary"
    assert os.listxattr(root / "d/f") == ["user.k"]
    link = os.lstat(root / "d/l")
    assert os.readlink(root / "d/l") == "../../outside/secret"
    assert (link.st_uid, link.st_gid, link.st_mtime_ns) == (1006, 1007, T0 + 6000)
    assert os.path.samefile(root / "d/f", root / "d/g")
    assert stat.S_ISSOCK(os.lstat(root / "d/p").st_mode) and stat.S_ISFIFO(os.lstat(root / "d/s").st_mode)
    assert stat.S_IMODE(os.lstat(root / "d/s").st_mode) == 0o620
    assert os.lstat(root / "d/null").st_rdev == os.makedev(1, 3)
    assert sorted(os.listdir(root)) == ["d"]
    assert stat.S_IMODE(os.lstat(root).st_mode) == 0o711


def test_errors_are_acked_with_the_errno(applier: Applier) -> None:
    build_tree(applier)
    cases: list[tuple[m.Message, int]] = [
        (m.Rename(b"d/g", b"d/f", syscalls.RENAME_NOREPLACE), errno.EEXIST),
        (m.Rmdir(b"d"), errno.ENOTEMPTY),
        (m.Unlink(b"missing"), errno.ENOENT),
        (m.Create(b"d/f", 0o600, 0, 0, 0), errno.EEXIST),
        (m.Write(b"d", 0, b"x"), errno.EISDIR),
        (m.Write(b"d/p", 0, b"x"), errno.EINVAL),
        (m.Write(b"d/null", 0, b"x"), errno.EINVAL),
        (m.Write(b"d/f/x", 0, b"x"), errno.ENOTDIR),
        (m.Mknod(b"d/dir", stat.S_IFDIR | 0o755, 0, 0, 0), errno.EINVAL),
        (m.Removexattr(b"d/f", b"user.none"), errno.ENODATA),
    ]
    for msg, code in cases:
        ack = feed(applier, msg)
        assert ack.status == code, (msg, ack)
        assert ack.message


def test_a_duplicate_seq_is_acked_without_reapplying(applier: Applier, tmp_path: Path) -> None:
    create = decode(encode(Frame(1, m.Create(b"f", 0o600, 0, 0, 0))))
    assert applier.apply(create).status == 0
    fail = Frame(2, m.Unlink(b"nope"))
    assert applier.apply(fail).status == errno.ENOENT
    ok(applier, m.Unlink(b"f"))
    assert applier.apply(create).status == 0  # re-applying would create f again
    assert applier.apply(fail).status == errno.ENOENT  # the original outcome, not a fresh one
    assert not (tmp_path / "repl/f").exists()


def test_a_sequence_gap_is_a_protocol_violation(applier: Applier) -> None:
    with pytest.raises(ProtocolError, match="sequence gap"):
        applier.apply(Frame(5, m.Mkdir(b"x", 0o755, 0, 0)))
    with pytest.raises(ProtocolError, match="not an operation"):
        applier.apply(Frame(1, m.Ack()))


def test_a_new_stream_starts_from_one(applier: Applier) -> None:
    ok(applier, m.Mkdir(b"x", 0o755, 0, 0))
    assert applier.applied_for(b"s" * 16) == 1
    assert applier.applied_for(b"t" * 16) == 0
    applier.begin(b"t" * 16)
    assert applier.applied_seq == 0


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        if str(mnt) in Path("/proc/mounts").read_text():
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_is_reported_as_enospc(tiny_fs: Path) -> None:
    fd = os.open(tiny_fs, os.O_PATH | os.O_DIRECTORY)
    try:
        app = Applier(fd)
        app.begin(b"s" * 16)
        ok(app, m.Create(b"big", 0o600, 0, 0, 0))
        ack = feed(app, m.Write(b"big", 0, b"x" * (1 << 20)))
        assert ack.status == errno.ENOSPC
        assert "No space left" in ack.message
    finally:
        os.close(fd)


def test_cached_open_files_follow_renames_and_removals(applier: Applier, tmp_path: Path) -> None:
    root = tmp_path / "repl"
    ok(applier, m.Create(b"a", 0o644, 0, 0, os.O_EXCL))
    ok(applier, m.Write(b"a", 0, b"first"))  # opens "a" and keeps it open
    ok(applier, m.Rename(b"a", b"b", 0))
    ok(applier, m.Create(b"a", 0o644, 0, 0, os.O_EXCL))
    ok(applier, m.Write(b"a", 0, b"second"))
    ok(applier, m.Write(b"b", 5, b"!", (m.TimeFix(b"b", T0, T0 + 1),)))  # set on the cached fd
    ok(applier, m.Unlink(b"a"))
    ack = feed(applier, m.Write(b"a", 0, b"gone"))
    assert ack.status == errno.ENOENT, ack.message
    ok(applier, m.Fsync(b"b", False))
    assert (root / "b").read_bytes() == b"first!"
    assert os.stat(root / "b").st_mtime_ns == T0 + 1
    assert not (root / "a").exists()
    applier.close()


def test_sync_file_and_dir_sums(applier: Applier, tmp_path: Path) -> None:
    root = tmp_path / "repl"
    ok(applier, m.SyncFile(b"f", 0o4750, 1000, 1000, T0, T0 + 1, b"x" * 70_000))
    st = os.lstat(root / "f")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_atime_ns, st.st_mtime_ns) == (0o4750, 1000, T0, T0 + 1)
    assert (root / "f").read_bytes() == b"x" * 70_000
    assert feed(applier, m.SyncFile(b"f", 0o644, 0, 0, 0, 0, b"")).status == errno.EEXIST
    os.mkfifo(root / "p")
    (root / "big").write_bytes(b"y" * (listing.SUMS_MAX + 1))
    answer = feed(applier, m.SyncDirSums(b""))
    assert isinstance(answer, m.Listing)
    got = listing.decode(answer.entries, with_sums=True)
    with open(root / "f", "rb") as fh:
        assert got[b"f"].sums == blocks.pack(blocks.file_digests(fh.fileno())[1])
    assert got[b"p"].sums is None and got[b"big"].sums is None
    assert feed(applier, m.SyncDirSums(b"f")).status == errno.ENOTDIR


def test_cached_directories_follow_renames_and_never_a_symlink_put_in_their_place(applier: Applier) -> None:
    root = Path(f"/proc/self/fd/{applier.beneath.root_fd}").resolve()
    ok(applier, m.Mkdir(b"a", 0o755, 0, 0))
    ok(applier, m.Create(b"a/f", 0o644, 0, 0, os.O_EXCL))  # resolves and keeps "a"
    ok(applier, m.Rename(b"a", b"b", 0))
    ok(applier, m.Mkdir(b"a", 0o755, 0, 0))
    ok(applier, m.Create(b"a/g", 0o644, 0, 0, os.O_EXCL))
    assert sorted(os.listdir(root / "a")) == ["g"] and sorted(os.listdir(root / "b")) == ["f"]
    ok(applier, m.Rename(b"a", b"c", 0))
    ok(applier, m.Symlink(b"a", b"/tmp", 0, 0))
    with pytest.raises(PathEscape, match="crosses a symlink"):
        feed(applier, m.Create(b"a/evil", 0o644, 0, 0, os.O_EXCL))
    assert not Path("/tmp/evil").exists()
