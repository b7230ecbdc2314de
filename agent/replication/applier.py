"""The secondary's state machine: applies operation frames beneath its directory fd, in order, once each."""

from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import msgpack

from agent.replication import blocks, listing, syscalls
from agent.replication import messages as m
from agent.replication.beneath import Beneath
from agent.replication.dirty import Dirty
from agent.replication.wire import Frame, ProtocolError

_REMEMBERED_ERRORS = 1024
# Open files kept for data operations; any change to the namespace closes them all.
_CACHED_FILES = 64
_NODE_TYPES = (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFREG)


# Operations that never change which inode a path names: the open-file cache survives them.
_KEEPS_NAMES = frozenset(
    {m.Write, m.Truncate, m.Fallocate, m.Fsync, m.Setattr, m.Setxattr, m.Removexattr, m.SyncMark, m.SyncSums}
)

# Operations that never move or remove a directory: resolved directory fds survive them.
_KEEPS_DIRS = frozenset(
    {
        *_KEEPS_NAMES,
        m.Create,
        m.Mkdir,
        m.Mknod,
        m.Unlink,
        m.Link,
        m.Symlink,
        m.SyncBegin,
        m.SyncEnd,
        m.SyncDir,
        m.SyncXattrs,
        m.SyncFile,
        m.SyncDirSums,
    }
)


