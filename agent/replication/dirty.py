"""What a batch of applied frames changed on the secondary, flushed before the batch is acknowledged (`durable`)."""

from __future__ import annotations

import os
import stat

from agent.replication import syscalls

# Past this many inodes in one batch, one syncfs of the file system is cheaper than an fsync each
# (and keeps the fds held bounded, whatever a resync's batch holds).
MAX_INODES = 64


class Dirty:
    """Inodes changed since the last flush, each held by an fd of its own until `flush`.

    A file whose bytes or size changed is `fdatasync`ed (the promise of fdatasync: its mtime may lag
    after a power loss, its data and size never); an inode whose metadata or entries changed is
    `fsync`ed. A symlink, FIFO or device node is never opened: the fsync of its directory commits it
    (journaled file systems, ext4 and XFS, commit every metadata change of the transaction together).
    """

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self._fds: dict[tuple[int, int], tuple[int, bool]] = {}
        self._whole = False

    def data(self, fd: int) -> None:
        """`fd`, open for writing on a regular file, had its bytes or size changed."""
        st = os.fstat(fd)
        if not self._whole and (st.st_dev, st.st_ino) not in self._fds:
            self._hold((st.st_dev, st.st_ino), os.dup(fd), metadata=False)

    def _inode(self, path_fd: int, st: os.stat_result) -> bool:
        """The inode behind the O_PATH fd `path_fd` had its metadata (or, for a directory, entries) changed.

        False for a symlink, FIFO or device node: never opened, so not recorded.
        """
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            return False
        key = (st.st_dev, st.st_ino)
        held = self._fds.get(key)
        if held is not None:
            self._fds[key] = (held[0], True)
        elif not self._whole:
            # Reopened through our own fd: exactly that inode, and never a device or a FIFO.
            self._hold(key, os.open(syscalls.proc(path_fd), os.O_RDONLY | os.O_CLOEXEC), metadata=True)
        return True

    def entry(self, dir_fd: int, name: bytes) -> None:
        """The entry `name` of the directory `dir_fd` was made, changed or removed: the directory and what it names."""
        if self._whole:
            return
        self._inode(dir_fd, os.fstat(dir_fd))
        self._named(dir_fd, name, missing_ok=True)

    def node(self, dir_fd: int, name: bytes) -> None:
        """The inode `name` of the directory `dir_fd` names had its metadata changed; for a symlink,
        FIFO or device node (never opened), the directory whose fsync commits it."""
        if not self._whole and not self._named(dir_fd, name, missing_ok=False):
            self._inode(dir_fd, os.fstat(dir_fd))

    def _named(self, dir_fd: int, name: bytes, *, missing_ok: bool) -> bool:
        """Record the inode at dir_fd/name if it is a regular file or a directory; whether it was."""
        try:
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except FileNotFoundError:
            if missing_ok:
                return False
            raise
        try:
            return self._inode(fd, os.fstat(fd))
        finally:
            os.close(fd)

    def _hold(self, key: tuple[int, int], fd: int, *, metadata: bool) -> None:
        self._fds[key] = (fd, metadata)
        if len(self._fds) > MAX_INODES:
            self.discard()
            self._whole = True

    def flush(self) -> None:
        """Make every change recorded durable and forget them; the first failure is raised after all were tried."""
        failure: OSError | None = None
        try:
            if self._whole:
                # syncfs refuses an O_PATH fd (EBADF): reopen the root for reading.
                fd = os.open(syscalls.proc(self.root_fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    syscalls.syncfs(fd)
                finally:
                    os.close(fd)
            for fd, metadata in self._fds.values():
                try:
                    (os.fsync if metadata else os.fdatasync)(fd)
                except OSError as exc:
                    failure = failure or exc
        finally:
            self.discard()
        if failure is not None:
            raise failure

    def discard(self) -> None:
        """Close every fd held, forgetting what they recorded."""
        fds, self._fds, self._whole = self._fds, {}, False
        for fd, _ in fds.values():
            os.close(fd)
