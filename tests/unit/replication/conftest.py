"""Fixtures shared by the replication unit tests."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from agent.replication.connection import FrameConnection


@pytest.fixture
async def ends() -> AsyncIterator[tuple[FrameConnection, FrameConnection]]:
    """Two connected FrameConnections over a socket pair: (the connecting end, the accepting end)."""
    left, right = socket.socketpair()
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(FrameConnection, sock=left)
    _, server = await loop.connect_accepted_socket(FrameConnection, sock=right)
    try:
        yield client, server
    finally:
        for end in (client, server):
            end.close()
            await end.wait_closed()
