"""One replication TCP connection as an asyncio Protocol: frames in, frames out, no task per frame.

Frames are parsed in `data_received` itself. During the handshake they are read with `await read()`;
afterwards `deliver()` hands each one to a callback at once, so an ack leaves (or a waiting write
resumes) in the same event-loop turn that received the bytes, without waking a reader task. The
answers written while one received chunk is handled leave together, before its `after` callback runs
(the secondary acknowledges a chunk's frames on receipt, then applies them).
"""

from __future__ import annotations

import asyncio
import collections
import socket
import typing
from collections.abc import Callable

from agent.replication.messages import Message
from agent.replication.wire import Frame, ProtocolError, decode_body, encode, encode_parts, frame_length

FrameHandler = Callable[[Frame], None]
# Data at least this large is written after its header rather than joined with it.
_LARGE = 64 * 1024
# Frames buffered for read() before the socket is paused (a peer cannot flood a handshake).
_READ_AHEAD = 64
# Why the connection ended: None for a clean end of stream, else the ProtocolError or ConnectionError.
EndHandler = Callable[[BaseException | None], None]
# Called once the frames of one received chunk were handed out and the answers they caused were sent.
AfterHandler = Callable[[], None]
# How long the peer's host may stay silent before the kernel ends the connection (bound_silence).
PEER_TIMEOUT = 30.0


def bound_silence(sock: typing.Any, seconds: float) -> None:
    """Have the kernel end the connection once the peer's host has been silent for about `seconds`.

    Without this, a peer that vanishes without a word (power cut, partition) leaves what was sent to
    it unacknowledged for the ~15 minutes of tcp_retries2, and every replicated write waits as long.
    TCP_USER_TIMEOUT bounds how long sent data may stay unacknowledged, or unsent into a zero window
    (a peer that stopped reading), and keepalive probes, sent after a third of it without traffic,
    find the same silence on an idle stream. The connection then ends with ETIMEDOUT. The peer's
    kernel answers all of these: a live host whose replicator hangs is not detected here.
    """
    if seconds <= 0 or sock is None:
        return
    probe = max(1, round(seconds / 3))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, probe)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, probe)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, round(seconds * 1000)))


def lost(exc: Exception, silence: float) -> ConnectionResetError:
    """Why a connection ended, as the end of the stream is reported (`silence`: bound_silence's)."""
    if isinstance(exc, TimeoutError) and silence > 0:
        return ConnectionResetError(f"the peer's host was silent for {silence:g} s (TCP_USER_TIMEOUT): {exc}")
    return ConnectionResetError(str(exc))


