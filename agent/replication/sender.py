"""The primary's end of a replication stream: numbers operations, sends them in order, awaits acks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from agent.replication import messages as m
from agent.replication.handshake import Peer, client_handshake
from agent.replication.wire import Frame, FrameReader, FrameWriter, ProtocolError

log = logging.getLogger(__name__)
STREAM_LIMIT = 4 * 1024 * 1024


class Sender:
    """One ordered stream of operations to the secondary; each submit resolves when the peer acks."""

    def __init__(self, *, node: str, secret: bytes | None, ack: str) -> None:
        self.node = node
        self.secret = secret
        self.ack = ack
        self.stream = os.urandom(16)
        self.seq = 0
        self.connected = False
        self.diverged = False
        self.peer: Peer | None = None
        self._writer: FrameWriter | None = None
        self._pending: dict[int, asyncio.Future[m.Ack]] = {}
        self._acks: asyncio.Task[None] | None = None

    async def connect(self, host: str, port: int) -> Peer:
        """Open the TCP stream and run the handshake; raise on refusal."""
        reader, writer = await asyncio.open_connection(host, port, limit=STREAM_LIMIT)
        try:
            peer = await client_handshake(
                FrameReader(reader), FrameWriter(writer), self.node, self.secret, self.stream, self.ack
            )
        except BaseException:
            writer.close()
            raise
        if not peer.authenticated:
            log.warning("Replication peer node=%s is unauthenticated: no shared secret configured", peer.node)
        self.peer, self._writer, self.connected = peer, FrameWriter(writer), True
        self._acks = asyncio.create_task(self._read_acks(FrameReader(reader)))
        log.info("Replication stream to node=%s open, ack=%s", peer.node, self.ack)
        return peer

    def submit(self, msg: m.Message) -> asyncio.Future[m.Ack] | None:
        """Send one operation now, in call order; None when no peer is connected (running alone)."""
        if not self.connected or self._writer is None:
            return None
        self.seq += 1
        fut: asyncio.Future[m.Ack] = asyncio.get_running_loop().create_future()
        self._pending[self.seq] = fut
        self._writer.send_nowait(Frame(self.seq, msg))
        return fut

    async def replicate(self, msg: m.Message) -> None:
        """Send one operation and return once the peer acknowledged it (or the stream is lost)."""
        await self.wait(self.submit(msg))

    async def wait(self, fut: asyncio.Future[m.Ack] | None) -> None:
        """Wait for an ack; an error ack marks the secondary diverged and is logged, never ignored."""
        if fut is None:
            return
        with contextlib.suppress(ConnectionError):
            ack = await fut
            if ack.status:
                self._diverge(f"secondary failed an operation: {ack.message} (errno {ack.status})")

    def _diverge(self, reason: str) -> None:
        if not self.diverged:
            log.error("Replication error, secondary diverged and needs a resync: %s", reason)
        self.diverged = True

    async def _read_acks(self, reader: FrameReader) -> None:
        reason = "peer closed the stream"
        try:
            while (frame := await reader.read()) is not None:
                if isinstance(frame.msg, m.Fault):
                    self._diverge(f"seq {frame.seq}: {frame.msg.message} (errno {frame.msg.status})")
                    continue
                fut = self._pending.pop(frame.seq, None)
                if not isinstance(frame.msg, m.Ack) or fut is None:
                    raise ProtocolError(f"unexpected {type(frame.msg).__name__} for seq {frame.seq}")
                fut.set_result(frame.msg)
        except (ProtocolError, ConnectionError) as exc:
            reason = str(exc)
        self._lose(reason)

    def _lose(self, reason: str) -> None:
        if self.connected:
            log.error("Replication stream lost, running alone (full resync needed): %s", reason)
        self.connected = False
        self.diverged = True
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError(reason))
        self._pending.clear()
        if self._writer is not None:
            self._writer.writer.close()

    async def close(self) -> None:
        """Close the stream after the acks of everything sent."""
        if self._writer is not None and self.connected:
            pending = list(self._pending.values())
            if pending:
                await asyncio.wait(pending, timeout=10)
            self.connected = False
            self._writer.writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.writer.wait_closed()
        if self._acks is not None:
            self._acks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._acks