# What `durable` mode flushes after each operation: the file whose bytes changed (fdatasync), the
# inode whose metadata changed, or the entries made, changed or removed (their directory and inode).
_DATA_OPS = frozenset({m.Write, m.Truncate, m.Fallocate})
_INODE_OPS = frozenset({m.Setattr, m.Setxattr, m.Removexattr, m.SyncXattrs})
_ENTRY_FIELDS: dict[type[m.Message], tuple[str, ...]] = {
    m.Create: ("path",),
    m.Mkdir: ("path",),
    m.Mknod: ("path",),
    m.Symlink: ("path",),
    m.Link: ("path",),
    m.Unlink: ("path",),
    m.Rmdir: ("path",),
    m.Rename: ("old", "new"),
    m.SyncRemove: ("path",),
    m.SyncFile: ("path",),
}


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class Applier:
    """Applies frames deterministically; a seq already applied is acknowledged again, never re-applied."""

    def __init__(self, root_fd: int, *, use_openat2: bool = True) -> None:
        self.beneath = Beneath(root_fd, use_openat2=use_openat2, cache_dirs=True)
        self.stream: bytes | None = None
        self.applied_seq = 0
        self.unsynced = 0
        # Set in `durable` mode: what the frames applied since the last take_dirty() changed.
        self.dirty: Dirty | None = None
        self._files: OrderedDict[bytes, int] = OrderedDict()
        self._errors: OrderedDict[int, m.Ack] = OrderedDict()
        self._ops: dict[type[m.Message], Callable[[Any], object]] = {
            m.Write: self._write,
            m.Truncate: self._truncate,
            m.Fallocate: self._fallocate,
            m.Create: self._create,
            m.Mkdir: self._mkdir,
            m.Mknod: self._mknod,
            m.Unlink: self._unlink,
            m.Rmdir: self._rmdir,
            m.Rename: self._rename,
            m.Link: self._link,
            m.Symlink: self._symlink,
            m.Setattr: self._setattr,
            m.Setxattr: self._setxattr,
            m.Removexattr: self._removexattr,
            m.Fsync: self._fsync,
            m.SyncBegin: _nothing,
            m.SyncEnd: _nothing,
            m.SyncMark: _nothing,
            m.SyncDir: self._sync_dir,
            m.SyncSums: self._sync_sums,
            m.SyncRemove: self._sync_remove,
            m.SyncXattrs: self._sync_xattrs,
            m.SyncFile: self._sync_file,
            m.SyncDirSums: self._sync_dir_sums,
        }

    def applied_for(self, stream: bytes) -> int:
        """The last seq applied from `stream`, 0 if that stream is new here."""
        return self.applied_seq if stream == self.stream else 0

    def begin(self, stream: bytes) -> None:
        """Start or continue `stream`; a different stream starts again from seq 1."""
        if stream != self.stream:
            self.close()
            self.stream, self.applied_seq = stream, 0
            self._errors.clear()

    def record_changes(self, on: bool) -> None:
        """Whether to record what each frame changes, for take_dirty() (`durable` mode)."""
        if self.dirty is not None:
            self.dirty.discard()
        self.dirty = Dirty(self.beneath.root_fd) if on else None

    def take_dirty(self) -> Dirty:
        """What the frames applied since the last call changed, to flush; the next frames record anew."""
        assert self.dirty is not None, "take_dirty outside durable mode"
        taken, self.dirty = self.dirty, Dirty(self.beneath.root_fd)
        self.unsynced = 0
        return taken

    def applied_by_others(self, seq: int, written: int) -> None:
        """Frames up to `seq` of this stream were applied elsewhere (the native data path), writing
        `written` bytes; the next frame here is the one after."""
        if seq > self.applied_seq:
            # They may have removed or created the files this applier keeps open by name.
            self._close_files()
        self.applied_seq = max(self.applied_seq, seq)
        self.unsynced += written

    def blocking(self, msg: m.Message) -> bool:
        """Whether applying `msg` may take long enough that it belongs in a thread, off the event loop."""
        return self.long_sync() if isinstance(msg, m.Fsync) else msg.BLOCKING

    def long_sync(self) -> bool:
        """Whether enough was written since the last sync that syncing it belongs in a thread."""
        return self.unsynced >= syscalls.INLINE_SYNC_BYTES

    def close(self) -> None:
        """Close the files kept open for data operations and the cached directories."""
        self._close_files()
        self.beneath.forget_dirs()
        if self.dirty is not None:
            self.dirty.discard()

    def _close_files(self) -> None:
        while self._files:
            os.close(self._files.popitem()[1])

    def apply(self, frame: Frame) -> m.Message:
        """Apply one frame; return its Ack or, for a request, its answer. PathEscape/ProtocolError: disconnect."""
        msg = frame.msg
        op = self._ops.get(type(msg))
        if op is None:
            raise ProtocolError(f"{type(msg).__name__} is not an operation a secondary applies")
        if frame.seq == 0:
            raise ProtocolError("operation frame with sequence number 0")
        if frame.seq <= self.applied_seq:
            return self._errors.get(frame.seq, m.Ack())
        if frame.seq != self.applied_seq + 1:
            raise ProtocolError(f"sequence gap: applied {self.applied_seq}, received {frame.seq}")
        if type(msg) not in _KEEPS_NAMES:
            self._close_files()
        moves_dirs = type(msg) not in _KEEPS_DIRS
        if moves_dirs:
            self.beneath.forget_dirs()
        try:
            ack = self._run(op, msg)
        finally:
            if moves_dirs:
                self.beneath.forget_dirs()
        self.applied_seq = frame.seq
        if isinstance(ack, m.Ack) and ack.status:
            self._errors[frame.seq] = ack
            if len(self._errors) > _REMEMBERED_ERRORS:
                self._errors.popitem(last=False)
        return ack

    def _run(self, op: Callable[[Any], object], msg: m.Message) -> m.Message:
        try:
            answer = op(msg)
            if answer is not _TIMES_DONE:
                for fix in getattr(msg, "times", ()):
                    self._fix_times(fix)
            if self.dirty is not None:
                self._record(msg, self.dirty)
        except OSError as exc:
            code = exc.errno or errno.EIO
            name = exc.filename if exc.filename is not None else getattr(msg, "path", None)
            return m.Ack(code, f"{type(msg).__name__} {name!r}: {os.strerror(code)}"[:1000])
        except ValueError as exc:
            raise ProtocolError(f"{type(msg).__name__} cannot be applied: {exc}") from exc
        return answer if isinstance(answer, m.Message) else m.Ack()

    def _record(self, msg: m.Message, dirty: Dirty) -> None:
        """Note in `dirty` what the operation just applied changed (`durable` mode)."""
        kind, path = type(msg), getattr(msg, "path", b"")
        if kind in _DATA_OPS:
            dirty.data(self._file(path))
        elif kind in _INODE_OPS:
            with self.beneath.node(path) as (dir_fd, name):
                dirty.node(dir_fd, name)
        for field in _ENTRY_FIELDS.get(kind, ()):
            with self.beneath.entry(getattr(msg, field)) as (dir_fd, name):
                dirty.entry(dir_fd, name)
        for fix in getattr(msg, "times", ()):
            # A written file's own times follow fdatasync's promise: they may lag, its bytes never.
            if kind not in _DATA_OPS or fix.path != path:
                with self.beneath.node(fix.path) as (dir_fd, name):
                    dirty.node(dir_fd, name)

    def _file(self, path: bytes) -> int:
        """A cached writable fd of the regular file at `path` (opened beneath the root on a miss)."""
        fd = self._files.get(path)
        if fd is not None:
            self._files.move_to_end(path)
            return fd
        with self.beneath.inode(path) as (pfd, st):
            _require_regular(st, path)
            fd = os.open(syscalls.proc(pfd), os.O_WRONLY | os.O_CLOEXEC)
        self._files[path] = fd
        if len(self._files) > _CACHED_FILES:
            os.close(self._files.popitem(last=False)[1])
        return fd

    @contextmanager
    def _regular(self, path: bytes, flags: int) -> Iterator[int]:
        """Open a regular file for I/O; other types are never opened, so no device driver is reached."""
        with self.beneath.inode(path) as (pfd, st):
            _require_regular(st, path)
            fd = os.open(syscalls.proc(pfd), flags | os.O_CLOEXEC)
        try:
            yield fd
        finally:
            os.close(fd)

    def _own(self, dir_fd: int, name: bytes, uid: int, gid: int, mode: int | None) -> None:
        os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
        if mode is not None:
            self._chmod(dir_fd, name, mode)

    @staticmethod
    def _chmod(dir_fd: int, name: bytes, mode: int) -> None:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            # Linux symlinks have no mode of their own; chmod through one would reach its target.
            if not stat.S_ISLNK(os.fstat(fd).st_mode):
                os.chmod(syscalls.proc(fd), mode & 0o7777)
        finally:
            os.close(fd)

    def _fix_times(self, fix: m.TimeFix) -> None:
        with self.beneath.node(fix.path) as (dir_fd, name):
            os.utime(name, ns=(fix.atime_ns, fix.mtime_ns), dir_fd=dir_fd, follow_symlinks=False)

    def _write(self, msg: m.Write) -> object:
        fd = self._file(msg.path)
        _pwrite_all(fd, msg.data, msg.offset)
        self.unsynced += len(msg.data)
        if len(msg.data) >= syscalls.STREAM_WRITE_BYTES:
            syscalls.start_writeback(fd, msg.offset, len(msg.data))
        # The usual fix names the written file itself: set it on the open fd, no second resolution.
        for fix in msg.times:
            if fix.path == msg.path:
                os.utime(fd, ns=(fix.atime_ns, fix.mtime_ns))
            else:
                self._fix_times(fix)
        return _TIMES_DONE

    def _truncate(self, msg: m.Truncate) -> None:
        os.ftruncate(self._file(msg.path), msg.size)

    def _fallocate(self, msg: m.Fallocate) -> None:
        syscalls.fallocate(self._file(msg.path), msg.mode, msg.offset, msg.length)

    def _create(self, msg: m.Create) -> None:
        # Always exclusive: the primary just created a new inode, so an existing entry here is divergence.
        with self.beneath.entry(msg.path) as (dir_fd, name):
            flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
            try:
                os.fchown(fd, msg.uid, msg.gid)
                os.fchmod(fd, msg.mode)
            finally:
                os.close(fd)

    def _mkdir(self, msg: m.Mkdir) -> None:
        with self.beneath.entry(msg.path) as (dir_fd, name):
            os.mkdir(name, 0o700, dir_fd=dir_fd)
            self._own(dir_fd, name, msg.uid, msg.gid, msg.mode)

    def _mknod(self, msg: m.Mknod) -> None:
        if stat.S_IFMT(msg.mode) not in _NODE_TYPES:
            raise OSError(errno.EINVAL, "mknod of an unsupported file type", msg.path)
        with self.beneath.entry(msg.path) as (dir_fd, name):
            os.mknod(name, stat.S_IFMT(msg.mode) | 0o600, msg.rdev, dir_fd=dir_fd)
            self._own(dir_fd, name, msg.uid, msg.gid, msg.mode)

    def _unlink(self, msg: m.Unlink) -> None:
        with self.beneath.entry(msg.path) as (dir_fd, name):
            os.unlink(name, dir_fd=dir_fd)

    def _rmdir(self, msg: m.Rmdir) -> None:
        with self.beneath.entry(msg.path) as (dir_fd, name):
            os.rmdir(name, dir_fd=dir_fd)

    def _rename(self, msg: m.Rename) -> None:
        with self.beneath.entry(msg.old) as (old_fd, old), self.beneath.entry(msg.new) as (new_fd, new):
            if msg.flags:
                syscalls.renameat2(old_fd, old, new_fd, new, msg.flags)
            else:
                os.rename(old, new, src_dir_fd=old_fd, dst_dir_fd=new_fd)

    def _link(self, msg: m.Link) -> None:
        with self.beneath.entry(msg.target) as (old_fd, old), self.beneath.entry(msg.path) as (new_fd, new):
            os.link(old, new, src_dir_fd=old_fd, dst_dir_fd=new_fd, follow_symlinks=False)

    def _symlink(self, msg: m.Symlink) -> None:
        with self.beneath.entry(msg.path) as (dir_fd, name):
            os.symlink(msg.target, name, dir_fd=dir_fd)
            self._own(dir_fd, name, msg.uid, msg.gid, None)

    def _setattr(self, msg: m.Setattr) -> None:
        with self.beneath.node(msg.path) as (dir_fd, name):
            if msg.uid is not None or msg.gid is not None:
                uid, gid = -1 if msg.uid is None else msg.uid, -1 if msg.gid is None else msg.gid
                os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
            if msg.mode is not None:
                self._chmod(dir_fd, name, msg.mode)
            if msg.size is not None:
                with self._regular(msg.path, os.O_WRONLY) as fd:
                    os.ftruncate(fd, msg.size)
            if msg.atime_ns is not None or msg.mtime_ns is not None:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                atime = st.st_atime_ns if msg.atime_ns is None else msg.atime_ns
                mtime = st.st_mtime_ns if msg.mtime_ns is None else msg.mtime_ns
                os.utime(name, ns=(atime, mtime), dir_fd=dir_fd, follow_symlinks=False)

    def _setxattr(self, msg: m.Setxattr) -> None:
        with self.beneath.inode(msg.path) as (fd, _):
            os.setxattr(syscalls.proc(fd), msg.name, msg.value, msg.flags)

    def _removexattr(self, msg: m.Removexattr) -> None:
        with self.beneath.inode(msg.path) as (fd, _):
            os.removexattr(syscalls.proc(fd), msg.name)

    def _fsync(self, msg: m.Fsync) -> None:
        self.unsynced = 0
        cached = self._files.get(msg.path)
        if cached is not None:
            (os.fdatasync if msg.datasync else os.fsync)(cached)
            return
        with self.beneath.inode(msg.path) as (pfd, st):
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                return
            fd = os.open(syscalls.proc(pfd), os.O_RDONLY | os.O_CLOEXEC)
        try:
            (os.fdatasync if msg.datasync else os.fsync)(fd)
        finally:
            os.close(fd)

    # --- resync ----------------------------------------------------------------------------------

    def _sync_dir(self, msg: m.SyncDir) -> m.Message:
        with self.beneath.inode(msg.path) as (fd, st):
            if not stat.S_ISDIR(st.st_mode):
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), msg.path)
            return m.Listing(listing.encode(listing.list_dir(fd)))

    def _sync_sums(self, msg: m.SyncSums) -> m.Message:
        with self._regular(msg.path, os.O_RDONLY) as fd:
            size, digests = blocks.file_digests(fd)
        return m.Sums(size, blocks.pack(digests))

    def _sync_remove(self, msg: m.SyncRemove) -> None:
        with self.beneath.entry(msg.path) as (dir_fd, name):
            _remove_tree(dir_fd, name, self.beneath.root_dev)

    def _sync_xattrs(self, msg: m.SyncXattrs) -> None:
        pairs = _xattr_pairs(msg.pairs)
        with self.beneath.inode(msg.path) as (fd, _):
            path = syscalls.proc(fd)
            for name in set(os.listxattr(path)) - {os.fsdecode(n) for n, _ in pairs}:
                os.removexattr(path, name)
            for name, value in pairs:
                os.setxattr(path, name, value)

    def _sync_dir_sums(self, msg: m.SyncDirSums) -> m.Message:
        with self.beneath.inode(msg.path) as (fd, st):
            if not stat.S_ISDIR(st.st_mode):
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), msg.path)
            entries = listing.list_dir(fd)
            sums = {e.name: self._small_sums(fd, e) for e in entries if listing.has_sums(e)}
            return m.Listing(listing.encode(entries, sums))

    @staticmethod
    def _small_sums(dir_fd: int, entry: listing.Entry) -> bytes | None:
        try:
            pfd = os.open(entry.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(pfd).st_mode):
                return None  # never opened for reading: no FIFO or device is reached
            fd = os.open(syscalls.proc(pfd), os.O_RDONLY | os.O_CLOEXEC)
        finally:
            os.close(pfd)
        try:
            return blocks.pack(blocks.file_digests(fd)[1])
        finally:
            os.close(fd)

    def _sync_file(self, msg: m.SyncFile) -> None:
        # Exclusive like Create; chown before chmod (chown clears set-id bits), times last.
        with self.beneath.entry(msg.path) as (dir_fd, name):
            flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
            try:
                if msg.data:
                    _pwrite_all(fd, msg.data, 0)
                    self.unsynced += len(msg.data)
                os.fchown(fd, msg.uid, msg.gid)
                os.fchmod(fd, msg.mode)
                os.utime(fd, ns=(msg.atime_ns, msg.mtime_ns))
            finally:
                os.close(fd)


