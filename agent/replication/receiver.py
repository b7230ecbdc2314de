"""The secondary's end of a replication stream: handshake, ordered apply, acks per mode, disconnects."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import errno
import logging
import os
from collections.abc import Callable

import pyfuse3

from agent.replication import engine
from agent.replication import messages as m
from agent.replication.applier import Applier
from agent.replication.beneath import PathEscape
from agent.replication.connection import PEER_TIMEOUT, FrameConnection
from agent.replication.dirty import Dirty
from agent.replication.events import Events, NoEvents
from agent.replication.handshake import server_handshake
from agent.replication.wire import Frame, ProtocolError

log = logging.getLogger(__name__)
QUEUE_FRAMES = 512
# An fsync that fails with one of these met the disk itself (not a missing file).
DISK_ERRORS = frozenset({errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.EROFS})


class AckMode(enum.StrEnum):
    """When the secondary acknowledges an operation (an fsync is always acked after the fsync)."""

    RECEIVED = "received"
    # Acked once applied and flushed to this node's disk: the frames applied together share one flush.
    DURABLE = "durable"
    # The primary's writeback cache holds writes until flush/fsync/close; the secondary acks as in
    # `received` and the primary waits for those acks at each flush and fsync.
    FSYNC = "fsync"


class Receiver:
    """Serves replication connections for one Applier, one at a time, in the ack mode the primary asks."""

    def __init__(
        self,
        applier: Applier,
        *,
        node: str,
        secret: bytes | None,
        events: Events | None = None,
        traffic: Callable[[], None] | None = None,
        peer_timeout: float = PEER_TIMEOUT,
        native: bool = False,
    ) -> None:
        self.applier = applier
        # Streams go to the native data path, which applies the Write, Fsync, Create, Unlink and
        # times-only Setattr frames it can (tandem_receiver.c).
        self.native = native and engine.receiver_available()
        self._handed = False
        self.traffic = traffic
        # A silent primary host ends its session after this long (connection.bound_silence), so
        # that the next connection, once it is back, is not left waiting behind a dead one.
        self.peer_timeout = peer_timeout
        self.node = node
        self.secret = secret
        self.events = events if events is not None else NoEvents()
        self.mode = AckMode.DURABLE
        self.syncing = False
        self.in_sync = False
        self._connected = False
        self._lock = asyncio.Lock()
        self._conns: set[FrameConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # `durable`: answers of applied frames, sent once what they changed is on disk.
        self._unflushed: list[Frame] = []
        # This session's first failure to put changes on disk (a flush, or an fsync that met a disk
        # error): every later flush and fsync answers with it. An fsync reports a writeback error
        # once, so a later one may succeed although earlier data never reached the disk.
        self._disk_error: m.Ack | None = None

    def connection(self) -> FrameConnection:
        """A protocol for one accepted connection (`loop.create_server(receiver.connection, ...)`)."""
        return FrameConnection(opened=self._opened, traffic=self.traffic, silence=self.peer_timeout)

    def _opened(self, conn: FrameConnection) -> None:
        task = asyncio.create_task(self.serve(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def serve(self, conn: FrameConnection) -> None:
        """Run one connection to its end; any protocol violation closes it with a logged reason."""
        peername = conn.peername
        self._conns.add(conn)
        async with self._lock:
            try:
                await self._session(conn, peername)
            except (ProtocolError, PathEscape) as exc:
                log.error("Disconnecting replication peer %s: reason=%s", peername, exc)
            except (ConnectionError, TimeoutError) as exc:
                log.warning("Replication connection from %s lost: %s", peername, exc)
            finally:
                if self._connected:
                    self.events.peer("disconnected", wasInSync=self.in_sync)
                self._connected = self.syncing = self.in_sync = False
                self._conns.discard(conn)
                self.applier.close()
                conn.close()
                await conn.wait_closed()

    async def close(self) -> None:
        """End every connection at a frame boundary and wait until the applier is idle."""
        for conn in list(self._conns):
            conn.close()
        async with self._lock:
            pass
        if self._tasks:
            await asyncio.wait(list(self._tasks))

    async def _session(self, conn: FrameConnection, peername: object) -> None:
        peer = await server_handshake(conn, self.node, self.secret, self.applier.applied_for)
        if not peer.authenticated:
            log.warning("Replication peer %s (node=%s) is unauthenticated: no shared secret", peername, peer.node)
        self.mode = AckMode(peer.ack)
        self.applier.begin(peer.stream)
        self.applier.record_changes(self.mode is AckMode.DURABLE)
        self._unflushed = []
        self._disk_error = None
        self._connected = True
        self.events.peer("connected")
        log.info("Replication stream open: peer=%s applied_seq=%d mode=%s", peer.node, peer.applied_seq, self.mode)
        if self.native:
            handed = await engine.adopt_receiver(
                conn,
                self.applier.beneath.root_fd,
                self.traffic,
                self.peer_timeout,
                durable=self.mode is AckMode.DURABLE,
            )
            self._conns.add(handed)
            self._handed = True
            try:
                await self._stream(handed)
            finally:
                self._native_disk_error()
                self._handed = False
                self._conns.discard(handed)
                handed.close()
                await handed.wait_closed()
            return
        await self._stream(conn)

    async def _stream(self, conn: FrameConnection) -> None:
        """Receive, apply and answer the session's frames until the stream ends."""
        stream = _Stream(
            conn,
            self.mode,
            self.applier.applied_seq,
            lambda frame: self._apply_now(conn, frame),
            lambda: bool(self._unflushed),
            self._native_progress if self._handed else None,
        )
        conn.deliver(stream.received, stream.ended, stream.apply_received)
        # Whatever ends the connection, frames already received (and, in `received` mode,
        # acknowledged) are applied: the ack promised they would be. The end comes after them.
        while (frame := await stream.next()) is not None or self._unflushed:
            if frame is None:
                await self._flush(conn)
                continue
            await self._apply(conn, frame)
            stream.applied()
        if stream.end is not None:
            raise stream.end

    def _native_progress(self) -> int:
        """The native data path's part of the stream: the last frame it applied (0: none yet); the
        applier then counts it applied, with the bytes it wrote."""
        handled = int(pyfuse3.receiver_handled())
        self.applier.applied_by_others(handled, int(pyfuse3.receiver_unsynced()))
        self._native_disk_error()
        return handled

    def _native_disk_error(self) -> None:
        """An fsync the native data path applied met a disk error: this session keeps it (_synced)."""
        err, seq, text = pyfuse3.receiver_disk_error()
        if err and self._disk_error is None:
            log.error(
                "Replication error: the native data path's sync of seq %d failed: %s; no later sync is acknowledged",
                seq,
                text,
            )
            self._disk_error = m.Ack(err, f"an fsync failed: {os.strerror(err)}")

    async def _apply(self, conn: FrameConnection, frame: Frame) -> None:
        if self._handed:
            self._native_progress()
        if self.applier.blocking(frame.msg):
            answer = await asyncio.to_thread(self.applier.apply, frame)
        else:
            answer = self.applier.apply(frame)
        self._settle(conn, frame, answer)
        with contextlib.suppress(ConnectionError):
            await conn.drain()

    def _apply_now(self, conn: FrameConnection, frame: Frame) -> bool:
        """Apply a frame in the turn that received it, when nothing is ahead of it; False: queue it."""
        if self._handed:
            self._native_progress()
        if self.applier.blocking(frame.msg) or conn.writing_paused:
            return False
        try:
            answer = self.applier.apply(frame)
        except PathEscape as exc:
            raise ProtocolError(str(exc)) from exc
        self._settle(conn, frame, answer)
        return True

    def _settle(self, conn: FrameConnection, frame: Frame, answer: m.Message) -> None:
        """Log, answer and track one applied frame; the answer is queued on the transport."""
        if isinstance(frame.msg, m.Fsync) and isinstance(answer, m.Ack):
            answer = self._synced(frame, answer)
        failed = isinstance(answer, m.Ack) and bool(answer.status)
        if failed and isinstance(answer, m.Ack):
            self._failed(frame, answer)
        if self.mode is AckMode.DURABLE:
            self._unflushed.append(Frame(frame.seq, answer))
        elif frame.msg.AFTER_APPLY:
            self._answer(conn, Frame(frame.seq, answer))
        elif failed and isinstance(answer, m.Ack):
            self._answer(conn, Frame(frame.seq, m.Fault(answer.status, answer.message)))
        if not failed:
            self._track(frame.msg)
        if self._handed and self.mode is not AckMode.DURABLE:
            # Last, once a disk error it met is kept: the native data path may apply the frames after it.
            pyfuse3.receiver_applied()

    def _synced(self, frame: Frame, answer: m.Ack) -> m.Ack:
        """The answer to an applied Fsync: the session's disk error once there was one."""
        if self._disk_error is not None:
            return answer if answer.status else self._disk_error
        if answer.status in DISK_ERRORS:
            log.error(
                "Replication error: fsync of seq %d failed: %s; no later sync is acknowledged",
                frame.seq,
                answer.message,
            )
            self._keep_disk_error(m.Ack(answer.status, f"an fsync failed: {os.strerror(answer.status)}"))
        return answer

    def _keep_disk_error(self, failed: m.Ack) -> None:
        """A sync failed: every later sync of the session is answered with this (the fsyncgate rule),
        whoever applies it; the native data path then passes every frame to Python."""
        self._disk_error = failed
        if self._handed:
            pyfuse3.receiver_fail(failed.status, failed.message)

    async def _flush(self, conn: FrameConnection) -> None:
        """`durable`: put on disk what the frames applied since the last flush changed, then answer them.

        Every frame applied while nothing else was queued shares this flush (group commit); a large
        one runs in a thread while frames go on arriving and being applied, into the next batch.
        After a failed flush none is tried again in this session: every answer carries that failure.
        """
        answers, self._unflushed = self._unflushed, []
        large = self.applier.long_sync()
        dirty = self.applier.take_dirty()
        if self._disk_error is not None:
            dirty.discard()
        else:
            failure = await asyncio.to_thread(_flushed, dirty) if large else _flushed(dirty)
            if failure is not None:
                code = failure.errno or errno.EIO
                log.error(
                    "Replication error: flushing seq %d-%d to disk failed: %s; no later frame is acknowledged",
                    answers[0].seq,
                    answers[-1].seq,
                    failure,
                )
                self.in_sync = False
                self._keep_disk_error(m.Ack(code, f"flushing to disk: {os.strerror(code)}"))
        if self._disk_error is not None:
            failed = self._disk_error
            answers = [Frame(a.seq, failed) if isinstance(a.msg, m.Ack) and not a.msg.status else a for a in answers]
        for answer in answers:
            self._answer(conn, answer)
        if self._handed:
            # On disk now: the native data path may apply and acknowledge the frames after them.
            pyfuse3.receiver_applied(len(answers))
        with contextlib.suppress(ConnectionError):
            await conn.drain()

    def _failed(self, frame: Frame, ack: m.Ack) -> None:
        # During a resync a live operation may reach a part of the tree not copied yet; the primary
        # repairs it. Outside a resync any failure means this copy diverged.
        if self.syncing:
            log.info("Resync: seq=%d failed before its part of the tree was copied: %s", frame.seq, ack.message)
            return
        log.error("Replication error applying seq=%d: %s (errno %d)", frame.seq, ack.message, ack.status)
        self.in_sync = False

    def _track(self, msg: m.Message) -> None:
        if isinstance(msg, m.SyncBegin):
            self.syncing, self.in_sync = True, False
            self.events.peer("syncing")
        elif isinstance(msg, m.SyncEnd):
            self.syncing, self.in_sync = False, True
            self.events.peer("in-sync")
            log.info("Resync complete: this copy equals the primary's tree")

    @staticmethod
    def _answer(conn: FrameConnection, frame: Frame) -> None:
        # Once the primary is gone its acks have no reader; the applier keeps applying what arrived.
        if not conn.is_closing():
            conn.send_nowait(frame)


