"""The secondary's end of a replication stream: handshake, ordered apply, acks per mode, disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging

from agent.replication import messages as m
from agent.replication.applier import Applier
from agent.replication.beneath import PathEscape
from agent.replication.events import Events, NoEvents
from agent.replication.handshake import server_handshake
from agent.replication.wire import Frame, FrameReader, FrameWriter, ProtocolError

log = logging.getLogger(__name__)
QUEUE_FRAMES = 512


class AckMode(enum.StrEnum):
    """When the secondary acknowledges an operation (an fsync is always acked after the fsync)."""

    RECEIVED = "received"
    DURABLE = "durable"
    # The primary's writeback cache holds writes until flush/fsync/close; the secondary acks as in
    # `received` and the primary waits for those acks at each flush and fsync.
    FSYNC = "fsync"


class Receiver:
    """Serves replication connections for one Applier, one at a time, in the ack mode the primary asks."""

    def __init__(self, applier: Applier, *, node: str, secret: bytes | None, events: Events | None = None) -> None:
        self.applier = applier
        self.node = node
        self.secret = secret
        self.events = events if events is not None else NoEvents()
        self.mode = AckMode.DURABLE
        self.syncing = False
        self.in_sync = False
        self._connected = False
        self._lock = asyncio.Lock()
        self._writers: set[asyncio.StreamWriter] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Run one connection to its end; any protocol violation closes it with a logged reason."""
        peername = writer.get_extra_info("peername")
        self._writers.add(writer)
        async with self._lock:
            try:
                await self._session(FrameReader(reader), FrameWriter(writer), peername)
            except* (ProtocolError, PathEscape) as group:
                for exc in group.exceptions:
                    log.error("Disconnecting replication peer %s: reason=%s", peername, exc)
            except* (ConnectionError, TimeoutError) as group:
                log.warning("Replication connection from %s lost: %s", peername, group.exceptions[0])
            finally:
                if self._connected:
                    self.events.peer("disconnected", wasInSync=self.in_sync)
                self._connected = self.syncing = self.in_sync = False
                self._writers.discard(writer)
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()

    async def close(self) -> None:
        """End every connection at a frame boundary and wait until the applier is idle."""
        for writer in list(self._writers):
            writer.close()
        async with self._lock:
            pass

    async def _session(self, reader: FrameReader, writer: FrameWriter, peername: object) -> None:
        peer = await server_handshake(reader, writer, self.node, self.secret, self.applier.applied_for)
        if not peer.authenticated:
            log.warning("Replication peer %s (node=%s) is unauthenticated: no shared secret", peername, peer.node)
        self.mode = AckMode(peer.ack)
        self.applier.begin(peer.stream)
        self._connected = True
        self.events.peer("connected")
        log.info("Replication stream open: peer=%s applied_seq=%d mode=%s", peer.node, peer.applied_seq, self.mode)
        queue: asyncio.Queue[Frame | None] = asyncio.Queue(QUEUE_FRAMES)
        async with asyncio.TaskGroup() as tg:
            applying = tg.create_task(self._apply_loop(queue, writer))
            try:
                await self._read_loop(reader, writer, queue)
            finally:
                # Whatever ended the connection, frames already received (and, in `received` mode,
                # acknowledged) are applied: the ack promised they would be.
                if not applying.done():
                    await queue.put(None)
                    await asyncio.wait([applying])
                self.applier.close()

    async def _read_loop(self, reader: FrameReader, writer: FrameWriter, queue: asyncio.Queue[Frame | None]) -> None:
        expected: int | None = None
        while (frame := await reader.read()) is not None:
            if not frame.msg.OPERATION:
                raise ProtocolError(f"{type(frame.msg).__name__} is not an operation (seq {frame.seq})")
            if expected is None:
                if not 1 <= frame.seq <= self.applier.applied_seq + 1:
                    raise ProtocolError(f"stream resumes at seq {frame.seq}, applied {self.applier.applied_seq}")
            elif frame.seq != expected:
                raise ProtocolError(f"sequence number {frame.seq} where {expected} was due")
            expected = frame.seq + 1
            # Queued before the ack, so an acknowledged frame is always applied, even if the link dies now.
            await queue.put(frame)
            if self.mode is not AckMode.DURABLE and not frame.msg.AFTER_APPLY:
                writer.send_nowait(Frame(frame.seq, m.Ack()))
                await writer.writer.drain()

    async def _apply_loop(self, queue: asyncio.Queue[Frame | None], writer: FrameWriter) -> None:
        while (frame := await queue.get()) is not None:
            if self.applier.blocking(frame.msg):
                answer = await asyncio.to_thread(self.applier.apply, frame)
            else:
                answer = self.applier.apply(frame)
            failed = isinstance(answer, m.Ack) and bool(answer.status)
            if failed and isinstance(answer, m.Ack):
                self._failed(frame, answer)
            if self.mode is AckMode.DURABLE or frame.msg.AFTER_APPLY:
                await self._answer(writer, Frame(frame.seq, answer))
            elif failed and isinstance(answer, m.Ack):
                await self._answer(writer, Frame(frame.seq, m.Fault(answer.status, answer.message)))
            if not failed:
                self._track(frame.msg)

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
    async def _answer(writer: FrameWriter, frame: Frame) -> None:
        # Once the primary is gone its acks have no reader; the applier keeps applying what arrived.
        if writer.writer.is_closing():
            return
        writer.send_nowait(frame)
        with contextlib.suppress(ConnectionError):
            await writer.writer.drain()
