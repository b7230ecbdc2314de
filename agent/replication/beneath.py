"""Resolve relative paths strictly beneath a directory fd: no `..`, no absolute paths, no symlinks, no mounts."""

from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from agent.replication import syscalls

NAME_MAX = 255
# openat2 takes at most PATH_MAX bytes per call; longer paths are resolved in chunks from intermediate fds.
_CHUNK = 3072
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_CACHED_DIRS = 256
# The primary names inodes through directory entries only, so a legitimate stream never crosses a
# symlink or a mount point: refusing every symlink (not only escaping ones) is stricter and simpler.
_RESOLVE = (
    syscalls.RESOLVE_BENEATH | syscalls.RESOLVE_NO_MAGICLINKS | syscalls.RESOLVE_NO_SYMLINKS | syscalls.RESOLVE_NO_XDEV
)
ROOT_NAME = b"."


class PathEscape(Exception):
    """A path that is malformed or would leave the replicated directory."""

    def __init__(self, path: bytes, reason: str) -> None:
        super().__init__(f"refusing path {path!r}: {reason}")
        self.path = path
        self.reason = reason


def check_name(name: bytes, path: bytes) -> None:
    """Refuse a path component that is empty, `.`, `..`, too long or holds NUL or `/`."""
    if not name:
        raise PathEscape(path, "empty component (absolute path or doubled slash)")
    if name in (b".", b".."):
        raise PathEscape(path, f"component {name!r} is not allowed")
    if b"\0" in name:
        raise PathEscape(path, "NUL byte in component")
    if b"/" in name:
        raise PathEscape(path, "slash in a single name")
    if len(name) > NAME_MAX:
        raise PathEscape(path, f"component longer than {NAME_MAX} bytes")


def split_relpath(path: bytes) -> tuple[bytes, ...]:
    """Split a root-relative path into validated components; b"" is the root itself."""
    if not isinstance(path, bytes):
        raise PathEscape(repr(path).encode(), "path is not bytes")
    if path == b"":
        return ()
    if path.startswith(b"/"):
        raise PathEscape(path, "absolute path")
    parts = tuple(path.split(b"/"))
    for part in parts:
        check_name(part, path)
    return parts


def _chunks(parts: tuple[bytes, ...]) -> Iterator[bytes]:
    chunk: list[bytes] = []
    size = 0
    for part in parts:
        if chunk and size + len(part) + 1 > _CHUNK:
            yield b"/".join(chunk)
            chunk, size = [], 0
        chunk.append(part)
        size += len(part) + 1
    if chunk:
        yield b"/".join(chunk)


class Beneath:
    """Resolves validated relative paths to fds beneath one directory fd, never leaving it."""

    def __init__(self, root_fd: int, *, use_openat2: bool = True, cache_dirs: bool = False) -> None:
        self.root_fd = root_fd
        self.root_dev = os.fstat(root_fd).st_dev
        self.use_openat2 = use_openat2 and self._openat2_works()
        # With cache_dirs the owner promises to call forget_dirs() before and after anything that can
        # move or remove a directory; only then may a resolved directory fd be used again.
        self._dirs: OrderedDict[bytes, int] | None = OrderedDict() if cache_dirs else None

    def forget_dirs(self) -> None:
        """Close every cached directory fd (a directory may have moved or gone)."""
        while self._dirs:
            os.close(self._dirs.popitem()[1])

    def _openat2_works(self) -> bool:
        try:
            fd = syscalls.openat2(self.root_fd, b".", _DIR_FLAGS, _RESOLVE)
        except OSError as exc:
            if exc.errno in (errno.ENOSYS, errno.EPERM, errno.E2BIG, errno.EINVAL):
                return False
            raise
        os.close(fd)
        return True

    def open_dir(self, path: bytes, parts: tuple[bytes, ...]) -> int:
        """Open the directory named by `parts` as an O_PATH fd the caller must close."""
        if not parts:
            return os.dup(self.root_fd)
        if self.use_openat2:
            return self._walk(_chunks(parts), lambda cur, chunk: self._step_openat2(cur, chunk, path))
        return self._walk(parts, lambda cur, part: self._step(cur, part, path))

    def _walk(self, steps: Iterable[bytes], step: Callable[[int, bytes], int]) -> int:
        """Follow ``steps`` from the root, closing every intermediate fd, even when a step fails."""
        cur = self.root_fd
        try:
            for part in steps:
                nxt = step(cur, part)
                if cur != self.root_fd:
                    os.close(cur)
                cur = nxt
        except BaseException:
            if cur != self.root_fd:
                os.close(cur)
            raise
        return cur

    def _step_openat2(self, cur: int, chunk: bytes, path: bytes) -> int:
        try:
            return syscalls.openat2(cur, chunk, _DIR_FLAGS, _RESOLVE)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise PathEscape(path, "crosses a symlink") from exc
            if exc.errno == errno.EXDEV:
                raise PathEscape(path, "leaves the directory or crosses a mount point") from exc
            raise OSError(exc.errno, os.strerror(exc.errno or 0), path) from exc

    def _step(self, cur: int, part: bytes, path: bytes) -> int:
        try:
            nxt = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=cur)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR) and self._is_symlink(cur, part):
                raise PathEscape(path, "crosses a symlink") from exc
            raise OSError(exc.errno, os.strerror(exc.errno or 0), path) from exc
        if os.fstat(nxt).st_dev != self.root_dev:
            os.close(nxt)
            raise PathEscape(path, "crosses a mount point")
        return nxt

    @staticmethod
    def _is_symlink(dir_fd: int, name: bytes) -> bool:
        try:
            return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except OSError:
            return False

    @contextmanager
    def entry(self, path: bytes) -> Iterator[tuple[int, bytes]]:
        """Yield (parent dir fd, name) for an entry to create or remove; the root itself is refused."""
        if not split_relpath(path):
            raise PathEscape(path, "the root is not an entry of itself")
        with self.node(path) as found:
            yield found

    @contextmanager
    def node(self, path: bytes) -> Iterator[tuple[int, bytes]]:
        """Yield (dir fd, name) naming an existing inode for *at() calls; the root is (root, b".")."""
        parts = split_relpath(path)
        if not parts:
            yield self.root_fd, ROOT_NAME
            return
        if self._dirs is not None:
            yield self._cached_dir(path, parts[:-1]), parts[-1]
            return
        fd = self.open_dir(path, parts[:-1])
        try:
            yield fd, parts[-1]
        finally:
            os.close(fd)

    def _cached_dir(self, path: bytes, parts: tuple[bytes, ...]) -> int:
        assert self._dirs is not None
        if not parts:
            return self.root_fd
        key = b"/".join(parts)
        fd = self._dirs.get(key)
        if fd is not None:
            self._dirs.move_to_end(key)
            return fd
        fd = self.open_dir(path, parts)
        self._dirs[key] = fd
        if len(self._dirs) > _CACHED_DIRS:
            os.close(self._dirs.popitem(last=False)[1])
        return fd

    @contextmanager
    def inode(self, path: bytes) -> Iterator[tuple[int, os.stat_result]]:
        """Yield an O_PATH fd to the inode itself (a symlink is not followed) and its stat."""
        with self.node(path) as (dir_fd, name):
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            st = os.fstat(fd)
            if st.st_dev != self.root_dev:
                raise PathEscape(path, "is a mount point")
            yield fd, st
        finally:
            os.close(fd)