# Returned by an operation that applied its own time fixes.
_TIMES_DONE = object()


def _require_regular(st: os.stat_result, path: bytes) -> None:
    """Refuse I/O on anything but a regular file, so that no device driver is ever reached."""
    if not stat.S_ISREG(st.st_mode):
        code = errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL
        raise OSError(code, os.strerror(code), path)


def _nothing(msg: m.Message) -> None:
    """Markers of a resync: nothing to change in the tree."""


def _xattr_pairs(data: bytes) -> list[tuple[bytes, bytes]]:
    try:
        rows = msgpack.unpackb(data, raw=False, use_list=True)
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise ProtocolError(f"SyncXattrs is not valid msgpack: {exc}") from exc
    if type(rows) is not list or any(
        type(r) is not list or len(r) != 2 or type(r[0]) is not bytes or type(r[1]) is not bytes for r in rows
    ):
        raise ProtocolError("SyncXattrs: expected a list of [name, value] bytes pairs")
    if any(not r[0] or b"\0" in r[0] or len(r[0]) > 255 for r in rows):
        raise ProtocolError("SyncXattrs: bad attribute name")
    return [(r[0], r[1]) for r in rows]


def _remove_tree(dir_fd: int, name: bytes, dev: int) -> None:
    """Remove dir_fd/name and everything beneath it, never following a symlink or leaving the device."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    if st.st_dev != dev:
        raise OSError(errno.EXDEV, "refusing to remove a mount point", name)
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        for child in os.listdir(fd):
            _remove_tree(fd, os.fsencode(child), dev)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)
