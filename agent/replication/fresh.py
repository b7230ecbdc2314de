"""Frames that make an entry the secondary lacks: the resync's fresh entries, and the primary's
entries that cross from an excluded path to a replicated one (exclude.py)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

import msgpack

from agent.replication import blocks, listing, syscalls
from agent.replication import messages as m
from agent.replication.listing import Entry

# A fresh file up to SMALL bytes without holes travels whole in one SyncFile frame, read on the loop.
SMALL = 256 * 1024
# A larger one goes in Write frames of CHUNK bytes.
CHUNK = 256 * 1024


def join(parent: bytes, name: bytes) -> bytes:
    """A root-relative child path."""
    return name if parent == b"" else parent + b"/" + name


def open_read(pfd: int) -> int:
    """Reopen an O_PATH fd for reading without moving its atime (O_NOATIME needs ownership or CAP_FOWNER)."""
    try:
        return os.open(syscalls.proc(pfd), os.O_RDONLY | os.O_CLOEXEC | os.O_NOATIME)
    except PermissionError:
        return os.open(syscalls.proc(pfd), os.O_RDONLY | os.O_CLOEXEC)


def create(path: bytes, e: Entry) -> m.Message:
    """The frame that makes an empty entry of e's kind, owner and mode (a file without data)."""
    perm = stat.S_IMODE(e.mode)
    if e.kind == stat.S_IFREG:
        return m.Create(path, perm, e.uid, e.gid, 0)
    if e.kind == stat.S_IFDIR:
        return m.Mkdir(path, perm, e.uid, e.gid)
    if e.kind == stat.S_IFLNK:
        return m.Symlink(path, e.target, e.uid, e.gid)
    return m.Mknod(path, e.mode, e.rdev, e.uid, e.gid)


def xattrs(path: bytes, fd: int) -> m.SyncXattrs:
    """Every extended attribute of the inode at fd, to set exactly these on the secondary's."""
    pairs = [list(p) for p in listing.xattrs_of(fd)]
    return m.SyncXattrs(path, msgpack.packb(pairs, use_bin_type=True))


def whole(pfd: int, path: bytes, local: Entry) -> list[m.Message] | None:
    """A small regular file without holes: content, owner, mode and times in one SyncFile (and its
    xattrs), read without yielding; None for a file that is larger or sparse."""
    if local.size > SMALL:
        return None
    fd = open_read(pfd)
    try:
        if local.size and os.lseek(fd, 0, os.SEEK_HOLE) < local.size:
            return None
        data = os.pread(fd, local.size + 1, 0)
        st = os.fstat(fd)
        if len(data) != st.st_size or len(data) > SMALL:
            return None
        frames: list[m.Message] = [
            m.SyncFile(path, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_atime_ns, st.st_mtime_ns, data)
        ]
        if local.xattrs:
            frames.append(xattrs(path, pfd))
        return frames
    finally:
        os.close(fd)


def content(fd: int, path: bytes) -> Iterator[m.Message]:
    """A file the secondary just created empty, as it is now: its size, then its data segments in
    Write frames (holes stay holes). Each frame is read when the caller asks for it."""
    size = os.fstat(fd).st_size
    if size:
        yield m.Truncate(path, size)
    for a, b in blocks.data_ranges(fd, size):
        for pos in range(a, b, CHUNK):
            data = os.pread(fd, min(CHUNK, b - pos), pos)
            if not data:
                return  # truncated meanwhile: a live Truncate follows
            yield m.Write(path, pos, data)


def attrs(path: bytes, fd: int, remote: Entry | None, *, force: bool) -> list[m.Message]:
    """Owner, mode, times and xattrs as the inode at fd has them now; none the secondary's already match."""
    local = listing.describe(fd, b"-")
    frames: list[m.Message] = []
    if local.kind in (stat.S_IFREG, stat.S_IFDIR) and local.xattrs != (remote.xattrs if remote else 0):
        frames.append(xattrs(path, fd))
    same = not force and remote is not None and (remote.mode, remote.uid, remote.gid, remote.mtime_ns) == (
        local.mode, local.uid, local.gid, local.mtime_ns,
    )  # fmt: skip
    if not same:
        mode = None if local.kind == stat.S_IFLNK else stat.S_IMODE(local.mode)
        frames.append(m.Setattr(path, mode, local.uid, local.gid, None, local.atime_ns, local.mtime_ns))
    return frames
