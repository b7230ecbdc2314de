"""The primary's end of a replication stream: numbers operations, sends them in order, awaits acks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterator

import pyfuse3

from agent.replication import engine
from agent.replication import messages as m
from agent.replication.connection import PEER_TIMEOUT, FrameConnection
from agent.replication.handshake import Peer, client_handshake
from agent.replication.wire import Frame, ProtocolError

log = logging.getLogger(__name__)
_ANSWERS = (m.Ack, m.Listing, m.Sums)
# Pings per peer timeout: a healthy peer answers several times before its silence counts.
PINGS_PER_TIMEOUT = 4
# One connection attempt gives up after this long: a SYN to a vanished host is retried for minutes,
# with gaps that grow to 16 s, while a fresh attempt reaches a host that is back at once.
CONNECT_TIMEOUT = 5.0

# (seq, errno, message) of an operation the secondary failed to apply.
ErrorHandler = Callable[[int, int, str], None]


class Sender:
    """One ordered stream of operations to the secondary at a time; each submit resolves when the peer acks."""

    def __init__(
        self,
        *,
        node: str,
        secret: bytes | None,
        ack: str,
        traffic: Callable[[], None] | None = None,
        peer_timeout: float = PEER_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.node = node
        # A peer silent this long ends the stream (connection.bound_silence, and the pings).
        self.peer_timeout = peer_timeout
        self.connect_timeout = connect_timeout
        self.traffic = traffic
        self.secret = secret
        self.ack = ack
        self.stream = os.urandom(16)
        self.connected = False
        self.diverged = False
        self.peer: Peer | None = None
        self.lost_reason = ""
        self.closed = asyncio.Event()
        self.on_error: ErrorHandler | None = None
        self._observer: Callable[[m.Message], None] | None = None
        # The resync of the current stream ended with both trees equal (resynced).
        self._resynced = False
        # held(): the native data path serves nothing while above 0.
        self._holds = 0
        self.sent_bytes = 0
        self._conn: FrameConnection | None = None
        self._pending: dict[int, asyncio.Future[m.Message]] = {}
        # The event loop's time of the last frame the peer sent (answers and pongs).
        self._heard = 0.0
        self._watch: asyncio.Task[None] | None = None
        # Pings numbered from one counter (the watchdog's and barrier()'s), and the barriers' waits.
        self._ping = 0
        self._barriers: dict[int, asyncio.Future[None]] = {}

    async def connect(self, host: str, port: int) -> Peer:
        """Open a new stream (fresh id, seq from 1) and run the handshake; raise on refusal."""
        connecting = asyncio.get_running_loop().create_connection(
            lambda: FrameConnection(traffic=self.traffic, silence=self.peer_timeout), host, port
        )
        try:
            async with asyncio.timeout(self.connect_timeout if self.connect_timeout > 0 else None):
                _, conn = await connecting
        except TimeoutError:
            raise TimeoutError(f"no answer from {host}:{port} within {self.connect_timeout:g} s") from None
        stream = os.urandom(16)
        try:
            peer = await client_handshake(conn, self.node, self.secret, stream, self.ack)
        except BaseException:
            conn.close()
            raise
        if not peer.authenticated:
            log.warning("Replication peer node=%s is unauthenticated: no shared secret configured", peer.node)
        if engine.available():
            try:
                conn = await engine.adopt(conn, self.traffic, self.peer_timeout)
            except BaseException:
                conn.close()
                raise
        self.stream, self.closed = stream, asyncio.Event()
        self.peer, self._conn, self.connected = peer, conn, True
        self._resynced = False
        self._serve()
        self._heard = asyncio.get_running_loop().time()
        conn.deliver(self._answer, self._ended)
        if self.peer_timeout > 0:
            self._watch = asyncio.create_task(self._watchdog(conn))
        log.info("Replication stream to node=%s open, ack=%s", peer.node, self.ack)
        return peer

    @property
    def seq(self) -> int:
        """The last sequence number given on the current (or last) stream."""
        return self._conn.seq if self._conn is not None else 0

    @property
    def observer(self) -> Callable[[m.Message], None] | None:
        """Told every live operation before it is sent (a resync); none may bypass it meanwhile."""
        return self._observer

    @observer.setter
    def observer(self, observer: Callable[[m.Message], None] | None) -> None:
        self._observer = observer
        self._serve()

    def resynced(self) -> None:
        """The resync of this stream made both trees equal: the native data path may serve."""
        self._resynced = True
        self._serve()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """The native data path serves nothing meanwhile: every write and fsync comes to Python, which
        ships it in the order of its own frames (a file that Python copies to the secondary)."""
        self._holds += 1
        self._serve()
        try:
            yield
        finally:
            self._holds -= 1
            self._serve()

    def _serve(self) -> None:
        """Let the native data path serve writes and fsyncs while a stream is up, its resync is done
        and nothing watches. Not before the resync: its thread does not wait for the event loop, and
        a write it shipped between the stream's start and the resync's first frame would reach a
        secondary that does not know yet that its tree is being repaired."""
        if isinstance(self._conn, engine.EngineConnection):
            pyfuse3.engine_serve(self.connected and self._observer is None and self._resynced and not self._holds)

    def submit(self, msg: m.Message, reply: int = 0) -> asyncio.Future[m.Message] | None:
        """Send one live operation now, in call order; None when no peer is connected (running alone).

        `reply`: the unique id of the FUSE request this operation ends (its handler ships nothing
        after it). With the native data path the engine then holds that request's reply until the
        peer acknowledged the operation, and there is nothing to wait for here (None).
        """
        if self._observer is not None:
            self._observer(msg)
        if reply and self.connected and isinstance(self._conn, engine.EngineConnection):
            with contextlib.suppress(MemoryError):  # not held: sent and awaited as any other
                # Once the stream ended nothing is held: the reply goes out as Python writes it.
                self.sent_bytes += self._conn.send_op(msg, reply)[1]
                return None
        return self.send(msg)

    def send(self, msg: m.Message) -> asyncio.Future[m.Message] | None:
        """Send one frame without telling the observer (the resync's own frames)."""
        if not self.connected or self._conn is None:
            return None
        fut: asyncio.Future[m.Message] = asyncio.get_running_loop().create_future()
        seq, size = self._conn.send_op(msg)
        self._pending[seq] = fut
        self.sent_bytes += size
        return fut

    async def drain(self) -> None:
        """Wait until the transport's buffer is below its high-water mark (backpressure)."""
        if self._conn is not None and self.connected:
            with contextlib.suppress(ConnectionError):
                await self._conn.drain()

    async def replicate(self, msg: m.Message, reply: int = 0) -> None:
        """Send one operation and return once the peer acknowledged it (or the stream is lost), or,
        with `reply` (submit), once the engine holds the reply of the request it ends."""
        await self.wait(self.submit(msg, reply))

    async def wait(self, fut: asyncio.Future[m.Message] | None) -> None:
        """Wait for an ack; errors were already routed to the error handler by the ack reader."""
        if fut is None:
            return
        with contextlib.suppress(ConnectionError):
            await fut

    def _failed(self, seq: int, status: int, message: str) -> None:
        if self.on_error is not None:
            self.on_error(seq, status, message)
            return
        if not self.diverged:
            log.error("Replication error, secondary diverged and needs a resync: %s (errno %d)", message, status)
        self.diverged = True

    async def _watchdog(self, conn: FrameConnection) -> None:
        """Ping the peer while `conn` carries the stream; end the stream once the peer answered nothing
        for `peer_timeout`: its host answers TCP, but its replicator hangs or no longer reads."""
        loop = asyncio.get_running_loop()
        interval = self.peer_timeout / PINGS_PER_TIMEOUT
        while True:
            due = loop.time() + interval
            await asyncio.sleep(interval)
            if not self.connected or self._conn is not conn:
                return
            now = loop.time()
            # Woken late: this loop itself stalled, and answers may wait unread; judge next time.
            late = now - due > interval
            if not late and now - self._heard >= self.peer_timeout:
                self._lose(
                    f"the peer's replicator answered nothing for {now - self._heard:.1f} s "
                    "(it hangs, or does not read its stream)",
                    abort=True,
                )
                return
            with contextlib.suppress(ConnectionError):
                conn.send_nowait(Frame(0, m.Ping(self._next_ping())))

    def _next_ping(self) -> int:
        self._ping = (self._ping + 1) & 0xFFFFFFFF
        return self._ping

    async def barrier(self) -> None:
        """Return once the peer has received every frame sent before this call, the native data
        path's too (a Ping's Pong: the secondary answers on receipt, with every earlier frame queued,
        and a queued frame is always applied), or once the stream is lost."""
        if self._conn is None or not self.connected:
            return
        n = self._next_ping()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._barriers[n] = fut
        try:
            self._conn.send_nowait(Frame(0, m.Ping(n)))
            await fut
        except ConnectionError:
            pass
        finally:
            self._barriers.pop(n, None)

    def _answer(self, frame: Frame) -> None:
        """One answer from the secondary, handled in the event-loop turn that received it."""
        msg = frame.msg
        self._heard = asyncio.get_running_loop().time()
        if isinstance(msg, m.Pong):
            if frame.seq != 0:
                raise ProtocolError(f"Pong with sequence number {frame.seq}: a pong carries 0")
            barrier = self._barriers.pop(msg.n, None)
            if barrier is not None and not barrier.done():
                barrier.set_result(None)
            return
        if isinstance(msg, m.Fault):
            self._failed(frame.seq, msg.status, msg.message)
            return
        fut = self._pending.pop(frame.seq, None)
        if not isinstance(msg, _ANSWERS) or fut is None:
            raise ProtocolError(f"unexpected {type(msg).__name__} for seq {frame.seq}")
        if isinstance(msg, m.Ack) and msg.status:
            self._failed(frame.seq, msg.status, msg.message)
        if not fut.done():
            fut.set_result(msg)

    def _ended(self, why: BaseException | None) -> None:
        self._lose(str(why) if why is not None else "peer closed the stream")

    def drop(self, reason: str, *, abort: bool = False) -> None:
        """End the current stream now (the link reconnects and resyncs); `abort`: reset, do not flush."""
        self._lose(reason, abort=abort)

    def _lose(self, reason: str, *, abort: bool = False) -> None:
        """The stream is gone: fail what waits for acks (it completes locally); `abort` resets the
        connection instead of closing it after what is queued (a peer that hangs never reads it)."""
        if self._watch is not None and self._watch is not asyncio.current_task():
            self._watch.cancel()
        self._watch = None
        if self.connected:
            log.warning("Replication stream lost, running alone (full resync needed): %s", reason)
            self.lost_reason = reason
        self.connected = False
        self._serve()
        self.diverged = True
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError(reason))
                # Seen now: nobody awaits the resync's own frames one by one.
                fut.exception()
        self._pending.clear()
        for barrier in self._barriers.values():
            if not barrier.done():
                barrier.set_exception(ConnectionError(reason))
                barrier.exception()
        self._barriers.clear()
        if self._conn is not None:
            (self._conn.abort if abort else self._conn.close)()
        self.closed.set()

    async def close(self) -> None:
        """Close the stream after the acks of everything sent."""
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._conn is not None and self.connected:
            pending = list(self._pending.values())
            if pending:
                await asyncio.wait(pending, timeout=10)
            self.connected = False
            self._conn.detach()
            self._conn.close()
            await self._conn.wait_closed()
        self.closed.set()
