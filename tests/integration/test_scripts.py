"""The script runner against real /bin/sh processes: environment, output, exit codes, timeouts and cancellation."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.scripts import ScriptRunner
from tests.conftest import ExpectedLogs
from tests.daemons import process_state

SHORT = 0.3  # a timeout the hanging scripts below always exceed


@pytest.fixture
async def runner(tmp_path: Path) -> AsyncIterator[ScriptRunner]:
    runner = ScriptRunner(module="web", node="node1", app_log=tmp_path / "web.app.log", kill_grace=0.5)
    yield runner
    await runner.aclose()


def app_log(runner: ScriptRunner) -> list[str]:
    return runner.app_log.read_text().splitlines()


def gone(pid: int) -> bool:
    """True when the process no longer exists or is a zombie waiting for init to reap it."""
    return process_state(pid) in ("Z", "X", "")


async def wait_until_gone(pid: int, deadline: float = 5.0) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while loop.time() < end:
        if gone(pid):
            return True
        await asyncio.sleep(0.02)
    return gone(pid)


async def read_pid(path: Path, deadline: float = 5.0) -> int:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while loop.time() < end:
        text = path.read_text().strip() if path.exists() else ""
        if text.endswith("\n") or text.isdigit():
            return int(text)
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} was never written")


def make_executable(path: Path, body: str, mode: int = 0o755) -> str:
    path.write_text(body)
    path.chmod(mode)
    return str(path)


async def test_scripts_see_the_tandem_environment(runner: ScriptRunner, tmp_path: Path) -> None:
    out = tmp_path / "env.txt"
    os.environ["TANDEM_TEST_INHERITED"] = "yes"
    try:
        command = f'echo "$TANDEM_MODULE $TANDEM_NODE $TANDEM_ROLE $TANDEM_STOP_MODE $TANDEM_TEST_INHERITED" > {out}'
        result = await runner.run("stopPrim", command, role="prim", timeout=10, stop_mode="force")
    finally:
        del os.environ["TANDEM_TEST_INHERITED"]
    assert result.ok, result.message
    assert out.read_text() == "web node1 prim force yes\n"


async def test_inline_and_path_scripts_both_run_and_log_their_output(runner: ScriptRunner, tmp_path: Path) -> None:
    path = make_executable(tmp_path / "start.sh", "#!/bin/sh\necho started from a file\necho to stderr >&2\n")
    inline = await runner.run("prestart", "echo hello from inline; echo second line", role="second", timeout=10)
    from_file = await runner.run("startPrim", path, role="prim", timeout=10)
    assert inline.ok and from_file.ok, (inline.message, from_file.message)
    assert inline.exit_code == 0 and from_file.exit_code == 0
    lines = app_log(runner)
    assert any(line.endswith(f"prestart[{inline.pid}] stdout: hello from inline") for line in lines), lines
    assert any(line.endswith(f"prestart[{inline.pid}] stdout: second line") for line in lines), lines
    assert any(line.endswith(f"startPrim[{from_file.pid}] stdout: started from a file") for line in lines), lines
    assert any(line.endswith(f"startPrim[{from_file.pid}] stderr: to stderr") for line in lines), lines
    assert all(line[:4].isdigit() and line[19] == "." and " " in line for line in lines), "every line is stamped"


async def test_a_failing_script_reports_its_exit_code(runner: ScriptRunner, expected_logs: ExpectedLogs) -> None:
    expected_logs.expect(r"startBoth failed with exit code 3")
    result = await runner.run("startBoth", "echo about to fail; exit 3", role="both", timeout=10)
    assert result.outcome == "failed"
    assert result.exit_code == 3
    assert "exit code 3" in result.message
    assert result.duration >= 0


async def test_a_hanging_script_is_killed_with_its_whole_group(
    runner: ScriptRunner, tmp_path: Path, expected_logs: ExpectedLogs
) -> None:
    expected_logs.expect(r"startPrim timed out")
    pids = tmp_path / "pids"
    # One child that dies on SIGTERM, one that ignores it and needs the SIGKILL after the grace period.
    command = f"sleep 1000 & echo $! >> {pids}; (trap '' TERM; sleep 1000) & echo $! >> {pids}; sleep 1000"
    result = await runner.run("startPrim", command, role="prim", timeout=SHORT)
    assert result.outcome == "timed out"
    assert "timed out" in result.message and "killed" in result.message
    children = [int(p) for p in pids.read_text().split()]
    assert len(children) == 2
    for pid in [result.pid, *children]:
        assert pid is not None and await wait_until_gone(pid), f"process {pid} survived the timeout"
    assert any("startPrim" in line and "timed out" in line for line in app_log(runner))


async def test_cancelling_the_task_kills_the_group(runner: ScriptRunner, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    command = f"sleep 1000 & echo $! > {pidfile}; sleep 1000"
    task = asyncio.create_task(runner.run("stopBoth", command, role="both", timeout=1000))
    child = await read_pid(pidfile)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await wait_until_gone(child), "the script's child survived the cancellation"
    assert any("stopBoth" in line and "cancelled" in line for line in app_log(runner))


async def test_a_daemon_started_in_the_background_outlives_its_script(runner: ScriptRunner, tmp_path: Path) -> None:
    pidfile = tmp_path / "daemon.pid"
    command = f"(echo daemon says hi; exec sleep 1000) & echo $! > {pidfile}; echo script done"
    result = await runner.run("startPrim", command, role="prim", timeout=10)
    daemon = int(pidfile.read_text())
    try:
        assert result.ok, result.message
        assert not gone(daemon), "a script that succeeded must leave what it started running"
        assert any(line.endswith("stdout: daemon says hi") for line in app_log(runner))
    finally:
        os.kill(daemon, signal.SIGKILL)


async def test_stop_falls_back_to_force_mode_when_graceful_hangs(
    runner: ScriptRunner, tmp_path: Path, expected_logs: ExpectedLogs
) -> None:
    expected_logs.expect(r"stopPrim timed out")
    expected_logs.expect(r"Graceful stop did not succeed")
    modes = tmp_path / "modes"
    command = f'echo "$TANDEM_STOP_MODE" >> {modes}; [ "$TANDEM_STOP_MODE" = force ] || sleep 1000'
    result = await runner.stop("stopPrim", command, role="prim", graceful_timeout=SHORT, force_timeout=10)
    assert result.graceful.outcome == "timed out"
    assert result.force is not None and result.force.ok
    assert result.ok
    assert modes.read_text().split() == ["graceful", "force"]


async def test_stop_ends_even_when_both_runs_hang(runner: ScriptRunner, expected_logs: ExpectedLogs) -> None:
    expected_logs.expect(r"stopPrim timed out")
    expected_logs.expect(r"Graceful stop did not succeed")
    result = await runner.stop("stopPrim", "sleep 1000", role="prim", graceful_timeout=SHORT, force_timeout=SHORT)
    assert not result.ok
    assert result.force is not None and result.force.outcome == "timed out"
    assert "timed out" in result.message


async def test_a_missing_script_is_an_error_naming_the_path(
    runner: ScriptRunner, tmp_path: Path, expected_logs: ExpectedLogs
) -> None:
    expected_logs.expect(r"was not run")
    missing = tmp_path / "nope.sh"
    result = await runner.run("startPrim", str(missing), role="prim", timeout=10)
    assert result.outcome == "not run"
    assert str(missing) in result.message and "does not exist" in result.message
    stop = await runner.stop("stopPrim", str(missing), role="prim", graceful_timeout=10, force_timeout=10)
    assert stop.force is None and stop.graceful.outcome == "not run"


async def test_a_non_executable_script_is_an_error_naming_the_path(
    runner: ScriptRunner, tmp_path: Path, expected_logs: ExpectedLogs
) -> None:
    expected_logs.expect(r"was not run")
    path = make_executable(tmp_path / "start.sh", "#!/bin/sh\necho hi\n", mode=0o644)
    result = await runner.run("startPrim", path, role="prim", timeout=10)
    assert result.outcome == "not run"
    assert path in result.message and "not executable" in result.message
    directory = await runner.run("startPrim", str(tmp_path), role="prim", timeout=10)
    assert directory.outcome == "not run" and "not a regular file" in directory.message


async def test_a_file_the_kernel_cannot_execute_is_an_error(
    runner: ScriptRunner, tmp_path: Path, expected_logs: ExpectedLogs
) -> None:
    expected_logs.expect(r"was not run")
    path = make_executable(tmp_path / "garbage", "\x7fELF not really\n")
    result = await runner.run("startPrim", path, role="prim", timeout=10)
    assert result.outcome == "not run"
    assert path in result.message and "cannot execute" in result.message
