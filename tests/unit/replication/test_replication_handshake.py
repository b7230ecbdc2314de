"""Version handshake and HMAC challenge-response between two in-process stream ends."""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from agent.replication import handshake, wire
from agent.replication import messages as m
from agent.replication.connection import FrameConnection

STREAM = b"s" * 16
Ends = tuple[FrameConnection, FrameConnection]


async def run(ends: Ends, client_secret: bytes | None, server_secret: bytes | None) -> list[object]:
    client_end, server_end = ends

    async def client() -> handshake.Peer:
        try:
            return await handshake.client_handshake(client_end, "node1", client_secret, STREAM, "durable")
        finally:
            client_end.close()

    server = handshake.server_handshake(server_end, "node2", server_secret, lambda s: 7 if s == STREAM else 0)
    return await asyncio.gather(client(), server, return_exceptions=True)


async def test_shared_secret_authenticates_both_ends(ends: Ends) -> None:
    client, server = await run(ends, b"k" * 32, b"k" * 32)
    assert client == handshake.Peer("node2", True, STREAM, 7, "durable")
    assert server == handshake.Peer("node1", True, STREAM, 7, "durable")


async def test_no_secret_is_accepted_but_reported_unauthenticated(ends: Ends) -> None:
    client, server = await run(ends, None, None)
    assert isinstance(client, handshake.Peer) and not client.authenticated
    assert isinstance(server, handshake.Peer) and not server.authenticated


@pytest.mark.parametrize(
    ("client_secret", "server_secret", "reason"),
    [
        (b"a" * 32, b"b" * 32, "secrets differ"),
        (None, b"b" * 32, "has no shared secret"),
        (b"a" * 32, None, "sent no HMAC proof"),
    ],
)
async def test_mismatched_secrets_are_refused(
    ends: Ends, client_secret: bytes | None, server_secret: bytes | None, reason: str
) -> None:
    results = await run(ends, client_secret, server_secret)
    errors = [r for r in results if isinstance(r, handshake.AuthError)]
    assert errors and any(reason in str(e) for e in errors)
    assert not any(isinstance(r, handshake.Peer) and r.authenticated for r in results)


async def test_operation_before_hello_is_a_protocol_error(ends: Ends) -> None:
    client, server = ends
    await client.send(wire.Frame(1, m.Unlink(b"x")))
    with pytest.raises(wire.ProtocolError, match="expected Hello"):
        await handshake.server_handshake(server, "node2", None, lambda s: 0)


async def test_future_version_is_refused_with_both_numbers(ends: Ends) -> None:
    client, server = ends
    # A newer Hello may carry more fields; the answer must still name both versions.
    future = wire.VERSION + 1
    packed = msgpack.packb([1, 0, wire.MAGIC, future, "n", b"n" * 32, STREAM, "durable", "x"], use_bin_type=True)
    client.transport.write(wire.PREFIX.pack(4 + len(packed), len(packed)) + packed)
    with pytest.raises(wire.ProtocolError, match=f"version {future}, this node speaks {wire.VERSION}"):
        await handshake.server_handshake(server, "node2", None, lambda s: 0)
