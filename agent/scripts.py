"""Running the user's module scripts: one process group each, output in the application log, timeouts that kill.

A script runs in a new session (its own process group), so a timeout or a cancellation can kill everything it
started. A script that exits normally leaves its group alone: a start script that put the application in the
background must not take it down when it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

log = logging.getLogger("tandem.scripts")

StopMode = Literal["graceful", "force"]
Outcome = Literal["succeeded", "failed", "timed out", "not run"]

SHELL = "/bin/sh"
MAX_LINE = 64 * 1024
# After the script exits, how long its output may still arrive before a background child keeps the pipe.
DRAIN_SECONDS = 0.2


@dataclass(frozen=True)
class ScriptResult:
    """What became of one run of one script, in terms an operator can act on."""

    script: str
    outcome: Outcome
    message: str
    exit_code: int | None = None
    duration: float = 0.0
    pid: int | None = None

    @property
    def ok(self) -> bool:
        """True when the script ran and exited with status 0."""
        return self.outcome == "succeeded"


@dataclass(frozen=True)
class StopResult:
    """The graceful run of a stop script, and the forced run if the graceful one did not succeed."""

    graceful: ScriptResult
    force: ScriptResult | None = None

    @property
    def ok(self) -> bool:
        """True when one of the runs stopped the application cleanly."""
        return self.graceful.ok or (self.force is not None and self.force.ok)

    @property
    def message(self) -> str:
        """One sentence covering both runs."""
        if self.force is None:
            return self.graceful.message
        return f"{self.graceful.message}; then {self.force.message}"


class ScriptRunner:
    """Runs one module's scripts on this node and copies their output into the module's application log."""

    def __init__(self, *, module: str, node: str, app_log: Path, kill_grace: float = 5.0) -> None:
        self.module = module
        self.node = node
        self.app_log = app_log
        self.kill_grace = kill_grace
        self._lingering: set[asyncio.Task[None]] = set()

    async def run(
        self, name: str, command: str, *, role: str, timeout: float, stop_mode: StopMode = "graceful"
    ) -> ScriptResult:
        """Run one script to its end or its timeout; cancelling the caller kills the script's process group."""
        argv, problem = _argv(command)
        if problem is not None:
            return self._not_run(name, problem)
        try:
            with self.app_log.open("ab"):
                pass
        except OSError as exc:
            return self._not_run(name, f"cannot open the application log {self.app_log}: {exc.strerror}")
        return await self._spawn_and_wait(name, argv, role=role, timeout=timeout, stop_mode=stop_mode)

    async def stop(
        self, name: str, command: str, *, role: str, graceful_timeout: float, force_timeout: float
    ) -> StopResult:
        """Run a stop script gracefully, then forced if that did not succeed; never hangs past both timeouts."""
        graceful = await self.run(name, command, role=role, timeout=graceful_timeout, stop_mode="graceful")
        if graceful.ok or graceful.outcome == "not run":
            return StopResult(graceful)
        log.warning(
            "Graceful stop did not succeed, running the script again in force mode. module=%s node=%s script=%s "
            "outcome=%s",
            self.module,
            self.node,
            name,
            graceful.outcome,
        )
        force = await self.run(name, command, role=role, timeout=force_timeout, stop_mode="force")
        return StopResult(graceful, force)

    async def aclose(self) -> None:
        """Stop copying output of background processes that outlived their script."""
        for task in list(self._lingering):
            task.cancel()
        await asyncio.gather(*self._lingering, return_exceptions=True)

    def environment(self, *, role: str, stop_mode: StopMode) -> dict[str, str]:
        """The daemon's environment plus what the scripts contract promises."""
        return os.environ | {
            "TANDEM_MODULE": self.module,
            "TANDEM_NODE": self.node,
            "TANDEM_ROLE": role,
            "TANDEM_STOP_MODE": stop_mode,
        }

    async def _spawn_and_wait(
        self, name: str, argv: list[str], *, role: str, timeout: float, stop_mode: StopMode
    ) -> ScriptResult:
        loop = asyncio.get_running_loop()
        started = loop.time()
        spawned = await self._spawn(argv, self.environment(role=role, stop_mode=stop_mode))
        if isinstance(spawned, str):
            return self._not_run(name, spawned)
        proc, out_r, err_r = spawned
        facts = f"({_describe(argv)}) role={role} stopMode={stop_mode} timeout={timeout:g}s"
        _write_line(self.app_log, name, proc.pid, "tandem", f"started {facts}")
        copiers = [
            asyncio.create_task(_copy_lines(out_r, self.app_log, name, proc.pid, "stdout")),
            asyncio.create_task(_copy_lines(err_r, self.app_log, name, proc.pid, "stderr")),
        ]
        try:
            async with asyncio.timeout(timeout):
                code = await proc.wait()
        except TimeoutError:
            await _kill_group(proc, self.kill_grace)
            result = self._finished(name, proc, "timed out", loop.time() - started, timeout=timeout)
        except BaseException:
            await _kill_group(proc, self.kill_grace)
            await self._drain(copiers)
            _write_line(self.app_log, name, proc.pid, "tandem", f"{name} was cancelled and its process group killed")
            log.info(
                "Script cancelled, its process group was killed. module=%s node=%s script=%s pid=%d",
                self.module,
                self.node,
                name,
                proc.pid,
            )
            raise
        else:
            outcome: Outcome = "succeeded" if code == 0 else "failed"
            result = self._finished(name, proc, outcome, loop.time() - started, timeout=timeout)
        await self._drain(copiers)
        _write_line(self.app_log, name, proc.pid, "tandem", result.message)
        return result

    async def _spawn(self, argv: list[str], env: dict[str, str]) -> tuple[asyncio.subprocess.Process, int, int] | str:
        """Start the script in a new session with its output on two pipes; or say why it could not start."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            # Our own pipes, not asyncio's: with PIPE, Process.wait() also waits for every background child
            # that inherited stdout to close it, i.e. forever for a start script that launches a daemon.
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            os.close(out_r)
            os.close(err_r)
            return f"cannot execute {_describe(argv)}: {exc.strerror}"
        finally:
            os.close(out_w)
            os.close(err_w)
        return proc, out_r, err_r

    async def _drain(self, copiers: list[asyncio.Task[None]]) -> None:
        """Wait briefly for the last output; a background child still holding the pipe keeps it being copied."""
        _done, pending = await asyncio.wait(copiers, timeout=DRAIN_SECONDS)
        for task in pending:
            self._lingering.add(task)
            task.add_done_callback(self._lingering.discard)

    def _finished(
        self, name: str, proc: asyncio.subprocess.Process, outcome: Outcome, duration: float, *, timeout: float
    ) -> ScriptResult:
        code = proc.returncode
        if outcome == "timed out":
            message = f"{name} timed out after {timeout:g}s and its process group was killed"
        elif outcome == "succeeded":
            message = f"{name} succeeded in {duration:.2f}s"
        elif code is not None and code < 0:
            message = f"{name} was killed by signal {signal.Signals(-code).name} after {duration:.2f}s"
        else:
            message = f"{name} failed with exit code {code} after {duration:.2f}s"
        level = logging.INFO if outcome == "succeeded" else logging.WARNING
        log.log(
            level,
            "Script %s. module=%s node=%s script=%s outcome=%s exit_code=%s duration=%.3fs pid=%d",
            message,
            self.module,
            self.node,
            name,
            outcome,
            code,
            duration,
            proc.pid,
        )
        return ScriptResult(name, outcome, message, exit_code=code, duration=duration, pid=proc.pid)

    def _not_run(self, name: str, problem: str) -> ScriptResult:
        message = f"{name} was not run: {problem}"
        log.error("Script %s. module=%s node=%s script=%s outcome=not-run", message, self.module, self.node, name)
        return ScriptResult(name, "not run", message)


def _argv(command: str) -> tuple[list[str], str | None]:
    """The command line for a script value, or why it cannot run."""
    if not command.startswith("/"):
        return [SHELL, "-c", command], None
    try:
        st = os.stat(command)
    except FileNotFoundError:
        return [], f"{command} does not exist"
    except OSError as exc:
        return [], f"cannot read {command}: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return [], f"{command} is not a regular file"
    if not os.access(command, os.X_OK):
        return [], f"{command} is not executable (chmod +x {command})"
    return [command], None


def _describe(argv: list[str]) -> str:
    return "inline shell" if argv[0] == SHELL and len(argv) == 3 else argv[0]


async def _kill_group(proc: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM the script's process group, then SIGKILL whatever of it is left after the grace period."""
    pgid = proc.pid  # start_new_session makes the script the leader of a group with its own pid
    try:
        if not _signal_group(pgid, signal.SIGTERM):
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _signal_group(pgid, 0) and _has_live_member(pgid):
            await asyncio.sleep(0.05)
    finally:
        _signal_group(pgid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            await asyncio.shield(proc.wait())


def _signal_group(pgid: int, sig: int) -> bool:
    """Send a signal to a process group; False once the group has no member left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        # A member changed its credentials (setuid): there is nothing more a signal can do.
        return False
    return True


def _has_live_member(pgid: int) -> bool:
    """True while a process of the group is still running; zombies waiting for init to reap them do not count."""
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            fields = stat.rpartition(")")[2].split()  # after "pid (comm)": state, ppid, pgrp, ...
            if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
                return True
    return False


async def _copy_lines(fd: int, app_log: Path, name: str, pid: int, stream: str) -> None:
    """Append each line read from a pipe to the application log, stamped and labelled."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    pending = b""
    try:
        with app_log.open("ab", buffering=0) as out:
            while chunk := await reader.read(MAX_LINE):
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    _append(out, name, pid, stream, line.decode(errors="replace"))
                if len(pending) >= MAX_LINE:
                    _append(out, name, pid, stream, pending.decode(errors="replace"))
                    pending = b""
            if pending:
                _append(out, name, pid, stream, pending.decode(errors="replace"))
    finally:
        transport.close()


def _write_line(app_log: Path, name: str, pid: int, stream: str, text: str) -> None:
    """Append one line of Tandem's own to the application log."""
    with app_log.open("ab", buffering=0) as out:
        _append(out, name, pid, stream, text)


def _append(out: BinaryIO, name: str, pid: int, stream: str, text: str) -> None:
    """One stamped line in a single write, so that concurrent scripts never interleave within a line."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
    out.write(f"{stamp} {name}[{pid}] {stream}: {text}\n".encode())
