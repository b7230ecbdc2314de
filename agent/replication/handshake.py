"""Version handshake and HMAC-SHA256 challenge-response that open every replication stream."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from agent.replication import messages as m
from agent.replication.connection import FrameConnection
from agent.replication.wire import MAGIC, VERSION, Frame, ProtocolError

HANDSHAKE_TIMEOUT = 10.0
_CONTEXT = b"tandem-replication-v1"
_M = TypeVar("_M", bound=m.Message)


class AuthError(ProtocolError):
    """The peer could not prove it holds the shared secret, or the two sides disagree on having one."""


@dataclass(frozen=True, slots=True)
class Peer:
    """What the handshake established about the other end."""

    node: str
    authenticated: bool
    stream: bytes
    applied_seq: int
    ack: str


def proof(secret: bytes | None, label: bytes, client_nonce: bytes, server_nonce: bytes, nodes: bytes) -> bytes:
    """HMAC-SHA256 over both nonces and both node names, bound to the direction by `label`."""
    if not secret:
        return b""
    return hmac.new(secret, b"|".join((_CONTEXT, label, client_nonce, server_nonce, nodes)), hashlib.sha256).digest()


def check_proof(secret: bytes | None, expected: bytes, got: bytes, who: str) -> bool:
    """Verify a proof; return whether the peer is authenticated; raise AuthError on a mismatch."""
    if not secret and not got:
        return False
    if not secret:
        raise AuthError(f"{who} sent an HMAC proof but this node has no shared secret configured")
    if not got:
        raise AuthError(f"{who} sent no HMAC proof but this node requires the shared secret")
    if not hmac.compare_digest(expected, got):
        raise AuthError(f"{who} failed the HMAC challenge: the shared secrets differ")
    return True


async def _expect(conn: FrameConnection, cls: type[_M]) -> _M:
    frame = await conn.read()
    if frame is None:
        raise ProtocolError(f"peer closed the stream during the handshake, expecting {cls.__name__}")
    if not isinstance(frame.msg, cls) or frame.seq != 0:
        got = type(frame.msg).__name__
        raise ProtocolError(f"expected {cls.__name__} with seq 0 in the handshake, got {got} seq {frame.seq}")
    return frame.msg


def _names(client: str, server: str) -> bytes:
    return client.encode() + b"\0" + server.encode()


async def client_handshake(conn: FrameConnection, node: str, secret: bytes | None, stream: bytes, ack: str) -> Peer:
    """Open a stream as the primary: send Hello, check the server's proof, send ours, await the Ack."""
    async with asyncio.timeout(HANDSHAKE_TIMEOUT):
        nonce = os.urandom(32)
        await conn.send(Frame(0, m.Hello(MAGIC, VERSION, node, nonce, stream, ack)))
        ch = await _expect(conn, m.Challenge)
        if ch.magic != MAGIC or ch.version != VERSION:
            raise ProtocolError(f"peer answered with magic {ch.magic!r} version {ch.version}, expected v{VERSION}")
        names = _names(node, ch.node)
        expected = proof(secret, b"server", nonce, ch.nonce, names)
        authenticated = check_proof(secret, expected, ch.proof, f"peer {ch.node!r}")
        await conn.send(Frame(0, m.Auth(proof(secret, b"client", nonce, ch.nonce, names))))
        verdict = await _expect(conn, m.Ack)
        if verdict.status:
            raise AuthError(f"peer {ch.node!r} refused the handshake: {verdict.message}")
        return Peer(ch.node, authenticated, stream, ch.applied_seq, ack)


async def server_handshake(
    conn: FrameConnection,
    node: str,
    secret: bytes | None,
    applied_seq: Callable[[bytes], int],
) -> Peer:
    """Accept a stream as the secondary: answer Hello with a challenge, verify the client's proof."""
    async with asyncio.timeout(HANDSHAKE_TIMEOUT):
        hello = await _expect(conn, m.Hello)
        nonce = os.urandom(32)
        names = _names(hello.node, node)
        seq = applied_seq(hello.stream)
        mine = proof(secret, b"server", hello.nonce, nonce, names)
        await conn.send(Frame(0, m.Challenge(MAGIC, VERSION, node, nonce, mine, seq)))
        auth = await _expect(conn, m.Auth)
        expected = proof(secret, b"client", hello.nonce, nonce, names)
        try:
            authenticated = check_proof(secret, expected, auth.proof, f"peer {hello.node!r}")
        except AuthError as exc:
            await conn.send(Frame(0, m.Ack(errno.EACCES, str(exc)[:200])))
            raise
        await conn.send(Frame(0, m.Ack()))
        return Peer(hello.node, authenticated, hello.stream, seq, hello.ack)
