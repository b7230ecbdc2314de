"""The primary's FUSE passthrough: applies each call beneath the directory fd, ships it, awaits the ack."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import stat
from collections.abc import Callable
from typing import Any

import pyfuse3

from agent.replication import fresh, listing, syscalls
from agent.replication import messages as m
from agent.replication.beneath import Beneath, PathEscape
from agent.replication.exclude import NOTHING, Exclude
from agent.replication.inodes import ROOT
from agent.replication.passthrough import Passthrough, passes_errors
from agent.replication.sender import Sender

# Every change to the tree goes through this mount, so the kernel's entry and attribute caches stay
# true for as long as it keeps them: a long timeout saves a LOOKUP or GETATTR request per operation.
CACHE_SECONDS = 300.0
_CAPS = b"security.capability"
log = logging.getLogger(__name__)
# Tandem's pyfuse3 patch (vendor/pyfuse3-tandem.patch): whether the kernel granted HANDLE_KILLPRIV_V2.
_killpriv_v2: Callable[[], bool] = getattr(pyfuse3, "killpriv_v2", lambda: False)


class ReplicatedFS(Passthrough):
    """The primary's passthrough over the directory it is mounted on; every change goes to the Sender.

    With `writeback` (ack mode `fsync`, the promise of a local disk) the kernel caches writes, and
    every operation is shipped without waiting for its ack: flush (close), fsync and fsyncdir wait
    until the peer has everything shipped before them.

    It asks the kernel for HANDLE_KILLPRIV_V2 (with Tandem's pyfuse3 patch): the kernel then sends no
    GETXATTR(security.capability) before each write, one request less per write(), and leaves it to
    this file system to drop the file capability and the set-ID bits (`_kill_privs`).

    With `exclude` (ReplicatedDir.exclude) an operation on excluded paths only is applied here and
    not shipped, but for the times of the replicated directories it changed; an entry that crosses
    the boundary by rename or link is removed from the secondary or shipped there whole (_arrived).
    """

    handle_killpriv_v2 = True
    # Every change to the tree goes through this mount, so the pages the kernel caches stay true: a
    # write does not make it drop them (Tandem's pyfuse3 patch), and a read of a file just written
    # is served from the page cache, without a READ request.
    auto_inval_data = False

    def __init__(
        self,
        root_fd: int,
        sender: Sender,
        *,
        timeout: float = CACHE_SECONDS,
        writeback: bool = False,
        engine: bool = True,
        creates: bool = True,
        exclude: Exclude = NOTHING,
    ) -> None:
        super().__init__(root_fd, timeout=timeout)
        self.sender = sender
        self.exclude = exclude
        self.enable_writeback_cache = writeback
        # The native data path (agent/replication/native, with Tandem's pyfuse3): its thread serves
        # WRITE, FSYNC and the SETATTR of times (the writeback cache's mtime, `fsync` mode) of the
        # files registered with it (_register). Each replies once the secondary acknowledged its
        # frame, in `fsync` mode too, but for CREATE and UNLINK there, which reply at once as
        # Python's do: a flush then waits for what Python shipped and for those (_settled).
        self.tandem_engine = engine and hasattr(pyfuse3, "engine_file")
        # ... and CREATE and UNLINK in the directories registered with it (_serve_entries_in), once
        # the mount runs it (engine_mounted).
        # Anchored exclude patterns keep F out of the directories they reach (_serve_entries_in);
        # F leaves the names the others may match to Python (engine_exclude). A pyfuse3 without
        # that matcher serves no creates while such patterns exist.
        self._names = hasattr(pyfuse3, "engine_exclude")
        self._creates = (
            creates
            and self.tandem_engine
            and hasattr(pyfuse3, "engine_creates")
            and (self._names or not exclude.anywhere)
        )
        self.native_creates = False
        self._unsynced: dict[int, int] = {}
        # Inodes known to carry no file capability: the kernel asks before every write().
        self._no_caps: set[int] = set()
        self._killpriv_logged = False
        # writeback: the last operation Python shipped. The stream is in order, so once the secondary
        # acknowledged it, it has every frame before it in memory too (F's replied after their acks).
        self._last: asyncio.Future[m.Message] | None = None

    def native_tables(self) -> dict[str, Any]:
        # A missing name is a cached negative entry (lookup), and GETXATTR(security.capability) of an
        # inode in _no_caps is ENODATA (getxattr).
        return {**super().native_tables(), "negative_timeout": self.timeout, "no_caps": self._no_caps}

    def engine_mounted(self) -> None:
        if not self._creates:
            return

        def start(next_ino: int) -> Callable[[], int]:
            pyfuse3.engine_creates(True, next_ino, self.enable_writeback_cache, self._engine_events)
            return pyfuse3.engine_ino

        if self._names:
            pyfuse3.engine_exclude(self.exclude.names())
        self.inodes.share_numbers(start)
        self.native_creates = True
        self._serve_entries_in(ROOT)
        # Between requests Python gets (which take the events first), the engine says when a batch
        # waits; the fd lives as long as the process.
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().add_reader(pyfuse3.engine_events_fd(), self._engine_events)

    def _engine_events(self) -> None:
        """What the native data path's CREATE and UNLINK did, into this file system's tables (pyfuse3
        calls this before it handles the next request)."""
        for event in pyfuse3.engine_events():
            if event[0] == "release":
                # Its fd is closed already: out of the table (no request on it can come).
                self._files.pop(event[1], None)
            elif event[0] == "open":
                # Opened for reading: pyfuse3 answers its READs from this table; the fd stays the
                # engine's, which closes it at RELEASE (and says so with a "release" event).
                _, fh, fd, ino = event
                self._files[fh] = (fd, ino)
            elif event[0] == "create":
                _, parent, name, key, ino, opath, fh, fd = event
                self.inodes.adopt(ino, opath, key, parent, name)
                self._files[fh] = (fd, ino)
                # Made with O_EXCL: no capability (create).
                self._no_caps.add(ino)
            else:
                _, parent, name, key = event
                self.inodes.unnamed(parent, name, key)

    def _serve_entries_in(self, *dirs: int) -> None:
        """Let the native data path create and unlink in these directories, by the paths they have now
        (until Python's next Rename frame)."""
        if self.native_creates:
            for ino in dirs:
                path = self.inodes.path(ino)
                if path is not None and self.exclude.in_reach(path, names=not self._names):
                    pyfuse3.engine_dir(ino, None)  # an entry made here may be excluded: Python's
                elif path is not None:
                    pyfuse3.engine_dir(ino, path)

    def _fix(self, *inos: int | None) -> m.Times:
        fixes = []
        for ino in dict.fromkeys(i for i in inos if i is not None):
            path = self._path(ino)
            if path is not None:
                st = os.fstat(self.inodes.fd(ino))
                fixes.append(m.TimeFix(path, st.st_atime_ns, st.st_mtime_ns))
        return tuple(fixes)

    def _path(self, ino: int) -> bytes | None:
        """The path the inode's frames name: one of its replicated names, None if it has none (unlinked,
        or every name the kernel knows is excluded)."""
        path = self.inodes.path(ino)
        if not self.exclude or path is None or not self.exclude.excluded(path):
            return path
        return next((p for p in self.inodes.paths(ino) if not self.exclude.excluded(p)), None)

    def _times_only(self, times: m.Times) -> m.Setattr | None:
        """The replicated inodes' times of an operation that is not shipped (on excluded paths)."""
        kept = [t for t in times if not self.exclude.excluded(t.path)]
        if not kept:
            return None
        first = kept[0]
        return m.Setattr(first.path, atime_ns=first.atime_ns, mtime_ns=first.mtime_ns, times=tuple(kept[1:]))

    async def _ship(self, msg: m.Message | None, ctx: pyfuse3.RequestContext | None = None) -> None:
        """Ship one operation and wait for its ack. `ctx`: the request this operation ends (its
        handler ships nothing after it); with the native data path the engine then holds the
        request's reply until the ack, and the handler goes on at once. An operation whose path is
        excluded ships only the times of the replicated inodes it changed."""
        if msg is not None and self.exclude and self.exclude.excluded(_destination(msg)):
            msg = self._times_only(getattr(msg, "times", ()))
        if msg is None:
            return
        if not self.enable_writeback_cache:
            reply = getattr(ctx, "unique", 0) if ctx is not None and self.tandem_engine else 0
            await self.sender.replicate(msg, reply)
            return
        fut = self.sender.submit(msg)
        if fut is not None:
            self._last = fut
            await self.sender.drain()

    async def _settled(self) -> None:
        """writeback: wait until the peer acknowledged every operation shipped so far (Python's), and
        has received the native data path's creates and unlinks answered before their acks."""
        if self._creates and pyfuse3.engine_early():
            await self.sender.barrier()
        await self.sender.wait(self._last)

    @passes_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        try:
            return await super().lookup(parent_inode, name, ctx)
        except pyfuse3.FUSEError as exc:
            if exc.errno != errno.ENOENT:
                raise
        # A cached negative entry: the kernel drops it itself when a create through this mount fills it.
        absent = pyfuse3.EntryAttributes()
        absent.st_ino, absent.entry_timeout = 0, self.timeout
        return absent

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        await super().forget(inode_list)
        for ino, _ in inode_list:
            if not self.inodes.known(ino):
                self._unsynced.pop(ino, None)
                self._no_caps.discard(ino)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if name != _CAPS:
            return await super().getxattr(inode, name, ctx)
        if inode in self._no_caps:
            raise pyfuse3.FUSEError(errno.ENODATA)
        try:
            return await super().getxattr(inode, name, ctx)
        except pyfuse3.FUSEError as exc:
            # Only this mount sets xattrs on the tree, and setxattr/removexattr forget the answer.
            if exc.errno == errno.ENODATA:
                self._no_caps.add(inode)
            raise

    @passes_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        inode, _ = self._dirs[fh]
        await self._sync(inode, None, datasync)

    # --- creating and removing entries ---------------------------------------------------------

    def _owner(self, parent: int, ctx: pyfuse3.RequestContext) -> tuple[int, int, bool]:
        pst = os.fstat(self.inodes.fd(parent))
        setgid = bool(pst.st_mode & stat.S_ISGID)
        return ctx.uid, (pst.st_gid if setgid else ctx.gid), setgid

    def _chown_chmod(self, parent: int, name: bytes, uid: int, gid: int, mode: int | None) -> None:
        pfd = self.inodes.fd(parent)
        os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)
        if mode is not None:
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
            try:
                os.chmod(syscalls.proc(fd), mode)
            finally:
                os.close(fd)

    async def _entered(
        self,
        parent: int,
        name: bytes,
        build: Callable[[bytes, os.stat_result], m.Message],
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        ino, st = self.inodes.learn(parent, name)
        path = self.inodes.entry_path(parent, name)
        if path is not None:
            msg = build(path, st)
            await self._ship(_with_times(msg, self._fix(ino, parent)), ctx)
        self._serve_entries_in(parent, *((ino,) if stat.S_ISDIR(st.st_mode) else ()))
        return self._attr(ino, st)

    @passes_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        uid, gid, setgid = self._owner(parent_inode, ctx)
        os.mkdir(name, 0o700, dir_fd=self.inodes.fd(parent_inode))
        perm = stat.S_IMODE(mode) | (stat.S_ISGID if setgid else 0)
        self._chown_chmod(parent_inode, name, uid, gid, perm)
        return await self._entered(
            parent_inode, name, lambda p, st: m.Mkdir(p, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid), ctx
        )

    @passes_errors
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        uid, gid, _ = self._owner(parent_inode, ctx)
        os.mknod(name, stat.S_IFMT(mode) | 0o600, rdev, dir_fd=self.inodes.fd(parent_inode))
        self._chown_chmod(parent_inode, name, uid, gid, stat.S_IMODE(mode))
        return await self._entered(
            parent_inode, name, lambda p, st: m.Mknod(p, st.st_mode, st.st_rdev, st.st_uid, st.st_gid), ctx
        )

    @passes_errors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        uid, gid, _ = self._owner(parent_inode, ctx)
        os.symlink(target, name, dir_fd=self.inodes.fd(parent_inode))
        self._chown_chmod(parent_inode, name, uid, gid, None)
        return await self._entered(parent_inode, name, lambda p, st: m.Symlink(p, target, st.st_uid, st.st_gid), ctx)

    @passes_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        uid, gid, _ = self._owner(parent_inode, ctx)
        open_flags = (self._readable(flags) & ~os.O_APPEND) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, open_flags, 0o600, dir_fd=self.inodes.fd(parent_inode))
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, stat.S_IMODE(mode))
            attr = await self._entered(
                parent_inode,
                name,
                lambda p, st: m.Create(p, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, flags),
                ctx,
            )
            # A file made with O_EXCL has no capability (none is ever inherited): the GETXATTR the
            # kernel sends before its first write is answered without Python.
            self._no_caps.add(attr.st_ino)
        except BaseException:
            os.close(fd)
            raise
        fh = self._handle(self._files, (fd, attr.st_ino))
        self._register(fh)
        return pyfuse3.FileInfo(fh=fh), attr

    @passes_errors
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        named, target = self.inodes.path(inode) is not None, self._path(inode)
        os.link(syscalls.proc(self.inodes.fd(inode)), new_name, dst_dir_fd=self.inodes.fd(new_parent_inode))
        if not named:
            return await self.lookup(new_parent_inode, new_name, ctx)
        if target is None:
            # Every name it had is excluded: a replicated new name gets a copy of its own there.
            ino, st = self.inodes.learn(new_parent_inode, new_name)
            path = self.inodes.entry_path(new_parent_inode, new_name)
            times = self._fix(ino, new_parent_inode)
            if path is not None and not self.exclude.excluded(path):
                await self._arrived(path, times)
            else:
                await self._ship(self._times_only(times), ctx)
            return self._attr(ino, st)
        return await self._entered(new_parent_inode, new_name, lambda p, st: m.Link(target, p), ctx)

    @passes_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._remove(parent_inode, name, ctx, rmdir=False)

    @passes_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._remove(parent_inode, name, ctx, rmdir=True)

    async def _remove(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext, *, rmdir: bool) -> None:
        ino = self.inodes.find(parent, name)
        path = self.inodes.entry_path(parent, name)
        (os.rmdir if rmdir else os.unlink)(name, dir_fd=self.inodes.fd(parent))
        self.inodes.unname(parent, name, ino)
        if path is not None and rmdir and self.exclude:
            # The secondary's copy may hold excluded entries of its own: they go with it.
            await self._ship(m.SyncRemove(path))
            await self._ship(self._times_only(self._fix(parent)), ctx)
        elif path is not None:
            msg: m.Message = m.Rmdir(path) if rmdir else m.Unlink(path)
            await self._ship(_with_times(msg, self._fix(parent)), ctx)
        self._serve_entries_in(parent)

    @passes_errors
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        old, new = (parent_inode_old, name_old), (parent_inode_new, name_new)
        src, dst = self.inodes.find(*old), self.inodes.find(*new)
        old_path, new_path = self.inodes.entry_path(*old), self.inodes.entry_path(*new)
        pold, pnew = self.inodes.fd(parent_inode_old), self.inodes.fd(parent_inode_new)
        if flags:
            syscalls.renameat2(pold, name_old, pnew, name_new, flags)
        else:
            os.rename(name_old, name_new, src_dir_fd=pold, dst_dir_fd=pnew)
        if flags & syscalls.RENAME_EXCHANGE:
            if dst is not None:
                self.inodes.rename(dst, new, old)
        else:
            self.inodes.unname(*new, dst)
        if src is not None:
            self.inodes.rename(src, old, new)
        if old_path is not None and new_path is not None:
            times = self._fix(parent_inode_old, parent_inode_new, src, dst)
            if self.exclude.excluded(old_path) == self.exclude.excluded(new_path):
                await self._ship(m.Rename(old_path, new_path, flags, times), ctx)
            elif flags & syscalls.RENAME_EXCHANGE or self.exclude.excluded(old_path):
                # The replicated one of the two paths now holds what was excluded.
                # The replicated one of the two paths now holds what was excluded (an exchange moves
                # the replicated content to the other).
                if self.exclude.excluded(new_path):
                    await self._arrived(old_path, times, moved=new_path)
                else:
                    await self._arrived(new_path, times, moved=old_path if flags & syscalls.RENAME_EXCHANGE else None)
            else:
                await self._departed(old_path, times, moved=new_path)
        self._serve_entries_in(parent_inode_old, parent_inode_new)

    # --- crossing the exclude boundary ---------------------------------------------------------

    async def _departed(self, path: bytes, times: m.Times, *, moved: bytes) -> None:
        """A replicated entry moved to an excluded path: it goes from the secondary (with its subtree)."""
        with self.sender.held():
            self._reregister(moved)
            last = self._submit(m.SyncRemove(path))
            last = self._submit(self._times_only(times)) or last
        await self._arrive(last)

    def _unserve_beneath(self, moved: bytes) -> None:
        """Replicated content moved to the excluded path `moved`: if it is a directory, F no longer
        creates in it nor beneath it by the paths they had (no Rename frame told the engine)."""
        with contextlib.suppress(OSError):
            if not stat.S_ISDIR(os.stat(moved, dir_fd=self.inodes.root_fd, follow_symlinks=False).st_mode):
                return
        prefix = moved + b"/"
        for ino in list(self.inodes.nodes):
            path = self.inodes.path(ino)
            beneath = path is not None and (path == moved or path.startswith(prefix))
            if beneath and stat.S_ISDIR(os.fstat(self.inodes.fd(ino)).st_mode):
                pyfuse3.engine_dir(ino, None)

    async def _arrived(self, path: bytes, times: m.Times, *, moved: bytes | None = None) -> None:
        """An excluded entry moved (or was linked) to a replicated path, which the secondary never had:
        its copy there is replaced by the entry whole, before the call returns. The native data path
        serves nothing meanwhile, so every live write to it comes here and ships after the part of
        the copy it changed. A live change beneath a directory being copied that reaches the
        secondary before its parent fails there, and the link resyncs (never a silent divergence)."""
        with self.sender.held():
            self._reregister(moved)
            last = self._submit(m.SyncRemove(path))
            try:
                with Beneath(self.inodes.root_fd).inode(path) as (fd, _):
                    last = await self._copy(fd, path) or last
            except (FileNotFoundError, NotADirectoryError, PathEscape):
                pass  # moved on meanwhile: its live Rename or Unlink follows
            except OSError as exc:
                # Done here already: the call succeeds, and the secondary is repaired by a resync.
                reason = f"copying {os.fsdecode(path)!r} to the secondary failed: {exc}"
                log.error("Replication error: %s; resyncing", reason)
                self.sender.drop(reason)
                return
            last = self._submit(self._times_only(times)) or last
        await self._arrive(last)

    def _reregister(self, moved: bytes | None) -> None:
        """Every open file by the path it has now, and no directory by a path now excluded (`moved`):
        a frame of the native data path never names a path whose content crossed the boundary."""
        for fh in list(self._files):
            self._register(fh)
        if moved is not None and self.native_creates:
            self._unserve_beneath(moved)

    def _submit(self, msg: m.Message | None) -> asyncio.Future[m.Message] | None:
        return self.sender.submit(msg) if msg is not None else None

    async def _arrive(self, last: asyncio.Future[m.Message] | None) -> None:
        """Wait until the secondary has every frame up to `last` (writeback: until flush or fsync)."""
        if self.enable_writeback_cache:
            if last is not None:
                self._last = last
            await self.sender.drain()
        else:
            await self.sender.wait(last)

    async def _copy(self, fd: int, path: bytes) -> asyncio.Future[m.Message] | None:
        """Ship the entry at O_PATH `fd` to `path` on the secondary, which lacks it; the last future."""
        local = listing.describe(fd, b"-")
        frames = fresh.whole(fd, path, local) if local.kind == stat.S_IFREG else None
        if frames is not None:
            last = None
            for frame in frames:
                last = self._submit(frame) or last
            return last
        last = self._submit(fresh.create(path, local))
        if local.kind == stat.S_IFREG:
            rfd = fresh.open_read(fd)
            try:
                # Each frame read and queued without yielding: a live write is either in it or after it.
                for frame in fresh.content(rfd, path):
                    last = self._submit(frame) or last
                    await self.sender.drain()
            finally:
                os.close(rfd)
        elif local.kind == stat.S_IFDIR:
            for name in listing.names_in(fd):
                child = fresh.join(path, name)
                if self.exclude.excluded(child):
                    continue
                try:
                    cfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except FileNotFoundError:
                    continue  # removed meanwhile: its live Unlink went out
                try:
                    last = await self._copy(cfd, child) or last
                finally:
                    os.close(cfd)
        for frame in fresh.attrs(path, fd, None, force=True):
            last = self._submit(frame) or last
        return last

    # --- attributes ----------------------------------------------------------------------------

    @passes_errors
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        fd = self.inodes.fd(inode)
        uid = attr.st_uid if fields.update_uid else None
        gid = attr.st_gid if fields.update_gid else None
        mode = stat.S_IMODE(attr.st_mode) if fields.update_mode else None
        size = attr.st_size if fields.update_size else None
        if uid is not None or gid is not None:
            os.chown(syscalls.proc(fd), -1 if uid is None else uid, -1 if gid is None else gid)
        if mode is not None:
            os.chmod(syscalls.proc(fd), mode)
        if size is not None:
            await self._kill_privs(inode, syscalls.proc(fd), getattr(fields, "kill_suidgid", False))
            self._truncate(fd, fh, size)
        atime, mtime = self._set_times(fd, attr, fields)
        await self._ship_if_named(
            inode, lambda path: m.Setattr(path, mode, uid, gid, size, atime, mtime, self._fix(inode)), ctx
        )
        return self._attr(inode, os.fstat(fd))

    def _truncate(self, fd: int, fh: int | None, size: int) -> None:
        if fh is not None and fh in self._files:
            os.ftruncate(self._files[fh][0], size)
            return
        wfd = os.open(syscalls.proc(fd), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(wfd, size)
        finally:
            os.close(wfd)

    @staticmethod
    def _set_times(
        fd: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields
    ) -> tuple[int | None, int | None]:
        if not (fields.update_atime or fields.update_mtime):
            return None, None
        st = os.fstat(fd)
        atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
        mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
        os.utime(syscalls.proc(fd), ns=(atime, mtime))
        return atime, mtime

    @passes_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._no_caps.discard(inode)
        os.setxattr(syscalls.proc(self.inodes.fd(inode)), name, value)
        await self._ship_if_named(inode, lambda path: m.Setxattr(path, name, 0, value), ctx)

    @passes_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._no_caps.discard(inode)
        os.removexattr(syscalls.proc(self.inodes.fd(inode)), name)
        await self._ship_if_named(inode, lambda path: m.Removexattr(path, name), ctx)

    # --- file data -----------------------------------------------------------------------------

    def _readable(self, flags: int) -> int:
        # With a writeback cache the kernel reads to fill partly written pages, even of write-only files.
        if self.enable_writeback_cache and flags & os.O_ACCMODE == os.O_WRONLY:
            return (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags

    async def _kill_privs(self, inode: int, target: int | str, suidgid: bool) -> None:
        """Before a write, truncate or fallocate, under HANDLE_KILLPRIV_V2: what the kernel left to us.

        The file capability goes whoever the caller is, as in the kernel's own file_remove_privs;
        S_ISUID and S_ISGID go when the kernel says the caller may not keep them (it lacks
        CAP_FSETID). Linux keeps S_ISGID of a file without group execute for a caller in the file's
        group; the kernel does not say who that is, so this drops it then too (the safe side).
        `target`: an open fd of the file, or its /proc path.
        """
        if not self._killpriv_granted():
            return
        if inode not in self._no_caps:
            try:
                os.removexattr(target, _CAPS)
            except OSError as exc:
                # ENODATA: none; EOPNOTSUPP: a file system without xattrs (ramfs), so none ever.
                if exc.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                    raise
            else:
                await self._ship_if_named(inode, lambda path: m.Removexattr(path, _CAPS))
            self._no_caps.add(inode)
        if not suidgid:
            return
        mode = os.stat(target).st_mode
        if mode & (stat.S_ISUID | stat.S_ISGID):
            perm = stat.S_IMODE(mode) & ~(stat.S_ISUID | stat.S_ISGID)
            os.chmod(target, perm)
            await self._ship_if_named(
                inode, lambda path: m.Setattr(path, perm, None, None, None, None, None, self._fix(inode))
            )

    async def _ship_if_named(
        self, inode: int, build: Callable[[bytes], m.Message], ctx: pyfuse3.RequestContext | None = None
    ) -> None:
        """Ship what `build` makes of the inode's path; nothing for an inode without a replicated name
        (unlinked, or excluded)."""
        path = self._path(inode)
        if path is not None:
            await self._ship(build(path), ctx)

    @passes_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        fd = self._open_fd(inode, self._readable(flags))
        if flags & os.O_TRUNC:
            try:
                await self._kill_privs(inode, fd, getattr(ctx, "kill_suidgid", False))
            except BaseException:
                os.close(fd)
                raise
            await self._ship_if_named(inode, lambda path: m.Truncate(path, 0, self._fix(inode)), ctx)
        fh = self._handle(self._files, (fd, inode))
        self._register(fh)
        return pyfuse3.FileInfo(fh=fh)

    def _killpriv_granted(self) -> bool:
        """Whether the kernel granted HANDLE_KILLPRIV_V2 (logged the first time it is seen)."""
        if not _killpriv_v2():
            return False
        if not self._killpriv_logged:
            self._killpriv_logged = True
            log.info("The kernel granted HANDLE_KILLPRIV_V2: no GETXATTR before writes; this mount drops capabilities")
        return True

    def _register(self, fh: int) -> None:
        """Tell the native data path an open file's fd and the path its frames name now."""
        self._killpriv_granted()
        if self.tandem_engine:
            fd, inode = self._files[fh]
            # An excluded file has no path there: its writes come to Python, which ships nothing.
            pyfuse3.engine_file(fh, fd, self._path(inode))

    @passes_errors
    async def write(self, fh: int, off: int, buf: bytes, kill_suidgid: bool = False) -> int:
        fd, inode = self._files[fh]
        await self._kill_privs(inode, fd, kill_suidgid)
        written = os.pwrite(fd, buf, off)
        self._unsynced[inode] = self._unsynced.get(inode, 0) + written
        if written >= syscalls.STREAM_WRITE_BYTES:
            syscalls.start_writeback(fd, off, written)
        await self._ship_if_named(inode, lambda path: m.Write(path, off, bytes(buf[:written]), self._fix(inode)))
        # The engine sent this write here: its path changed since it was registered (or the file
        # needed its privileges dropped, or a resync runs). The path it has from now on.
        self._register(fh)
        return written

    @passes_errors
    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on an open file (allocate, punch a hole, zero a range); needs Tandem's pyfuse3 patch."""
        fd, inode = self._files[fh]
        await self._kill_privs(inode, fd, False)
        syscalls.fallocate(fd, mode, offset, length)
        await self._ship_if_named(inode, lambda path: m.Fallocate(path, mode, offset, length, self._fix(inode)))

    async def flush(self, fh: int) -> None:
        # The kernel wrote the file's dirty pages back before this flush: once the peer acknowledged
        # what was shipped so far, the closed file (and its creation) is on both nodes.
        if not self.enable_writeback_cache:
            await super().flush(fh)
        await self._settled()

    @passes_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        fd, inode = self._files[fh]
        if self.tandem_engine:
            self._unsynced[inode] = self._unsynced.get(inode, 0) + pyfuse3.engine_unsynced(fh)
        await self._sync(inode, fd, datasync)

    async def _sync(self, inode: int, fd: int | None, datasync: bool) -> None:
        """fsync locally while the secondary does the same; return when both are durable."""
        path = self._path(inode)
        fut = self.sender.submit(m.Fsync(path, datasync)) if path is not None else None
        own = fd if fd is not None else os.open(syscalls.proc(self.inodes.fd(inode)), os.O_RDONLY | os.O_CLOEXEC)
        sync = os.fdatasync if datasync else os.fsync
        try:
            if self._unsynced.pop(inode, 0) < syscalls.INLINE_SYNC_BYTES:
                sync(own)
            else:
                await asyncio.to_thread(sync, own)
        finally:
            if fd is None:
                os.close(own)
        # The Fsync is answered after everything before it was applied: it covers what is in flight.
        await self.sender.wait(fut)


def _destination(msg: m.Message) -> bytes | None:
    """The path an operation changes (a Rename's new one, a Link's new name)."""
    return msg.new if isinstance(msg, m.Rename) else getattr(msg, "path", None)


def _with_times(msg: m.Message, times: m.Times) -> m.Message:
    return dataclasses.replace(msg, times=times)  # type: ignore[call-arg]
