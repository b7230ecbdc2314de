"""What a resync compares per directory entry: type, owner, mode, size, times, links, xattrs."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Any

import msgpack
import xxhash

from agent.replication.beneath import PathEscape, check_name
from agent.replication.syscalls import proc
from agent.replication.wire import ProtocolError

_FIELDS = 12
# SyncDirSums answers carry the block checksums of regular files up to this size (a 13th field).
SUMS_MAX = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Entry:
    """One directory entry as a resync sees it (xattrs only for regular files and directories)."""

    name: bytes
    mode: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    rdev: int
    ino: int
    nlink: int
    target: bytes
    xattrs: int
    sums: bytes | None = None

    @property
    def kind(self) -> int:
        """The file type bits."""
        return stat.S_IFMT(self.mode)


def xattrs_of(fd: int) -> list[tuple[bytes, bytes]]:
    """The extended attributes of the inode behind an O_PATH fd, sorted by name."""
    path = proc(fd)
    names = sorted(os.fsencode(n) for n in os.listxattr(path))
    return [(n, os.getxattr(path, n)) for n in names]


def xattr_digest(pairs: list[tuple[bytes, bytes]]) -> int:
    """One checksum over a sorted xattr set; 0 for none."""
    if not pairs:
        return 0
    h = xxhash.xxh3_64()
    for name, value in pairs:
        h.update(len(name).to_bytes(4, "big") + name + len(value).to_bytes(4, "big") + value)
    return h.intdigest() or 1


def entry_at(dir_fd: int, name: bytes) -> Entry:
    """Describe dir_fd/name without following a symlink."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return describe(fd, name)
    finally:
        os.close(fd)


def describe(fd: int, name: bytes) -> Entry:
    """Describe the inode behind an O_PATH fd (opened without following a symlink) as entry `name`."""
    st = os.fstat(fd)
    kind = stat.S_IFMT(st.st_mode)
    target = os.readlink(b"", dir_fd=fd) if kind == stat.S_IFLNK else b""
    xattrs = xattr_digest(xattrs_of(fd)) if kind in (stat.S_IFREG, stat.S_IFDIR) else 0
    return Entry(
        name, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_atime_ns, st.st_mtime_ns,
        st.st_rdev, st.st_ino, st.st_nlink, target, xattrs,
    )  # fmt: skip


def names_in(dir_fd: int) -> list[bytes]:
    """The names in a directory (an O_PATH fd), sorted."""
    fd = os.open(proc(dir_fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return sorted(os.fsencode(n) for n in os.listdir(fd))
    finally:
        os.close(fd)


def list_dir(dir_fd: int) -> list[Entry]:
    """Every entry of a directory; entries that vanish meanwhile are skipped."""
    out = []
    for name in names_in(dir_fd):
        try:
            out.append(entry_at(dir_fd, name))
        except FileNotFoundError:
            continue
    return out


def has_sums(e: Entry) -> bool:
    """Whether a SyncDirSums answer carries this entry's block checksums."""
    return stat.S_ISREG(e.mode) and e.size <= SUMS_MAX


def encode(entries: list[Entry], sums: dict[bytes, bytes | None] | None = None) -> bytes:
    """Entries as the data of a Listing frame; with `sums`, each row ends with its checksums or nil."""
    rows = [[e.name, e.mode, e.uid, e.gid, e.size, e.atime_ns, e.mtime_ns, e.rdev, e.ino, e.nlink, e.target, e.xattrs]
            for e in entries]  # fmt: skip
    if sums is not None:
        for row, e in zip(rows, entries, strict=True):
            row.append(sums.get(e.name))
    return msgpack.packb(rows, use_bin_type=True)


def _row(row: Any, fields: int) -> Entry:
    if type(row) is not list or len(row) != fields:
        raise ProtocolError(f"Listing: entry is not a list of {fields} fields")
    sums = row.pop() if fields > _FIELDS else None
    if sums is not None and (type(sums) is not bytes or len(sums) % 8):
        raise ProtocolError("Listing: checksums must be nil or bytes, 8 per block")
    name, *ints, target, xattrs = row
    if type(name) is not bytes or type(target) is not bytes:
        raise ProtocolError("Listing: name and target must be bytes")
    try:
        check_name(name, name)
    except PathEscape as exc:
        raise ProtocolError(f"Listing: {exc}") from exc
    if any(type(v) is not int for v in (*ints, xattrs)):
        raise ProtocolError("Listing: numeric fields must be integers")
    return Entry(name, *ints, target, xattrs, sums)


def decode(data: bytes, *, with_sums: bool = False) -> dict[bytes, Entry]:
    """A Listing frame's entries by name (answering SyncDirSums: `with_sums`); ProtocolError if malformed."""
    try:
        rows = msgpack.unpackb(data, raw=False, use_list=True)
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise ProtocolError(f"Listing is not valid msgpack: {exc}") from exc
    if type(rows) is not list:
        raise ProtocolError("Listing is not a list")
    fields = _FIELDS + 1 if with_sums else _FIELDS
    return {e.name: e for e in (_row(row, fields) for row in rows)}
