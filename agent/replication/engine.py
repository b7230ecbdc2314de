"""The primary's replication stream through the native data path (agent/replication/native).

When the primary's mount runs the engine (ReplicatedFS.tandem_engine, Tandem's pyfuse3 patch), its
own thread serves WRITE and FSYNC and ships them, and every frame of the stream, the engine's and
Python's, is numbered and sent by it. Python still connects and runs the handshake; then `adopt`
hands the socket to the engine, and the Sender goes on with an EngineConnection: its frames go
through the engine, and the secondary's answers the engine does not take itself come back through a
socket pair, read exactly as the stream was read before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import Any

import pyfuse3

from agent.replication import messages as m
from agent.replication.connection import FrameConnection, lost
from agent.replication.wire import Frame, encode_parts

log = logging.getLogger(__name__)
# The sequence number of a frame the engine numbers: a full uint64 it overwrites (tandem_frames.h).
PLACEHOLDER = 2**64 - 1


def available() -> bool:
    """Whether this process's mount runs the native data path."""
    return bool(getattr(pyfuse3, "engine_on", lambda: False)())


class EngineConnection(FrameConnection):
    """A stream the engine owns: sends go through it, the answers it passes on are read here."""

    def __init__(self, *, traffic: Any = None, silence: float = 0.0) -> None:
        # The TCP socket itself was bounded (bound_silence) when it connected: not this socket pair.
        super().__init__(traffic=traffic, silence=0.0)
        self._tcp_silence = silence
        # Numbers for frames sent after the stream ended: never answered, failed by the Sender's loss.
        self._orphan = 0

    @property
    def seq(self) -> int:
        """The stream's last sequence number: the engine numbers Python's frames and its own."""
        return int(pyfuse3.engine_seq())

    def send_op(self, msg: m.Message) -> tuple[int, int]:
        head, data = encode_parts(Frame(PLACEHOLDER, msg))
        try:
            seq = pyfuse3.engine_send(head, data, True)
        except ConnectionResetError:
            # The stream ended and Python has not read its end yet: the Sender's loss fails this
            # frame's wait in a moment, and the operation completes locally as every other.
            self._orphan -= 1
            return self._orphan, 0
        if self._traffic is not None:
            self._traffic()
        return seq, len(head) + len(data)

    def send_nowait(self, frame: Frame) -> int:
        if frame.seq != 0:
            raise ValueError("frames of an engine's stream are numbered by send_op")
        head, data = encode_parts(frame)
        pyfuse3.engine_send(head, data, False)
        return len(head) + len(data)

    async def drain(self) -> None:
        # The engine writes each frame whole before engine_send returns.
        if self.is_closing() and self._closed.done():
            raise ConnectionResetError("replication connection is closed")

    def close(self) -> None:
        pyfuse3.engine_detach(False)
        super().close()

    def abort(self) -> None:
        pyfuse3.engine_detach(True)
        super().abort()

    def eof_received(self) -> bool:
        # The engine ended the pair because the stream ended: its reason, if it was an error.
        err, why = pyfuse3.engine_lost()
        if err:
            self._finish(lost(OSError(err, why), self._tcp_silence))
            return False
        if why:
            self._finish(ConnectionResetError(why))
            return False
        return super().eof_received()


async def adopt(conn: FrameConnection, traffic: Any = None, silence: float = 0.0) -> EngineConnection:
    """Hand a stream whose handshake is done over to the engine; the connection to go on with."""
    if not conn.idle():
        raise RuntimeError("frames arrived after the handshake, before the engine took the stream")
    raw = conn.transport.get_extra_info("socket")
    own = os.dup(raw.fileno())
    conn.pause_reading()
    conn.detach()
    try:
        answers = pyfuse3.engine_attach(own)
    except BaseException:
        os.close(own)
        raise
    # The engine's fd keeps the connection open: closing Python's ends nothing on the wire.
    conn.abort()
    pair = socket.socket(fileno=answers)
    _, econn = await asyncio.get_running_loop().create_unix_connection(
        lambda: EngineConnection(traffic=traffic, silence=silence), sock=pair
    )
    econn.peername = conn.peername
    return econn


class ReceiverConnection(FrameConnection):
    """The secondary's stream once the engine has it: the frames it passes on are read here, and the
    answers go out through it. Python applies what it is passed exactly as before; the engine
    applies the Write frames it can itself (`receiver_handled`, `receiver_applied`)."""

    def __init__(self, *, traffic: Any = None, silence: float = 0.0) -> None:
        super().__init__(traffic=traffic, silence=0.0)
        self._tcp_silence = silence

    def _emit(self, chunks: list[bytes]) -> None:
        # Once the primary is gone its answers have no reader; the end of the stream reaches this
        # connection through the pair in a moment, as a closed socket's would.
        with contextlib.suppress(ConnectionResetError):
            pyfuse3.receiver_send(b"".join(chunks))

    def close(self) -> None:
        pyfuse3.receiver_detach()
        super().close()

    def abort(self) -> None:
        pyfuse3.receiver_detach()
        super().abort()

    def eof_received(self) -> bool:
        err, why = pyfuse3.receiver_lost()
        if err:
            self._finish(lost(OSError(err, why), self._tcp_silence))
            return False
        return super().eof_received()


def receiver_available() -> bool:
    """Whether this process can hand a secondary's stream to the native data path."""
    return hasattr(pyfuse3, "receiver_attach")


async def adopt_receiver(
    conn: FrameConnection, root_fd: int, traffic: Any = None, silence: float = 0.0
) -> ReceiverConnection:
    """Hand a secondary's `received` stream, handshake done, over to the engine; the connection to
    go on with. What was already read past the handshake goes to the engine first."""
    own = os.dup(conn.transport.get_extra_info("socket").fileno())
    root = os.dup(root_fd)
    conn.pause_reading()
    conn.detach()
    try:
        answers = pyfuse3.receiver_attach(own, root, conn.take_unread())
    except BaseException:
        os.close(own)
        os.close(root)
        raise
    conn.abort()
    _, rconn = await asyncio.get_running_loop().create_unix_connection(
        lambda: ReceiverConnection(traffic=traffic, silence=silence), sock=socket.socket(fileno=answers)
    )
    rconn.peername = conn.peername
    return rconn
