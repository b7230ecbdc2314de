"""FrameConnection over a real socket pair: read-ahead bound, delivery order, ends of stream."""

from __future__ import annotations

import asyncio
import socket

from agent.replication import messages as m
from agent.replication import wire
from agent.replication.connection import FrameConnection, bound_silence


async def test_a_flood_before_delivery_pauses_reading_and_loses_nothing(
    ends: tuple[FrameConnection, FrameConnection],
) -> None:
    sender, receiver = ends
    for seq in range(1, 301):
        sender.send_nowait(wire.Frame(seq, m.Unlink(b"f%d" % seq)))
    await sender.drain()
    await asyncio.sleep(0.1)
    assert receiver.transport.is_reading() is False  # 64 frames buffered, the socket holds the rest
    first = await receiver.read()
    assert first is not None and first.seq == 1
    got: list[int] = []
    done = asyncio.get_running_loop().create_future()
    receiver.deliver(lambda f: got.append(f.seq), lambda why: done.set_result(why))
    assert receiver.transport.is_reading()
    for _ in range(500):  # at most 5 s
        if len(got) == 299:
            break
        await asyncio.sleep(0.01)
    assert got == list(range(2, 301))
    sender.close()
    assert await asyncio.wait_for(done, 5) is None  # a clean end between frames


async def test_a_protocol_error_from_the_handler_ends_the_stream_with_it(
    ends: tuple[FrameConnection, FrameConnection],
) -> None:
    sender, receiver = ends
    done = asyncio.get_running_loop().create_future()

    def refuse(frame: wire.Frame) -> None:
        raise wire.ProtocolError(f"no thanks: seq {frame.seq}")

    receiver.deliver(refuse, lambda why: done.set_result(why))
    sender.send_nowait(wire.Frame(7, m.Unlink(b"x")))
    why = await asyncio.wait_for(done, 5)
    assert isinstance(why, wire.ProtocolError) and "seq 7" in str(why)
    assert await asyncio.wait_for(sender.read(), 5) is None  # the receiver closed its end


def test_a_peer_timeout_bounds_unacknowledged_data_and_probes_an_idle_stream() -> None:
    with socket.socket() as sock:
        bound_silence(sock, 6)
        tcp = socket.IPPROTO_TCP
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(tcp, socket.TCP_USER_TIMEOUT) == 6000
        assert (sock.getsockopt(tcp, socket.TCP_KEEPIDLE), sock.getsockopt(tcp, socket.TCP_KEEPINTVL)) == (2, 2)
        assert sock.getsockopt(tcp, socket.TCP_KEEPCNT) == 3


def test_a_zero_peer_timeout_keeps_the_kernel_defaults() -> None:
    with socket.socket() as sock:
        bound_silence(sock, 0)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0