def _flushed(dirty: Dirty) -> OSError | None:
    try:
        dirty.flush()
    except OSError as exc:
        return exc
    return None


class _Stream:
    """The receiving half of one session: checks order, acks on receipt when the mode says so, queues.

    `received` runs in the event-loop turn that read the bytes, so an ack leaves without a task switch,
    and before any frame of the chunk is applied: the primary's wait does not include the apply. Then,
    still in that turn, `apply_received` applies the queued frames (`apply_now`) until one would block.
    The queue is bounded by pausing the socket, which the primary feels as TCP backpressure. On the
    native data path's stream (`native`) that path acknowledged on receipt most frames after the
    first (`receiver_acked` says which), and its own buffer ahead of this socket is bounded too.
    """

    def __init__(
        self,
        conn: FrameConnection,
        mode: AckMode,
        applied_seq: int,
        apply_now: Callable[[Frame], bool],
        flush_due: Callable[[], bool],
        native: Callable[[], int] | None = None,
    ) -> None:
        self.conn = conn
        # The native data path's last applied frame: the stream goes on after it.
        self.native = native
        self.mode = mode
        self.applied_seq = applied_seq
        self.apply_now = apply_now
        self.flush_due = flush_due
        self._applying = False
        self.end: BaseException | None = None
        self._expected: int | None = None
        self._queue: collections.deque[Frame] = collections.deque()
        self._ended = False
        self._paused = False
        self._arrived = asyncio.Event()

    def received(self, frame: Frame) -> None:
        if type(frame.msg) is m.Ping:
            # Outside the sequence and ahead of everything queued: the primary's proof that we read.
            if frame.seq != 0:
                raise ProtocolError(f"Ping with sequence number {frame.seq}: a ping carries 0")
            self.conn.send_nowait(Frame(0, m.Pong(frame.msg.n)))
            return
        if not frame.msg.OPERATION:
            raise ProtocolError(f"{type(frame.msg).__name__} is not an operation (seq {frame.seq})")
        if self.native is not None and self._expected is not None:
            self._expected = max(self._expected, self.native() + 1)
        first = self._expected is None
        if first:
            if not 1 <= frame.seq <= self.applied_seq + 1:
                raise ProtocolError(f"stream resumes at seq {frame.seq}, applied {self.applied_seq}")
        elif frame.seq != self._expected:
            raise ProtocolError(f"sequence number {frame.seq} where {self._expected} was due")
        self._expected = frame.seq + 1
        # Queued before the ack, so an acknowledged frame is always applied, even if the link dies now.
        self._queue.append(frame)
        # The native data path may have acknowledged it on receipt already (never the session's first).
        if (
            self.mode is not AckMode.DURABLE
            and not frame.msg.AFTER_APPLY
            and (self.native is None or first or not pyfuse3.receiver_acked(frame.seq))
        ):
            self.conn.send_nowait(Frame(frame.seq, m.Ack()))
        if len(self._queue) >= QUEUE_FRAMES and not self._paused:
            self._paused = True
            self.conn.pause_reading()

    def apply_received(self) -> None:
        """Apply queued frames in this turn while nothing is being applied and the next one would not block."""
        try:
            while self._queue and not self._applying and self.apply_now(self._queue[0]):
                self._queue.popleft()
        except ProtocolError:
            # Nothing after a refused frame is applied, as when the apply loop meets it.
            self._queue.clear()
            raise
        self._resume_if_drained()
        if self._queue or self.flush_due():
            self._arrived.set()

    def ended(self, why: BaseException | None) -> None:
        self._ended, self.end = True, why
        self._arrived.set()

    async def next(self) -> Frame | None:
        """The next frame to apply; None when nothing is queued and applied frames wait for a flush, or
        the connection ended and every frame was handed out."""
        while not self._queue:
            if self._ended or self.flush_due():
                return None
            self._arrived.clear()
            await self._arrived.wait()
        self._resume_if_drained()
        self._applying = True
        return self._queue.popleft()

    def _resume_if_drained(self) -> None:
        if self._paused and len(self._queue) <= QUEUE_FRAMES // 2:
            self._paused = False
            self.conn.resume_reading()

    def applied(self) -> None:
        """The frame last handed out by next() is applied and answered."""
        self._applying = False
