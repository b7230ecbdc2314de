"""Two replicators on 127.0.0.1: a workload through the primary's mount leaves two identical trees."""

from __future__ import annotations

import mmap
import os
import re
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from agent.replication import syscalls
from tests.daemons import wait_for
from tests.integration.replication.pairs import Pair, mounted


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything replication promises to copy, per relative path (atime and ctime excepted)."""
    out: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in ["", *sorted(dirnames), *sorted(filenames)]:
            p = Path(dirpath, name) if name else Path(dirpath)
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            body: object = None
            if kind == stat.S_IFREG:
                # Ranges first: reading caches pages, and ext4 then counts a preallocated (unwritten)
                # range as data, which a resync copies as the hole it reads as.
                ranges = _allocated_ranges(p)
                body = (p.read_bytes(), ranges)
            elif kind == stat.S_IFLNK:
                body = os.readlink(p)
            xattrs = {n: os.getxattr(p, n, follow_symlinks=False) for n in os.listxattr(p, follow_symlinks=False)}
            group = inodes.setdefault(st.st_ino, rel) if st.st_nlink > 1 and kind != stat.S_IFDIR else None
            out[rel] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_mtime_ns,
                st.st_nlink,
                st.st_rdev,
                body,
                xattrs,
                group,
            )
    return out


def _allocated_ranges(p: Path) -> list[tuple[int, int]]:
    ranges = []
    with open(p, "rb") as fh:
        fd, end, pos = fh.fileno(), os.fstat(fh.fileno()).st_size, 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            ranges.append((start, pos))
    return ranges


def as_user(cmd: str, cwd: Path) -> None:
    subprocess.run(
        ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "sh", "-c", f"umask 027; {cmd}"],
        cwd=cwd,
        check=True,
    )


def workload(top: Path) -> None:
    """Every kind of change an application makes, through the mount."""
    (top / "big").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    with open(top / "big", "r+b") as fh:
        fh.seek(1000)
        fh.write(b"patched")
        os.fsync(fh.fileno())
    with open(top / "log", "ab") as fh:
        for i in range(50):
            fh.write(b"line %d\n" % i)
    with open(top / "sparse", "wb") as fh:
        fh.seek(10 * 1024 * 1024)
        fh.write(b"end")
    (top / "d" / "sub").mkdir(parents=True)
    (top / "d" / "sub" / "f").write_text("inner")
    os.rename(top / "d" / "sub" / "f", top / "d" / "moved")
    (top / "over").write_text("will be replaced")
    (top / "src").write_text("replaces")
    os.rename(top / "src", top / "over")
    (top / "x1").write_text("one")
    (top / "x2").write_text("two")
    dfd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    syscalls.renameat2(dfd, b"x1", dfd, b"x2", syscalls.RENAME_EXCHANGE)
    with pytest.raises(FileExistsError):
        syscalls.renameat2(dfd, b"x1", dfd, b"x2", syscalls.RENAME_NOREPLACE)
    os.close(dfd)
    (top / "gone").write_text("bye")
    os.unlink(top / "gone")
    (top / "emptydir").mkdir()
    os.rmdir(top / "emptydir")
    os.chmod(top / "log", 0o600)
    os.chown(top / "log", 1000, 1000)
    os.utime(top / "d" / "moved", ns=(1_500_000_000_111_222_333, 1_500_000_000_444_555_666))
    os.symlink("d/moved", top / "link")
    os.symlink("/etc/passwd", top / "abs-link")
    os.link(top / "big", top / "big-hardlink")
    os.link(top / "link", top / "link-hardlink", follow_symlinks=False)
    os.setxattr(top / "big", "user.color", b"blue")
    os.setxattr(top / "big", "user.tmp", b"x")
    os.removexattr(top / "big", "user.tmp")
    os.truncate(top / "sparse", 5 * 1024 * 1024)
    with open(top / "prealloc", "wb") as fh:
        fh.write(os.urandom(64 * 1024))
        fd = fh.fileno()
        os.fsync(fd)  # ext4 zeroes a range still in delayed allocation differently (written, not unwritten)
        syscalls.fallocate(fd, syscalls.FALLOC_FL_KEEP_SIZE | syscalls.FALLOC_FL_PUNCH_HOLE, 8192, 16384)
        syscalls.fallocate(fd, syscalls.FALLOC_FL_ZERO_RANGE, 40960, 4096)
        syscalls.fallocate(fd, 0, 1 << 20, 1 << 20)  # grows the file to 2 MiB
        syscalls.fallocate(fd, syscalls.FALLOC_FL_KEEP_SIZE, 4 << 20, 1 << 20)
        assert os.fstat(fd).st_size == 2 << 20
    os.truncate(top / "log", 10)
    os.mkfifo(top / "fifo", 0o640)
    os.mknod(top / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    (top / "x").mkdir()
    (top / "x" / ("n" * 255)).write_text("long name")
    shared = top / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o2777)
    as_user("echo mine > mine && mkdir mydir && ln -s mine mylink && chmod 4750 mine", shared)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ack", "loop"), [("received", "uvloop"), ("durable", "uvloop"), ("fsync", "uvloop"), ("received", "asyncio")]
)
def test_workload_leaves_identical_trees(pair: Pair, tmp_path: Path, ack: str, loop: str) -> None:
    secret = tmp_path / "cluster.key"
    secret.write_bytes(os.urandom(32).hex().encode())
    pair.extra += ["--event-loop", loop]
    pair.start(ack, secret)
    assert f"loop={loop}" in pair.log("primary") and f"loop={loop}" in pair.log("secondary")
    workload(pair.primary_dir)
    mine = os.lstat(pair.primary_dir / "shared" / "mine")
    assert (mine.st_uid, mine.st_gid, stat.S_IMODE(mine.st_mode)) == (1000, 0, 0o4750)  # setgid dir's group
    assert stat.S_IMODE(os.lstat(pair.primary_dir / "shared" / "mydir").st_mode) == 0o2750
    assert pair.stop("primary") == 0, pair.log("primary")
    assert not mounted(pair.primary_dir)
    assert pair.stop("secondary") == 0, pair.log("secondary")
    assert not mounted(pair.secondary_dir)
    primary, secondary = tree(pair.primary_dir), tree(pair.secondary_dir)
    assert primary.keys() == secondary.keys()
    for rel in primary:
        assert primary[rel] == secondary[rel], rel
    logs = pair.log("primary") + pair.log("secondary")
    assert "ERROR" not in logs and "Traceback" not in logs, logs
    assert "unauthenticated" not in logs


@pytest.mark.slow
def test_fsync_mode_caches_writes_and_ships_them_by_fsync_and_close(pair: Pair) -> None:
    pair.start("fsync", None)
    primary, copy = pair.primary_dir / "cached", pair.secondary_dir / "cached"
    with open(primary, "wb", buffering=0) as f:
        for _ in range(2000):
            f.write(b"x")  # 2,000 write() calls land in the primary's page cache
        os.fsync(f.fileno())
        assert copy.read_bytes() == b"x" * 2000  # a completed fsync is on the secondary's disk
        f.write(b"tail")
    # close shipped it: received by the secondary when close returned, applied right after
    wait_for("the closed file on the secondary", lambda: copy.read_bytes() == b"x" * 2000 + b"tail")
    # Metadata is shipped without waiting too; an fsync of the directory covers it, as on a local disk.
    (pair.primary_dir / "empty").touch()
    os.rename(pair.primary_dir / "cached", pair.primary_dir / "moved")
    dir_fd = os.open(pair.primary_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    assert (pair.secondary_dir / "empty").exists() and (pair.secondary_dir / "moved").exists()
    assert not copy.exists()
    assert pair.stop("primary") == 0
    shipped = re.search(r"(\d+) operations on the last stream", pair.log("primary"))
    assert shipped is not None and int(shipped.group(1)) < 50, pair.log("primary")


@pytest.mark.slow
def test_losing_the_secondary_leaves_the_primary_serving(pair: Pair) -> None:
    pair.start("received", None)
    (pair.primary_dir / "before").write_text("replicated")
    assert pair.stop("secondary") == 0
    assert "Traceback" not in pair.log("secondary")
    (pair.primary_dir / "after").write_text("local only")
    assert (pair.primary_dir / "after").read_text() == "local only"
    assert pair.stop("primary") == 0
    assert (pair.secondary_dir / "before").read_text() == "replicated"
    assert not (pair.secondary_dir / "after").exists()
    assert "running alone (full resync needed)" in pair.log("primary")
    assert "unauthenticated" in pair.log("primary")


@pytest.mark.slow
def test_a_capability_set_after_writes_is_seen_and_replicated(pair: Pair) -> None:
    pair.start("received", None)
    target = pair.primary_dir / "tool"
    target.write_bytes(b"#!/bin/sh\n")  # the kernel asks for security.capability before the write: none
    with open(target, "ab") as f:
        f.write(b"true\n")
    # VFS_CAP_REVISION_2 with CAP_NET_BIND_SERVICE (bit 10) permitted, as `setcap cap_net_bind_service=p`.
    caps = struct.pack("<IIIII", 0x02000000, 1 << 10, 0, 0, 0)
    os.setxattr(target, "security.capability", caps)
    assert os.getxattr(target, "security.capability") == caps
    assert pair.stop("primary") == 0
    assert pair.stop("secondary") == 0  # acknowledged on receipt: applied once it stopped
    assert os.getxattr(pair.secondary_dir / "tool", "security.capability") == caps


@pytest.mark.slow
@pytest.mark.parametrize("ack", ["received", "fsync"])
def test_shared_writable_mmap_and_offsets_past_4_gib(pair: Pair, ack: str) -> None:
    pair.start(ack, None)
    mapped, far = pair.primary_dir / "mapped", pair.primary_dir / "far"
    with open(mapped, "w+b") as f:
        f.truncate(64 * 1024)
        with mmap.mmap(f.fileno(), 64 * 1024, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mem:
            mem[4096:4101] = b"hello"
            mem[60000:60005] = b"world"
            mem.flush()  # msync: the dirty pages reach the daemon as writes
        os.fsync(f.fileno())
    with open(far, "wb") as f:
        f.write(b"head")
        f.seek(5 << 30)  # past 4 GiB: 64-bit offsets all the way to the secondary
        f.write(b"tail")
        f.seek((6 << 30) + 12345)
        f.write(b"end")
    assert pair.stop("primary") == 0, pair.log("primary")
    assert pair.stop("secondary") == 0, pair.log("secondary")
    assert (pair.secondary_dir / "mapped").read_bytes() == mapped.read_bytes()
    assert mapped.read_bytes()[4096:4101] == b"hello" and mapped.read_bytes()[60000:60005] == b"world"
    copy = pair.secondary_dir / "far"
    assert os.stat(copy).st_size == os.stat(far).st_size == (6 << 30) + 12348
    assert _allocated_ranges(copy) == _allocated_ranges(far)  # three small data ranges, holes between
    assert os.stat(copy).st_blocks < 1024
    with open(copy, "rb") as f:
        assert os.pread(f.fileno(), 4, 0) == b"head"
        assert os.pread(f.fileno(), 4, 5 << 30) == b"tail"
        assert os.pread(f.fileno(), 3, (6 << 30) + 12345) == b"end"


@pytest.mark.slow
@pytest.mark.parametrize("ack", ["received", "durable"])
def test_a_full_secondary_disk_is_a_reported_error_not_a_silent_divergence(
    pair: Pair, tmp_path: Path, ack: str
) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(pair.secondary_dir)], check=True)
    try:
        pair.start(ack, None)
        data = os.urandom(3 << 20)
        (pair.primary_dir / "big").write_bytes(data)  # completes on the primary: it keeps serving
        assert (pair.primary_dir / "big").read_bytes() == data
        error = pair.wait_event("primary", lambda e: e["event"] == "error")
        assert "No space left on device" in error["message"], error
        assert "No space left on device" in pair.log("secondary")
        # The copy is not reported in sync again while it cannot hold the tree.
        after = len(pair.events("primary"))
        with pytest.raises(TimeoutError):
            pair.wait_in_sync(after=after, timeout=3)
        assert pair.stop("primary") == 0
        assert pair.stop("secondary") == 0
    finally:
        subprocess.run(["umount", "-l", str(pair.secondary_dir)], check=False)


@pytest.mark.slow
@pytest.mark.parametrize("ack", ["received", "durable"])
def test_a_secondary_out_of_inodes_is_a_reported_error(pair: Pair, ack: str) -> None:
    """Creates the primary's native path serves and the secondary cannot make: reported, as a full
    disk is, and the primary keeps every file."""
    opts = "size=16m,nr_inodes=40"
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(pair.secondary_dir)], check=True)
    try:
        pair.start(ack, None)
        for i in range(100):
            (pair.primary_dir / f"f{i}").write_bytes(b"%d" % i)
        assert sorted(os.listdir(pair.primary_dir)) == sorted(f"f{i}" for i in range(100))
        error = pair.wait_event("primary", lambda e: e["event"] == "error")
        assert "No space left on device" in error["message"], error
        assert pair.stop("primary") == 0
        assert pair.stop("secondary") == 0
        served = re.findall(r"\bcreate=(\d+)", pair.log("primary"))
        assert served and int(served[-1]) > 0, "the native path served no create"
    finally:
        subprocess.run(["umount", "-l", str(pair.secondary_dir)], check=False)


def test_the_primary_keeps_the_pages_of_files_written_through_it(pair: Pair) -> None:
    """A write through the mount changes the file's mtime, and the kernel keeps its cached pages all
    the same (ReplicatedFS.auto_inval_data = False: the primary is its tree's only writer), so that a
    read right after a write needs no READ request. It shows only when something changes the bytes
    behind the mount's back, which nothing but this test does."""
    beneath = os.open(pair.primary_dir, os.O_PATH | os.O_DIRECTORY)
    try:
        pair.start("received")
        top = pair.primary_dir / "kept"
        top.write_bytes(b"a" * 4096)
        with open(top, "r+b", buffering=0) as f:
            f.write(b"b" * 4096)  # the same size: only the mtime tells
        fd = os.open("kept", os.O_WRONLY, dir_fd=beneath)
        try:
            os.pwrite(fd, b"c" * 4096, 0)
            os.utime(fd, ns=(1, 10**18))
        finally:
            os.close(fd)
        with open(top, "rb") as f:
            assert f.read(8192) == b"b" * 4096  # past the end: the size is asked again, the pages stay
        # Acknowledged on receipt: applied soon after.
        wait_for("the write on the secondary", lambda: (pair.secondary_dir / "kept").read_bytes() == b"b" * 4096)
    finally:
        os.close(beneath)
