"""The read side every replicated mount shares: an inode-based passthrough beneath a directory fd."""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import resource
import select
import stat
import time
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import pyfuse3.asyncio

from agent.replication import syscalls
from agent.replication.inodes import Inodes

log = logging.getLogger("agent.replication")

BASE_OPTIONS = frozenset({"fsname=tandem", "subtype=tandem", "default_permissions", "allow_other"})
_P = ParamSpec("_P")
_R = TypeVar("_R")


def passes_errors(fn: Callable[_P, Awaitable[_R]]) -> Callable[_P, Awaitable[_R]]:
    """Turn every OSError into the same errno for the caller, never a generic EIO; any other error
    (a bug here) into EIO, logged with its traceback: pyfuse3 would leave the request unanswered,
    and the caller would wait for ever."""

    @functools.wraps(fn)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                _out_of_fds(exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from exc
        except Exception as exc:
            log.exception("FUSE %s failed (a bug in Tandem); the caller gets EIO", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from exc

    return wrapper


_OUT_OF_FDS_EVERY = 10.0
_out_of_fds_logged = -_OUT_OF_FDS_EVERY


def _out_of_fds(exc: OSError) -> None:
    """The application sees EMFILE or ENFILE for a stat or an open: say why, once every 10 s."""
    global _out_of_fds_logged
    now = time.monotonic()
    if now - _out_of_fds_logged < _OUT_OF_FDS_EVERY:
        return
    _out_of_fds_logged = now
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Nothing here may open a file: there is no descriptor left for it.
    log.error(
        "Out of file descriptors (%s): requests through the mount fail with it. The replicator holds one per "
        "inode the kernel knows and one per open file, and its limit is %d: raise it (--open-files-limit, or "
        "the service's LimitNOFILE)",
        os.strerror(exc.errno or errno.EMFILE),
        soft,
    )


class Passthrough(pyfuse3.Operations):
    """Lookups, attributes, directory listings, xattrs and reads, served from the tree beneath root_fd."""

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, root_fd: int, *, timeout: float = 1.0) -> None:
        super().__init__()
        self.inodes = Inodes(root_fd)
        self.timeout = timeout
        self._files: dict[int, tuple[int, int]] = {}
        self._dirs: dict[int, tuple[int, list[bytes]]] = {}
        self._next_fh = 1

    def _attr(self, ino: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size", "st_blksize", "st_blocks"):
            setattr(attr, name, getattr(st, name))
        attr.st_atime_ns, attr.st_mtime_ns, attr.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        attr.st_ino, attr.generation = ino, 0
        attr.entry_timeout = attr.attr_timeout = self.timeout
        return attr

    def native_tables(self) -> dict[str, Any]:
        """The tables Tandem's pyfuse3 patch answers requests from without calling Python.

        GETATTR (getattr here), the LOOKUP of a missing name (lookup's ENOENT), READ and RELEASE:
        the same answers these methods give, without a coroutine each (pyfuse3.native_answers: 34-48
        µs from the kernel's queueing to the reply here, against 43-87). A subclass that changes one of
        these methods changes this too.
        """
        return {"nodes": self.inodes.nodes, "files": self._files, "attr_timeout": self.timeout, "release": True}

    def engine_mounted(self) -> None:
        """The native data path reads this mount's requests and mirrors its node table (mount())."""

    def _handle(self, table: dict[int, Any], value: Any) -> int:
        fh, self._next_fh = self._next_fh, self._next_fh + 1
        table[fh] = value
        return fh

    @passes_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        ino, st = self.inodes.learn(parent_inode, name)
        return self._attr(ino, st)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            self.inodes.forget(ino, count)

    @passes_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(inode, os.fstat(self.inodes.fd(inode)))

    @passes_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.readlink(b"", dir_fd=self.inodes.fd(inode))

    @passes_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = os.statvfs(syscalls.proc(self.inodes.root_fd))
        data = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail"):
            setattr(data, name, getattr(sv, name))
        data.f_namemax = sv.f_namemax
        return data

    @passes_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        fd = os.open(syscalls.proc(self.inodes.fd(inode)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            names = sorted(os.fsencode(n) for n in os.listdir(fd))
        finally:
            os.close(fd)
        return self._handle(self._dirs, (inode, names))

    @passes_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        inode, names = self._dirs[fh]
        for i in range(start_id, len(names)):
            try:
                ino, st = self.inodes.learn(inode, names[i])
            except FileNotFoundError:
                continue
            if not pyfuse3.readdir_reply(token, names[i], self._attr(ino, st), i + 1):
                self.inodes.forget(ino, 1)
                break

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @passes_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return os.getxattr(syscalls.proc(self.inodes.fd(inode)), name)

    @passes_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [os.fsencode(n) for n in os.listxattr(syscalls.proc(self.inodes.fd(inode)))]

    def _open_fd(self, inode: int, flags: int) -> int:
        # O_APPEND is dropped: the kernel passes append offsets itself, and pwrite on an O_APPEND fd
        # would ignore the offset that is also shipped to the secondary. O_NOFOLLOW is dropped because
        # the kernel already resolved the name and /proc/self/fd/N is itself a (magic) link.
        clean = flags & ~(os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOCTTY | os.O_NOFOLLOW)
        return os.open(syscalls.proc(self.inodes.fd(inode)), clean | os.O_CLOEXEC)

    @passes_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=self._handle(self._files, (self._open_fd(inode, flags), inode)))

    @passes_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self._files[fh][0], size, off)

    async def flush(self, fh: int) -> None:
        # Nothing to do at close: ENOSYS tells the kernel so once, and it stops sending FLUSH at
        # all (one request less per close()); the close itself succeeds.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def release(self, fh: int) -> None:
        entry = self._files.pop(fh, None)
        if entry is not None:
            os.close(entry[0])


# Called each time a pyfuse3 worker is about to wait for the next request (see mount()).
_on_request: Callable[[], None] | None = None


class _FuseReadable:
    """pyfuse3's wait for the /dev/fuse fd, with one standing registration in the event loop.

    pyfuse3's asyncio layer registers the fd before every request and removes it after: two
    epoll_ctl calls, a selector key, a future and a callback each time (~8% of a busy primary's
    samples). Here the reader stays registered while workers keep waiting. pyfuse3's read lock lets
    one worker wait at a time. A request already queued is read without any trip through epoll (a
    zero-timeout poll; the worker still yields once so that no other task starves).
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd: Any = None
        self._waiter: asyncio.Future[None] | None = None

    async def wait(self, fd: Any) -> None:
        if _on_request is not None:
            _on_request()
        if select.select([fd], [], [], 0)[0]:
            await asyncio.sleep(0)
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        # Where pyfuse3.terminate() (notify_closing) finds the waiters it ends.
        pending = pyfuse3.asyncio._read_futures[fd]
        pending.add(fut)
        self._waiter = fut
        if self._fd is None:
            loop.add_reader(fd, self._readable)
            self._loop, self._fd = loop, fd
        try:
            await fut
        finally:
            if self._waiter is fut:
                self._waiter = None
            pending.discard(fut)
            if not pending:
                pyfuse3.asyncio._read_futures.pop(fd, None)
            if not fut.done() or fut.cancelled() or fut.exception() is not None:
                self.stop_watching()

    def _readable(self) -> None:
        fut, self._waiter = self._waiter, None
        if fut is not None and not fut.done():
            fut.set_result(None)
        elif self._fd is not None and select.select([self._fd], [], [], 0)[0]:
            # A request is queued and no worker waits (all are busy): stop watching until one
            # waits again, or the loop would call this on every turn until the request is read.
            self.stop_watching()

    def stop_watching(self) -> None:
        if self._fd is not None and self._loop is not None:
            self._loop.remove_reader(self._fd)
        self._fd = None


def use_asyncio() -> None:
    """Run pyfuse3 on asyncio, waiting for requests through one standing registration (_FuseReadable)."""
    pyfuse3.asyncio.enable()
    readable = _FuseReadable()
    notify_closing = pyfuse3.asyncio.notify_closing

    def closing(fd: Any) -> None:
        readable.stop_watching()
        notify_closing(fd)

    pyfuse3.asyncio.wait_readable = readable.wait
    pyfuse3.asyncio.notify_closing = closing


FUSE_DEVICE = "/dev/fuse"
_FUSE_RDEV = os.makedev(10, 229)


class MountError(Exception):
    """The replicated directory cannot be opened or mounted; the message names the path and the cause."""


def open_root(directory: str) -> int:
    """The directory's O_PATH fd, opened before anything is mounted over it."""
    if os.geteuid() != 0:
        raise MountError(f"cannot serve {directory}: the replicator must run as root (it mounts and keeps owners)")
    if syscalls.mount_type(directory) == "fuse.tandem":
        raise MountError(
            f"cannot serve {directory}: a Tandem file system is already mounted there (another replicator "
            f"serves it, or one that died left its mount: fusermount3 -uz {directory})"
        )
    try:
        return os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise MountError(f"cannot open {directory}: {exc.strerror}") from exc


def _device_problem() -> str | None:
    try:
        st = os.stat(FUSE_DEVICE)
    except FileNotFoundError:
        return f"{FUSE_DEVICE} is missing (modprobe fuse; in a container, pass the device: --device {FUSE_DEVICE})"
    if not stat.S_ISCHR(st.st_mode) or st.st_rdev != _FUSE_RDEV:
        return f"{FUSE_DEVICE} is not the FUSE device (character device 10:229)"
    try:
        os.close(os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return f"cannot open {FUSE_DEVICE}: {exc.strerror}"
    return None


def mount(
    fs: Passthrough,
    directory: str,
    *,
    read_only: bool = False,
    debug: bool = False,
    on_request: Callable[[], None] | None = None,
    native: bool = True,
) -> None:
    """Mount the file system over `directory`, whose fd the caller opened beforehand (open_root).

    `native`: requests that only read the file system's tables are answered in pyfuse3 itself
    (fs.native_tables()); False sends every request to Python (for comparisons).

    `on_request` is called once per request served (awake.Awake.touch: a trivial request takes
    ~110-150 µs here while idle CPUs halt, 20-60 µs while they poll).
    """
    global _on_request
    _on_request = on_request
    problem = _device_problem()
    if problem is not None:
        raise MountError(f"cannot mount {directory}: {problem}")
    options = set(pyfuse3.default_options) | BASE_OPTIONS
    if read_only:
        options.add("ro")
    if debug:
        options.add("debug")
    try:
        pyfuse3.init(fs, directory, options)
    except RuntimeError as exc:
        raise MountError(f"cannot mount {directory}: {exc} (libfuse's reason is logged just before)") from exc
    pyfuse3.native_answers(**(fs.native_tables() if native else {}))
    if native and hasattr(pyfuse3, "engine_node") and pyfuse3.engine_on():
        # The native data path's thread reads /dev/fuse: it answers the same before they reach pyfuse3.
        fs.inodes.mirror(pyfuse3.engine_node)
        fs.engine_mounted()
