"""The secondary's stream end over a socket: ack modes, fsync acks, disconnect on violations."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.replication import messages as m
from agent.replication.connection import FrameConnection
from agent.replication.receiver import AckMode
from agent.replication.wire import Frame
from tests.conftest import ExpectedLogs
from tests.integration.replication.links import Link, open_link


@pytest.fixture(
    params=[
        (AckMode.RECEIVED, False),
        (AckMode.RECEIVED, True),
        (AckMode.DURABLE, False),
        (AckMode.DURABLE, True),
        (AckMode.FSYNC, False),
        (AckMode.FSYNC, True),
    ],
    ids=["received", "received-native", "durable", "durable-native", "fsync", "fsync-native"],
)
async def link(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Link]:
    root = tmp_path / "repl"
    root.mkdir()
    mode, native = request.param
    async with open_link(root, mode, native=native) as opened:
        yield opened


async def test_every_op_is_acked_once_in_order_of_need(link: Link, expected_logs: ExpectedLogs) -> None:
    expected_logs.expect(r"Replication error applying seq=4: Unlink b'nope'")
    ops: list[m.Message] = [
        m.Create(b"f", 0o644, 0, 0, 0),
        m.Write(b"f", 0, b"abc"),
        m.Fsync(b"f", False),
        m.Unlink(b"nope"),
    ]
    for seq, op in enumerate(ops, 1):
        await link.conn.send(Frame(seq, op))
    got: dict[int, m.Message] = {}
    while len(got) < len(ops):
        frame = await asyncio.wait_for(link.conn.read(), 5)
        assert frame is not None
        if isinstance(frame.msg, m.Fault):
            assert frame.seq == 4 and frame.msg.status == errno.ENOENT
            continue
        assert frame.seq not in got
        got[frame.seq] = frame.msg
    assert (link.root / "f").read_bytes() == b"abc"
    assert got[3] == m.Ack()
    assert isinstance(got[4], m.Ack)


async def test_durable_ack_means_applied(link: Link) -> None:
    await link.conn.send(Frame(1, m.Mkdir(b"d", 0o755, 0, 0)))
    frame = await asyncio.wait_for(link.conn.read(), 5)
    assert frame == Frame(1, m.Ack())
    await link.conn.send(Frame(2, m.Fsync(b"d", False)))  # fsync's ack follows every earlier apply
    assert await asyncio.wait_for(link.conn.read(), 5) == Frame(2, m.Ack())
    assert (link.root / "d").is_dir()


async def test_an_escape_disconnects_with_a_logged_reason(
    link: Link, caplog: pytest.LogCaptureFixture, expected_logs: ExpectedLogs
) -> None:
    expected_logs.expect("Disconnecting replication peer .*crosses a symlink")
    caplog.set_level(logging.ERROR)
    await link.conn.send(Frame(1, m.Symlink(b"l", b"..", 0, 0)))
    await link.conn.send(Frame(2, m.Create(b"l/escaped", 0o644, 0, 0, 0)))
    await link.conn.send(Frame(3, m.Mkdir(b"after", 0o755, 0, 0)))
    while (frame := await asyncio.wait_for(link.conn.read(), 5)) is not None:
        assert frame.seq in (1, 2, 3)
    await asyncio.wait_for(link.server, 5)
    assert "crosses a symlink" in caplog.text
    assert not (link.root.parent / "escaped").exists()
    assert not (link.root / "after").exists()


async def test_garbage_disconnects_and_nothing_is_applied(
    link: Link, caplog: pytest.LogCaptureFixture, expected_logs: ExpectedLogs
) -> None:
    expected_logs.expect("Disconnecting replication peer .*not valid msgpack")
    caplog.set_level(logging.ERROR)
    link.conn.transport.write(b"\x00\x00\x00\x09\x00\x00\x00\x05\xc1garbage")
    assert await asyncio.wait_for(link.conn.read(), 5) is None
    assert "not valid msgpack" in caplog.text
    assert os.listdir(link.root) == []


async def test_a_sequence_jump_disconnects(
    link: Link, caplog: pytest.LogCaptureFixture, expected_logs: ExpectedLogs
) -> None:
    expected_logs.expect("Disconnecting replication peer .*sequence number 3 where 2 was due")
    caplog.set_level(logging.ERROR)
    await link.conn.send(Frame(1, m.Mkdir(b"a", 0o755, 0, 0)))
    await link.conn.send(Frame(3, m.Mkdir(b"b", 0o755, 0, 0)))
    while await asyncio.wait_for(link.conn.read(), 5) is not None:
        pass
    assert "sequence number 3 where 2 was due" in caplog.text
    assert not (link.root / "b").exists()


async def test_close_applies_what_was_received_then_ends_cleanly(link: Link) -> None:
    await link.conn.send(Frame(1, m.Mkdir(b"d", 0o755, 0, 0)))
    assert await asyncio.wait_for(link.conn.read(), 5) == Frame(1, m.Ack())
    await asyncio.wait_for(link.receiver.close(), 5)
    assert await asyncio.wait_for(link.conn.read(), 5) is None
    await asyncio.wait_for(link.server, 5)
    assert (link.root / "d").is_dir()


async def test_frames_received_before_a_reset_are_applied(link: Link, expected_logs: ExpectedLogs) -> None:
    expected_logs.expect(r"Replication connection from .* lost")
    link.conn.send_nowait(Frame(1, m.Create(b"kept", 0o644, 0, 0, 0)))
    for i in range(200):
        link.conn.send_nowait(Frame(i + 2, m.Write(b"kept", i * 4096, b"w" * 4096)))
    await link.conn.drain()
    last = await asyncio.wait_for(_ack_of(link.conn, 201), 5)
    assert last == m.Ack()
    # A killed primary: RST with the acks unread; everything acknowledged must still be applied.
    link.conn.abort()
    await asyncio.wait_for(link.server, 5)
    assert (link.root / "kept").read_bytes() == b"w" * 4096 * 200
    assert link.receiver.applier.applied_seq == 201


async def _ack_of(conn: FrameConnection, seq: int) -> m.Message:
    while True:
        frame = await conn.read()
        assert frame is not None
        if frame.seq == seq:
            return frame.msg
