"""The agent's supervisor: a replicator started from a spare interpreter, logs, stop, no process left."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.replication.supervisor import Replicator, Spares
from controller.demo import pid_alive
from tests.integration.replication.pairs import free_port, mounted


async def test_a_replicator_started_from_a_spare_mounts_logs_and_stops(tmp_path: Path) -> None:
    spares = Spares()
    spares.refill()
    directory, log = tmp_path / "data", tmp_path / "logs" / "data.replicator.log"
    replicator = Replicator(
        directory=directory,
        role="secondary",
        node="node2",
        listen=("127.0.0.1", free_port()),
        log_path=log,
        spares=spares,
    )
    try:
        await replicator.start()  # the spare takes this command line; another spare starts
        assert replicator.status.mounted and mounted(directory)
        assert replicator._proc is not None
        pid = replicator._proc.pid
    finally:
        await replicator.stop()
        await spares.aclose()
    assert not mounted(directory)
    assert not pid_alive(pid)
    assert "Secondary listening on 127.0.0.1" in log.read_text()  # its stderr went to the log file


async def test_a_spare_let_go_exits_without_doing_anything() -> None:
    spares = Spares()
    spares.refill()
    proc = await spares.take()
    assert proc is not None and proc.stdin is not None
    proc.stdin.close()
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    await spares.aclose()  # the refill take() started
