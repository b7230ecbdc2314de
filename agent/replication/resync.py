"""The primary's online resync: makes the secondary's tree equal to its own while live writes flow."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
from dataclasses import dataclass, field

from agent.replication import blocks, fresh, listing, syscalls
from agent.replication import messages as m
from agent.replication.beneath import Beneath, PathEscape
from agent.replication.events import Events
from agent.replication.exclude import NOTHING, Exclude
from agent.replication.fresh import CHUNK, join, open_read
from agent.replication.listing import Entry
from agent.replication.sender import Sender

log = logging.getLogger(__name__)
# Errors that a second pass cannot repair: the secondary cannot hold the copy.
FATAL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG, errno.ENOMEM})
ROUNDS = 20
# A fresh file larger than fresh.SMALL is read READ bytes per thread hop and sent in Write frames
# of fresh.CHUNK bytes.
READ = 4 * 1024 * 1024
YIELD_EVERY = 64
_PUNCH = syscalls.FALLOC_FL_PUNCH_HOLE | syscalls.FALLOC_FL_KEEP_SIZE
_DESTINATIONS = (m.Rename, m.Link)


class ResyncError(Exception):
    """The resync cannot complete (the secondary failed a change, or the tree never settles)."""


@dataclass
class Touch:
    """Live writes to a file while its blocks are being compared."""

    whole: bool = False
    blocks: set[int] = field(default_factory=set)
    count: int = 0


@dataclass
class Stats:
    """What one resync did."""

    files: int = 0
    data_bytes: int = 0
    wire_bytes: int = 0
    rounds: int = 0


def parent_of(path: bytes) -> bytes:
    """The root-relative parent path (the root's parent is the root)."""
    return path.rpartition(b"/")[0]


def paths_of(msg: m.Message) -> tuple[bytes, ...]:
    """Every path an operation names."""
    return tuple(getattr(msg, f) for f in ("path", "old", "new", "target") if isinstance(getattr(msg, f, None), bytes))


def _same_kind(local: Entry, remote: Entry) -> bool:
    if local.kind != remote.kind:
        return False
    if local.kind == stat.S_IFLNK:
        return local.target == remote.target
    if local.kind in (stat.S_IFCHR, stat.S_IFBLK):
        return local.rdev == remote.rdev
    return True


class Resync:
    """One resync over the current stream; run() returns when the secondary's tree equals ours
    (outside the excluded paths, which it neither sends nor removes on the secondary)."""

    def __init__(self, root_fd: int, sender: Sender, events: Events, exclude: Exclude = NOTHING) -> None:
        self.exclude = exclude
        self.beneath = Beneath(root_fd)
        self.root_fd = root_fd
        self.sender = sender
        self.events = events
        self.stats = Stats()
        self.recheck: set[bytes] = set()
        self.touched: dict[bytes, Touch] = {}
        self.paths: dict[int, tuple[bytes, ...]] = {}
        self.links: dict[int, tuple[bytes, int | None]] = {}
        self.fatal: str | None = None
        self.remaining_files = 0
        self.remaining_bytes = 0

    async def run(self) -> Stats:
        """Compare and repair the whole tree, then repair what live changes raced with, until settled."""
        self.sender.observer, self.sender.on_error = self._observe, self._error
        start_bytes = self.sender.sent_bytes
        try:
            # First on the stream, before anything yields: a live change can never arrive at a
            # secondary that does not know yet that its tree is being repaired.
            self._send(m.SyncBegin())
            self.remaining_files, self.remaining_bytes = await asyncio.to_thread(self._count)
            self.events.progress(self.remaining_bytes, self.remaining_files, force=True)
            roots = [b""]
            for self.stats.rounds in range(1, ROUNDS + 1):
                for root in roots:
                    await self._sync_tree(root)
                await self._barrier(m.SyncMark())
                if not self.recheck:
                    await self._barrier(m.SyncEnd())
                    if not self.recheck:
                        break
                    self._send(m.SyncBegin())
                roots, self.recheck = self._roots(), set()
            else:
                raise ResyncError(f"the tree kept changing for {ROUNDS} rounds")
            self.sender.resynced()
        finally:
            self.sender.observer = self.sender.on_error = None
        self.stats.wire_bytes = self.sender.sent_bytes - start_bytes
        return self.stats

    # --- bookkeeping -----------------------------------------------------------------------------

    def _count(self) -> tuple[int, int]:
        files = size = 0
        for top, dirs, names, dir_fd in os.fwalk(b".", dir_fd=self.root_fd):
            if self.exclude:
                rel = top[2:]  # b"./a/b" -> b"a/b"
                dirs[:] = [d for d in dirs if not self.exclude.excluded(join(rel, d))]
                names = [n for n in names if not self.exclude.excluded(join(rel, n))]
            for name in names:
                with contextlib.suppress(OSError):
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode):
                        files, size = files + 1, size + st.st_size
        return files, size

    def _observe(self, msg: m.Message) -> None:
        """A live operation is about to be sent: note what it may have raced with."""
        if self.sender.connected:
            self.paths[self.sender.seq + 1] = paths_of(msg)
        if isinstance(msg, _DESTINATIONS):
            self.recheck.add(parent_of(msg.path if isinstance(msg, m.Link) else msg.new))
        for path in paths_of(msg):
            touch = self.touched.get(path)
            if touch is None:
                continue
            touch.count += 1
            if isinstance(msg, m.Write) and msg.data:
                first, last = msg.offset // blocks.BLOCK, (msg.offset + len(msg.data) - 1) // blocks.BLOCK
                touch.blocks.update(range(first, last + 1))
            elif not isinstance(msg, (m.Write, m.Fsync, m.Setxattr, m.Removexattr)):
                touch.whole = True

    def _error(self, seq: int, status: int, message: str) -> None:
        """The secondary failed a frame sent during the resync."""
        if status in FATAL:
            self.fatal = self.fatal or f"{message} (errno {status})"
            return
        paths = self.paths.get(seq, ())
        log.info("Resync: seq=%d raced with a live change (%s); rechecking %r", seq, message, paths)
        self.recheck.update(parent_of(p) for p in paths)
        if not paths:
            self.recheck.add(b"")

    def _send(self, msg: m.Message) -> asyncio.Future[m.Message]:
        fut = self.sender.send(msg)
        if fut is None:
            raise ConnectionError(self.sender.lost_reason or "replication stream lost")
        self.paths[self.sender.seq] = paths_of(msg)
        return fut

    async def _barrier(self, msg: m.Message) -> None:
        fut = self._send(msg)
        seq = self.sender.seq
        await fut
        self._check()
        for done in [s for s in self.paths if s <= seq]:
            del self.paths[done]

    def _check(self) -> None:
        if self.fatal is not None:
            raise ResyncError(f"the secondary failed a change: {self.fatal}")
        if not self.sender.connected:
            raise ConnectionError(self.sender.lost_reason or "replication stream lost")

    def _roots(self) -> list[bytes]:
        found: set[bytes] = set()
        for path in self.recheck:
            while path and not self._is_dir(path):
                path = parent_of(path)
            found.add(path)
        roots: list[bytes] = []
        for path in sorted(found, key=len):
            if not any(r == b"" or path == r or path.startswith(r + b"/") for r in roots):
                roots.append(path)
        return roots

    def _is_dir(self, path: bytes) -> bool:
        try:
            with self.beneath.inode(path) as (_, st):
                return stat.S_ISDIR(st.st_mode)
        except (OSError, PathEscape):
            return False

    # --- namespace -------------------------------------------------------------------------------

    async def _sync_tree(self, path: bytes) -> None:
        if self.exclude.excluded(path):
            return
        try:
            with self.beneath.inode(path) as (fd, st):
                if not stat.S_ISDIR(st.st_mode):
                    self.recheck.add(parent_of(path))
                    return
                await self._sync_dir(path, fd)
                self._send_attrs(path, fd, None, force=True)
        except (FileNotFoundError, NotADirectoryError, PathEscape):
            if path:
                self.recheck.add(parent_of(path))

    async def _sync_dir(self, path: bytes, fd: int, *, empty: bool = False) -> None:
        names = [n for n in listing.names_in(fd) if not self.exclude.excluded(join(path, n))]
        if empty:  # a directory the secondary just created is empty: nothing to ask
            await self._sync_names(path, fd, names, {})
            return
        # Watched from before the question: the checksums in the answer are as of that point of the stream.
        watched = [p for p in (join(path, n) for n in names) if p not in self.touched]
        self.touched.update((p, Touch()) for p in watched)
        try:
            answer = await self._send(m.SyncDirSums(path))
            if not isinstance(answer, m.Listing):
                return  # the error handler queued a recheck of the parent
            await self._sync_names(path, fd, names, listing.decode(answer.entries, with_sums=True))
        finally:
            for p in watched:
                self.touched.pop(p, None)

    async def _sync_names(self, path: bytes, fd: int, names: list[bytes], remote: dict[bytes, Entry]) -> None:
        present = set(names)
        # The secondary's own excluded entries stay as they are.
        theirs = {n for n in remote if not self.exclude.excluded(join(path, n))}
        for name in sorted(theirs - present):
            with contextlib.suppress(FileNotFoundError):
                os.stat(name, dir_fd=fd, follow_symlinks=False)
                continue  # created meanwhile: the live Create already reached the secondary
            self._send(m.SyncRemove(join(path, name)))
        for i, name in enumerate(names, 1):
            await self._sync_entry(fd, path, name, remote.get(name))
            await self.sender.drain()
            self._check()
            if i % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # let FUSE handlers and the ack reader run

    async def _sync_entry(self, dir_fd: int, parent: bytes, name: bytes, remote: Entry | None) -> None:
        path = join(parent, name)
        try:
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except FileNotFoundError:
            return  # removed meanwhile; the live Unlink or Rename went out in order
        try:
            await self._sync_inode(fd, path, remote)
        except (FileNotFoundError, NotADirectoryError, PathEscape):
            self.recheck.add(parent)  # a live change moved it under us
        finally:
            os.close(fd)

    async def _sync_inode(self, fd: int, path: bytes, remote: Entry | None) -> None:
        local = listing.describe(fd, b"-")
        if remote is not None and (not _same_kind(local, remote) or self._shares_wrongly(local, remote)):
            self._send(m.SyncRemove(path))
            remote = None
        if self._linked(local, path, remote):
            return
        if local.kind == stat.S_IFREG and remote is None and self._send_whole(fd, path, local):
            self._done_file(local)
            return
        if remote is None:
            self._create(path, local)
        sent = self.sender.seq
        if local.kind == stat.S_IFREG:
            await self._sync_content(fd, path, remote)
            self._done_file(local)
        elif local.kind == stat.S_IFDIR:
            await self._sync_dir(path, fd, empty=remote is None)
        # Our writes (or the directory's children) moved the secondary's mtime: then times always go.
        # A file nothing was sent for (not even a live frame) kept its mtime: compare, as for others.
        wrote = remote is None or self.sender.seq != sent
        self._send_attrs(path, fd, remote, force=local.kind == stat.S_IFDIR or (local.kind == stat.S_IFREG and wrote))

    def _done_file(self, local: Entry) -> None:
        self.remaining_files -= 1
        self.remaining_bytes -= local.size
        self.stats.files += 1
        self.events.progress(self.remaining_bytes, self.remaining_files)

    def _send_whole(self, pfd: int, path: bytes, local: Entry) -> bool:
        """A small file the secondary lacks, without holes: content, owner, mode, times in one SyncFile."""
        frames = fresh.whole(pfd, path, local)
        if frames is None:
            return False
        # Read and queued without yielding: no live change to this file can slip in between.
        for frame in frames:
            self._send(frame)
        self.stats.data_bytes += sum(len(f.data) for f in frames if isinstance(f, m.SyncFile))
        return True

    @staticmethod
    def _shares_wrongly(local: Entry, remote: Entry) -> bool:
        # The secondary's inode has other names while ours has one: writing it would change them too.
        return local.kind != stat.S_IFDIR and local.nlink == 1 and remote.nlink > 1

    def _linked(self, local: Entry, path: bytes, remote: Entry | None) -> bool:
        """Hard links: the first name of an inode is synced, every later name is linked to it."""
        if local.kind == stat.S_IFDIR or local.nlink < 2:
            return False
        first = self.links.get(local.ino)
        if first is None or first[0] == path:
            self.links[local.ino] = (path, remote.ino if remote is not None else None)
            return False
        if remote is None or first[1] is None or remote.ino != first[1]:
            if remote is not None:
                self._send(m.SyncRemove(path))
            self._send(m.Link(first[0], path))
        return True

    def _create(self, path: bytes, e: Entry) -> None:
        self._send(fresh.create(path, e))

    def _send_attrs(self, path: bytes, fd: int, remote: Entry | None, *, force: bool) -> None:
        """Owner, mode, times and xattrs as ours are now; skipped when the secondary's already match."""
        for frame in fresh.attrs(path, fd, remote, force=force):
            self._send(frame)

    # --- content ---------------------------------------------------------------------------------

    async def _sync_content(self, pfd: int, path: bytes, remote: Entry | None) -> None:
        fd = open_read(pfd)
        watched = self.touched.get(path) if remote is not None and remote.sums is not None else None
        touch = self.touched[path] = watched or Touch()
        try:
            if remote is None:
                await self._send_fresh(fd, path, touch)
                return
            if remote.sums is not None:  # from the directory's answer, watched since it was asked
                if os.fstat(fd).st_size <= listing.SUMS_MAX:
                    _, local = blocks.file_digests(fd)
                else:
                    _, local = await asyncio.to_thread(blocks.file_digests, fd)
                await self._send_blocks(fd, path, touch, local, blocks.unpack(remote.sums), remote.size)
                return
            asked = self._send(m.SyncSums(path))
            _, local = await asyncio.to_thread(blocks.file_digests, fd)
            answer = await asked
            if not isinstance(answer, m.Sums):
                return  # the error handler queued a recheck
            await self._send_blocks(fd, path, touch, local, blocks.unpack(answer.digests), answer.size)
        finally:
            self.touched.pop(path, None)
            os.close(fd)

    async def _send_fresh(self, fd: int, path: bytes, touch: Touch) -> None:
        """A file the secondary just created empty: its data segments in large reads, no checksums."""
        size = os.fstat(fd).st_size
        if size:
            self._send(m.Truncate(path, size))
        seen = touch.count
        for a, b in blocks.data_ranges(fd, size):
            for pos in range(a, b, READ):
                data = await asyncio.to_thread(os.pread, fd, min(READ, b - pos), pos)
                if touch.count != seen:
                    # A live change raced with the read: the rest goes block by block, each read and
                    # queued without yielding, with the holes as they are now.
                    await self._send_rest(fd, path, pos // blocks.BLOCK)
                    return
                for off in range(0, len(data), CHUNK):
                    self._send(m.Write(path, pos + off, data[off : off + CHUNK]))
                self.stats.data_bytes += len(data)
                await self.sender.drain()
                self._check()

    async def _send_rest(self, fd: int, path: bytes, first: int) -> None:
        for k in range(first, (os.fstat(fd).st_size + blocks.BLOCK - 1) // blocks.BLOCK):
            self._send_block(fd, path, k)
            await self.sender.drain()
            self._check()

    async def _send_blocks(
        self, fd: int, path: bytes, touch: Touch, local: list[int], remote: list[int], remote_size: int
    ) -> None:
        size = os.fstat(fd).st_size
        if size != remote_size:
            self._send(m.Truncate(path, size))
        for k in range((size + blocks.BLOCK - 1) // blocks.BLOCK):
            theirs = remote[k] if k < len(remote) else blocks.HOLE
            if touch.whole or k in touch.blocks or k >= len(local) or local[k] != theirs:
                # Read and queued without yielding: no live write to this file can slip in between.
                self._send_block(fd, path, k)
                await self.sender.drain()
                self._check()

    def _send_block(self, fd: int, path: bytes, k: int) -> None:
        start, size = k * blocks.BLOCK, os.fstat(fd).st_size
        if start >= size:
            return
        end = min(start + blocks.BLOCK, size)
        segs = blocks.data_ranges(fd, end, start)
        if segs != [(start, end)]:
            self._send(m.Fallocate(path, _PUNCH, start, end - start))
        for a, b in segs:
            data = os.pread(fd, b - a, a)
            self._send(m.Write(path, a, data))
            self.stats.data_bytes += len(data)
