"""Idle CPUs poll while replication traffic flows: the PM QoS request of awake.Awake, on the real device."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path

import pytest

from agent.replication import awake
from agent.replication.awake import Awake
from tests.daemons import wait_for
from tests.integration.replication.pairs import Pair

pytestmark = pytest.mark.skipif(not os.path.exists(awake.DEVICE), reason=f"{awake.DEVICE} is missing")


async def _until(check: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.01)
    return False


async def test_touch_asks_for_polling_until_hold_seconds_after_the_last_touch() -> None:
    before = awake.current()
    assert before > 0, "another process already asks for polling: this test cannot see its own request"
    with Awake(hold=0.2) as request:
        assert request.requested and not request.active
        assert awake.current() == before  # opened, constraining nothing yet
        request.touch()
        assert request.active and awake.current() == 0
        for _ in range(5):  # touched every 0.1 s for 0.5 s: still held
            await asyncio.sleep(0.1)
            request.touch()
            assert awake.current() == 0
        assert await _until(lambda: awake.current() == before)
        assert not request.active
        request.touch()  # traffic again: asked again
        assert awake.current() == 0
    assert awake.current() == before  # closing drops the request at once


async def test_hold_zero_never_asks() -> None:
    before = awake.current()
    with Awake(hold=0) as request:
        request.touch()
        assert not request.requested and awake.current() == before


async def test_a_kernel_without_the_device_or_refusing_it_is_logged_and_touch_does_nothing(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.INFO, logger="agent.replication.awake")
    for device, cause in ((str(tmp_path / "missing"), "No such file"), ("/dev/full", "No space left")):
        with Awake(hold=0.1, device=device) as request:
            request.touch()
            assert not request.requested and not request.active
        assert any(device in r.getMessage() and cause in r.getMessage() for r in caplog.records), caplog.text


def _write_for(path: Path, seconds: float) -> bool:
    """Write and fsync through the mount for `seconds`; whether polling was asked at any point."""
    seen = False
    deadline = time.monotonic() + seconds
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while time.monotonic() < deadline:
            os.pwrite(fd, b"x" * 4096, 0)
            os.fsync(fd)
            seen = seen or awake.current() == 0
    finally:
        os.close(fd)
    return seen


def test_replicators_ask_for_polling_while_writes_flow_and_release_it_after(pair: Pair) -> None:
    before = awake.current()
    pair.start("received")
    assert "Idle CPUs poll while replication traffic flows" in pair.log("primary") + pair.log("secondary")
    assert _write_for(pair.primary_dir / "f", 0.5)
    wait_for("idle again: the PM QoS request released", lambda: awake.current() == before, timeout=5)


def test_requests_that_ship_nothing_ask_too(pair: Pair) -> None:
    before = awake.current()
    pair.start("received")
    target = pair.primary_dir / "f"
    target.write_bytes(b"x")
    time.sleep(0.1)  # the write's request and frame are 10 ms behind: released
    assert awake.current() == before
    seen = False
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline and not seen:
        with contextlib.suppress(OSError):  # ENODATA: a GETXATTR request, nothing shipped
            os.getxattr(target, "user.absent")
        seen = awake.current() == 0
    assert seen


def test_keep_cpus_awake_zero_never_asks(pair: Pair) -> None:
    before = awake.current()
    pair.extra = ["--keep-cpus-awake", "0"]
    pair.start("received")
    assert not _write_for(pair.primary_dir / "f", 0.5)
    assert awake.current() == before