class FrameParser:
    """Splits a byte stream into validated frames; pure, so the framing rules are tested without sockets."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._length: int | None = None

    def feed(self, data: bytes) -> list[Frame]:
        """Add bytes; return every frame they complete. A bad length word fails before its body arrives."""
        buf = self._buf
        buf += data
        frames = []
        while True:
            if self._length is None:
                if len(buf) < 4:
                    return frames
                self._length = frame_length(bytes(buf[:4]))
            end = 4 + self._length
            if len(buf) < end:
                return frames
            view = memoryview(buf)
            body = view[4:end]
            try:
                frame = decode_body(body)
            finally:
                body.release()
                view.release()
            del buf[:end]
            self._length = None
            frames.append(frame)

    @property
    def empty(self) -> bool:
        """Whether no partial frame is buffered."""
        return not self._buf

    def take(self) -> bytes:
        """The bytes of a partial frame, which this parser then forgets."""
        taken = bytes(self._buf)
        self._buf.clear()
        self._length = None
        return taken

    def end(self) -> None:
        """The peer closed the stream: fine between frames, a ProtocolError inside one."""
        if not self._buf:
            return
        if self._length is None:
            raise ProtocolError(f"stream ended inside a length word ({len(self._buf)} of 4 bytes)")
        raise ProtocolError(f"stream ended mid-frame after {len(self._buf) - 4} of {self._length} bytes")


class FrameConnection(asyncio.Protocol):
    """A framed replication connection: `read()` for the handshake, then `deliver()` for the stream."""

    def __init__(
        self,
        opened: Callable[[FrameConnection], None] | None = None,
        *,
        traffic: Callable[[], None] | None = None,
        silence: float = 0.0,
    ) -> None:
        self._opened = opened
        # > 0: the peer's host may stay silent this many seconds (bound_silence).
        self._silence = silence
        # Called for every chunk received and every frame sent (awake.Awake.touch).
        self._traffic = traffic
        self._transport: asyncio.Transport | None = None
        self._parser = FrameParser()
        self._frames: collections.deque[Frame] = collections.deque()
        self._arrived = asyncio.Event()
        self._on_frame: FrameHandler | None = None
        self._on_end: EndHandler | None = None
        self._after: AfterHandler | None = None
        self._ended = False
        self._end: BaseException | None = None
        self._paused = False
        self._corked: list[bytes] | None = None
        self._drainers: list[asyncio.Future[None]] = []
        self._closed = asyncio.get_running_loop().create_future()
        self.peername: object = None
        self._seq = 0

    # --- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        self._transport = typing.cast(asyncio.Transport, transport)
        self.peername = transport.get_extra_info("peername")
        bound_silence(transport.get_extra_info("socket"), self._silence)
        if self._opened is not None:
            self._opened(self)

    def data_received(self, data: bytes) -> None:
        if self._traffic is not None:
            self._traffic()
        if self._ended or not self._corked_call(lambda: self._take(data)):
            return
        self._arrived.set()
        if self._after is not None and not self._ended:
            self._corked_call(self._after)

    def _take(self, data: bytes) -> None:
        for frame in self._parser.feed(data):
            if self._on_frame is not None:
                self._on_frame(frame)
            else:
                self._frames.append(frame)
                if len(self._frames) == _READ_AHEAD:
                    self.pause_reading()

    def _corked_call(self, fn: Callable[[], None]) -> bool:
        """Run fn with the answers it writes corked into one send; False when a ProtocolError ended the connection."""
        self._corked = []
        try:
            fn()
        except ProtocolError as exc:
            self._uncork()
            self._finish(exc)
            self.close()
            return False
        finally:
            self._uncork()
        return True

    def _uncork(self) -> None:
        corked, self._corked = self._corked, None
        if corked and self._transport is not None and not self._transport.is_closing():
            self._emit(corked)

    def _emit(self, chunks: list[bytes]) -> None:
        """Write these bytes to the peer, in order."""
        assert self._transport is not None
        if len(chunks) == 2 and len(chunks[1]) >= _LARGE:
            # Two sends instead of one joined copy of the data.
            self._transport.write(chunks[0])
            self._transport.write(chunks[1])
        else:
            self._transport.writelines(chunks)

    def eof_received(self) -> bool:
        try:
            self._parser.end()
        except ProtocolError as exc:
            self._finish(exc)
        else:
            self._finish(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(lost(exc, self._silence) if exc is not None else None)
        for fut in self._drainers:
            if not fut.done():
                fut.set_exception(ConnectionResetError("connection lost"))
        self._drainers.clear()
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        for fut in self._drainers:
            if not fut.done():
                fut.set_result(None)
        self._drainers.clear()

    # --- reading -------------------------------------------------------------------------------

    async def read(self) -> Frame | None:
        """The next frame, or None at a clean end of stream; raise the ProtocolError that ended it."""
        while not self._frames:
            if self._ended:
                if self._end is not None and not isinstance(self._end, ConnectionError):
                    raise self._end
                return None
            self._arrived.clear()
            await self._arrived.wait()
        if len(self._frames) == _READ_AHEAD:
            self.resume_reading()
        return self._frames.popleft()

    def deliver(self, on_frame: FrameHandler, on_end: EndHandler, after: AfterHandler | None = None) -> None:
        """From now on pass each frame to `on_frame` as it arrives, and the end of the stream to `on_end`.

        Frames already read but not consumed go first. `after` runs once per received chunk, after its
        frames and once the answers they caused were sent. A ProtocolError raised by `on_frame` or
        `after` ends the connection like a malformed frame does.
        """
        self._on_frame, self._on_end, self._after = on_frame, on_end, after
        self.resume_reading()
        try:
            while self._frames:
                on_frame(self._frames.popleft())
            if after is not None:
                after()
        except ProtocolError as exc:
            self._finish(exc)
            self.close()
            return
        if self._ended:
            self._notify_end()

    def idle(self) -> bool:
        """Whether nothing was received that is not consumed yet (no frame, no partial frame)."""
        return not self._frames and self._parser.empty

    def take_unread(self) -> bytes:
        """The bytes received and not consumed yet (frames as their wire bytes, then a partial one)."""
        unread = b"".join(encode(frame) for frame in self._frames) + self._parser.take()
        self._frames.clear()
        return unread

    def detach(self) -> None:
        """Stop delivering: later frames and the end of the stream are dropped."""
        self._on_frame = self._on_end = self._after = None
        self._ended = True

    def pause_reading(self) -> None:
        """Stop reading from the socket (the peer then feels TCP backpressure)."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        """Read from the socket again."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def _finish(self, end: BaseException | None) -> None:
        if self._ended:
            return
        self._ended, self._end = True, end
        self._arrived.set()
        self._notify_end()

    def _notify_end(self) -> None:
        on_end, self._on_end, self._on_frame, self._after = self._on_end, None, None, None
        if on_end is not None:
            on_end(self._end)

    # --- writing -------------------------------------------------------------------------------

    @property
    def seq(self) -> int:
        """The last sequence number send_op gave."""
        return self._seq

    def send_op(self, msg: Message) -> tuple[int, int]:
        """Send the stream's next operation: its sequence number and its size in bytes."""
        self._seq += 1
        return self._seq, self.send_nowait(Frame(self._seq, msg))

    def send_nowait(self, frame: Frame) -> int:
        """Queue a frame on the transport (see drain() for backpressure); return its size in bytes."""
        head, data = encode_parts(frame)
        if self._transport is None or self._transport.is_closing():
            raise ConnectionResetError("replication connection is closed")
        if self._traffic is not None:
            self._traffic()
        if self._corked is not None:
            self._corked += (head, data) if data else (head,)
        else:
            self._emit([head, data] if data else [head])
        return len(head) + len(data)

    async def drain(self) -> None:
        """Wait while the transport's buffer is above its high-water mark; raise if the connection is gone."""
        if self._transport is None or self._transport.is_closing():
            if self._closed.done():
                raise ConnectionResetError("replication connection is closed")
            return
        if self._paused:
            fut = asyncio.get_running_loop().create_future()
            self._drainers.append(fut)
            await fut

    async def send(self, frame: Frame) -> None:
        """Write a frame and wait for the transport's buffer to drain."""
        self.send_nowait(frame)
        await self.drain()

    @property
    def transport(self) -> asyncio.Transport:
        """The transport, once connected (tests write raw bytes through it)."""
        assert self._transport is not None, "not connected"
        return self._transport

    @property
    def writing_paused(self) -> bool:
        """Whether the transport's buffer is above its high-water mark (the peer is not reading)."""
        return self._paused

    def is_closing(self) -> bool:
        """Whether the connection is closed or closing."""
        return self._transport is None or self._transport.is_closing()

    def close(self) -> None:
        """Close after what is queued has been written."""
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Close at once, dropping what is queued (the peer sees a reset)."""
        if self._transport is not None:
            self._transport.abort()

    async def wait_closed(self) -> None:
        """Wait until the transport is gone."""
        await asyncio.shield(self._closed)
