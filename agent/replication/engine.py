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
from collections.abc import Callable
from typing import Any

import pyfuse3

from agent.replication import messages as m
from agent.replication.connection import FrameConnection, lost
from agent.replication.wire import Frame, encode_parts

log = logging.getLogger(__name__)
# The sequence number of a frame the engine numbers: a full uint64 it overwrites (tandem_frames.h).
PLACEHOLDER = 2**64 - 1
# Bit N: operation code N, which `received` acknowledges on receipt (receiver._Stream); on the
# secondary the engine acknowledges those itself (tandem_receiver.c).
ON_RECEIPT = sum(1 << op for op, cls in m.MESSAGES.items() if cls.OPERATION and not cls.AFTER_APPLY)


def available() -> bool:
    """Whether this process's mount runs the native data path."""
    return bool(getattr(pyfuse3, "engine_on", lambda: False)())


class _Handed(FrameConnection):
    """A stream the engine owns, seen from Python: what the engine passes on is read here, through a
    socket pair; `_detach` ends the engine's part, `_lost` says why its stream ended."""

    _detach: Callable[[bool], None]
    _lost: Callable[[], tuple[int, str]]

    def __init__(self, *, traffic: Any = None, silence: float = 0.0) -> None:
        # The TCP socket itself was bounded (bound_silence) when it connected: not this socket pair.
        super().__init__(traffic=traffic, silence=0.0)
        self._tcp_silence = silence

    def close(self) -> None:
        type(self)._detach(False)
        super().close()

    def abort(self) -> None:
        type(self)._detach(True)
        super().abort()

    def eof_received(self) -> bool:
        # The engine ended the pair because the stream ended: its reason, if it knows one.
        err, why = type(self)._lost()
        if err:
            self._finish(lost(OSError(err, why), self._tcp_silence))
            return False
        if why:
            self._finish(ConnectionResetError(why))
            return False
        return super().eof_received()


class EngineConnection(_Handed):
    """The primary's stream once the engine has it: Python's frames are numbered and sent by it."""

    _detach = staticmethod(lambda abort: pyfuse3.engine_detach(abort))
    _lost = staticmethod(lambda: pyfuse3.engine_lost())

    def __init__(self, *, traffic: Any = None, silence: float = 0.0) -> None:
        super().__init__(traffic=traffic, silence=silence)
        # Numbers for frames sent after the stream ended: never answered, failed by the Sender's loss.
        self._orphan = 0

    @property
    def seq(self) -> int:
        """The stream's last sequence number: the engine numbers Python's frames and its own."""
        return int(pyfuse3.engine_seq())

    def send_op(self, msg: m.Message, unique: int = 0) -> tuple[int, int]:
        """`unique`: the FUSE request this frame ends; the engine holds that request's reply until
        the secondary answers the frame (or the stream ends) and takes the answer itself (Python only
        hears of an error, as a Fault). MemoryError: it cannot hold it, and nothing was sent."""
        head, data = encode_parts(Frame(PLACEHOLDER, msg))
        try:
            seq = pyfuse3.engine_send(head, data, True, unique)
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


class ReceiverConnection(_Handed):
    """The secondary's stream once the engine has it: Python applies what it is passed exactly as
    before, and its answers go out through the engine, which applies the Write frames it can itself
    (`receiver_handled`, `receiver_applied`)."""

    _detach = staticmethod(lambda abort: pyfuse3.receiver_detach())
    _lost = staticmethod(lambda: pyfuse3.receiver_lost())

    def _emit(self, chunks: list[bytes]) -> None:
        # Once the primary is gone its answers have no reader; the end of the stream reaches this
        # connection through the pair in a moment, as a closed socket's would.
        with contextlib.suppress(ConnectionResetError):
            pyfuse3.receiver_send(b"".join(chunks))


def receiver_available() -> bool:
    """Whether this process can hand a secondary's stream to the native data path."""
    return hasattr(pyfuse3, "receiver_attach")


async def _hand_over(
    conn: FrameConnection, attach: Callable[[int], int], make: Callable[[], _Handed], closing: tuple[int, ...] = ()
) -> Any:
    """Give the engine its own fd of the connection's socket (`attach` returns the fd of the pair
    to read from); the connection to go on with. `closing`: fds to close if `attach` fails."""
    own = os.dup(conn.transport.get_extra_info("socket").fileno())
    conn.pause_reading()
    conn.detach()
    try:
        answers = attach(own)
    except BaseException:
        for fd in (own, *closing):
            os.close(fd)
        raise
    # The engine's fd keeps the connection open: closing Python's ends nothing on the wire.
    conn.abort()
    _, handed = await asyncio.get_running_loop().create_unix_connection(make, sock=socket.socket(fileno=answers))
    handed.peername = conn.peername
    return handed


async def adopt(conn: FrameConnection, traffic: Any = None, silence: float = 0.0) -> EngineConnection:
    """Hand a primary's stream whose handshake is done over to the engine."""
    if not conn.idle():
        raise RuntimeError("frames arrived after the handshake, before the engine took the stream")
    handed: EngineConnection = await _hand_over(
        conn, pyfuse3.engine_attach, lambda: EngineConnection(traffic=traffic, silence=silence)
    )
    return handed


async def adopt_receiver(
    conn: FrameConnection, root_fd: int, traffic: Any = None, silence: float = 0.0, *, durable: bool = False
) -> ReceiverConnection:
    """Hand a secondary's stream whose handshake is done over to the engine. What was already read
    past the handshake goes to the engine first. In `received` and `fsync` mode, from the session's
    second frame on, the engine acknowledges on receipt what that mode
    acknowledges so (ON_RECEIPT); in `durable` mode nothing is acknowledged before it is on disk."""
    root = os.dup(root_fd)
    unread = conn.take_unread()
    handed: ReceiverConnection = await _hand_over(
        conn,
        lambda own: pyfuse3.receiver_attach(own, root, unread, 0 if durable else ON_RECEIPT, durable),
        lambda: ReceiverConnection(traffic=traffic, silence=silence),
        (root,),
    )
    return handed
