"""A Receiver over its own directory, reached through a socketpair by a test acting as the primary."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from agent.replication.applier import Applier
from agent.replication.connection import FrameConnection
from agent.replication.handshake import client_handshake
from agent.replication.receiver import AckMode, Receiver

SECRET = b"k" * 32


@dataclass
class Link:
    conn: FrameConnection
    server: asyncio.Task[None]
    root: Path
    receiver: Receiver


@contextlib.asynccontextmanager
async def open_link(root: Path, mode: AckMode, *, native: bool = False) -> AsyncIterator[Link]:
    """Serve `root` in `mode` and yield the primary's end after the handshake; closed and awaited on exit.

    `native`: the Receiver hands the stream to the native data path (tandem_receiver.c).
    """
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    receiver = Receiver(Applier(fd), node="node2", secret=SECRET, native=native)
    left, right = socket.socketpair()
    loop = asyncio.get_running_loop()
    _, server_end = await loop.connect_accepted_socket(FrameConnection, sock=right)
    server = asyncio.create_task(receiver.serve(server_end))
    _, conn = await loop.create_connection(FrameConnection, sock=left)
    try:
        peer = await client_handshake(conn, "node1", SECRET, b"s" * 16, mode)
        assert peer.authenticated and peer.applied_seq == 0 and peer.ack == mode
        yield Link(conn, server, root, receiver)
    finally:
        conn.close()
        await conn.wait_closed()
        await asyncio.wait_for(server, 5)
        os.close(fd)
