"""The agent's side of the control channel: one replicator process per replicated directory.

The replicator reports on its stdout, one JSON object per line (docs/dev/replication.md, control
channel v1): ``mounted``, ``peer`` with a state, ``error``, ``stopped``. The supervisor spawns it,
keeps the latest of those facts for the reconcile loop to read, and stops it with SIGTERM, then
SIGKILL and a lazy unmount, so that no dead mount is ever left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agent.replication import syscalls

log = logging.getLogger("tandem.replication")
Role = Literal["primary", "secondary"]
_COMMAND = (sys.executable, "-m", "agent.replication.replicator")
MOUNT_DEADLINE = 20.0
STOP_DEADLINE = 15.0


class ReplicatorError(Exception):
    """The replicator could not start or failed; the message names the directory and the cause."""


class Spares:
    """One replicator interpreter started ahead of time, its imports done, waiting for a command line.

    A new Python process spends ~0.35 s importing (pyfuse3 and trio, asyncio, the codec) before it
    can mount: on a takeover that is most of the time after detection. The spare has paid it already.
    """

    def __init__(self) -> None:
        self._spawning: asyncio.Task[asyncio.subprocess.Process] | None = None

    def refill(self) -> None:
        """Start a spare in the background unless one is there."""
        if self._spawning is None:
            self._spawning = asyncio.create_task(self._spawn(), name="replicator-spare")

    @staticmethod
    async def _spawn() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *_COMMAND,
            "--spare",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )

    async def take(self) -> asyncio.subprocess.Process | None:
        """The spare, if one is alive (and another one starts); None: spawn the usual way."""
        spawning, self._spawning = self._spawning, None
        self.refill()
        if spawning is None:
            return None
        try:
            proc = await spawning
        except OSError as exc:
            log.warning("A spare replicator could not start: %s", exc)
            return None
        return proc if proc.returncode is None else None

    async def aclose(self) -> None:
        """Let the spare go: its stdin closes and it exits without doing anything."""
        spawning, self._spawning = self._spawning, None
        if spawning is None:
            return
        with contextlib.suppress(OSError):
            proc = await spawning
            if proc.stdin is not None:
                proc.stdin.close()
            await _wait_or_kill(proc, proc.kill)


@dataclass
class ReplicationStatus:
    """What the replicator last said about its peer."""

    state: str = "starting"  # connecting, syncing, in-sync, connected, disconnected, stopped, failed
    remaining_bytes: int = 0
    remaining_files: int = 0
    was_in_sync: bool | None = None  # secondary: whether it was in sync when the primary went away
    error: str = ""
    mounted: bool = False


@dataclass
class Replicator:
    directory: Path
    role: Role
    node: str
    peer: tuple[str, int] | None = None  # primary: the secondary's listener
    listen: tuple[str, int] | None = None  # secondary: where the primary connects
    ack: str = "received"
    exclude: tuple[str, ...] = ()  # primary: ReplicatedDir.exclude (agent/replication/exclude.py)
    keep_cpus_awake: bool = True
    secret_file: Path | None = None
    log_path: Path | None = None
    spares: Spares | None = None
    status: ReplicationStatus = field(default_factory=ReplicationStatus)
    _proc: asyncio.subprocess.Process | None = None
    _reader: asyncio.Task[None] | None = None
    _mounted: asyncio.Event = field(default_factory=asyncio.Event)

    def argv(self) -> list[str]:
        """The replicator's command line (the interpreter and module first)."""
        return [*_COMMAND, *self.args()]

    def args(self) -> list[str]:
        """The replicator's arguments."""
        argv = [
            "--role",
            self.role,
            "--dir",
            str(self.directory),
            "--node",
            self.node,
        ]
        if self.role == "primary":
            assert self.peer is not None
            argv += ["--peer", f"{self.peer[0]}:{self.peer[1]}", "--ack", self.ack]
            argv += [f"--exclude={pattern}" for pattern in self.exclude]
        else:
            assert self.listen is not None
            argv += ["--listen", f"{self.listen[0]}:{self.listen[1]}"]
        if self.secret_file is not None:
            argv += ["--secret-file", str(self.secret_file)]
        if not self.keep_cpus_awake:
            argv += ["--keep-cpus-awake", "0"]
        return argv

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        """Spawn the replicator and wait until its mount is ready; raise ``ReplicatorError`` if it is not."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        spare = await self.spares.take() if self.spares is not None else None
        if spare is not None and spare.stdin is not None:
            log_args = ["--log-file", str(self.log_path)] if self.log_path else []
            spare.stdin.write(json.dumps([*self.args(), *log_args]).encode() + b"\n")
            spare.stdin.close()
            self._proc = spare
        else:
            self._proc = await self._spawn()
        self._reader = asyncio.create_task(self._read_events(), name=f"replicator-{self.directory}")
        waiting = asyncio.create_task(self._mounted.wait())
        done, _ = await asyncio.wait({waiting, self._reader}, timeout=MOUNT_DEADLINE, return_when="FIRST_COMPLETED")
        if waiting not in done:
            waiting.cancel()
            await self.stop()
            cause = self.status.error or "it did not report its mount in time"
            raise ReplicatorError(f"the {self.role} replicator of {self.directory} did not start: {cause}")
        log.info("Replicator started. dir=%s role=%s pid=%d", self.directory, self.role, self._proc.pid)

    async def _spawn(self) -> asyncio.subprocess.Process:
        stderr = open(self.log_path, "ab") if self.log_path else asyncio.subprocess.DEVNULL  # noqa: SIM115
        try:
            return await asyncio.create_subprocess_exec(
                *self.argv(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                start_new_session=True,
            )
        finally:
            if self.log_path:
                stderr.close()  # type: ignore[union-attr]

    async def _read_events(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        async for line in self._proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                log.warning(
                    "The replicator wrote a line that is not an event. dir=%s line=%r", self.directory, line[:200]
                )
                continue
            self._take(event)
        code = await self._proc.wait()
        if self.status.state != "stopped":
            self.status.state = "failed"
            self.status.error = self.status.error or f"the replicator exited with status {code}"
            log.error("The replicator exited. dir=%s role=%s status=%s", self.directory, self.role, code)

    def _take(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "mounted":
            self.status.mounted = True
            self._mounted.set()
        elif kind == "peer":
            previous = self.status.state
            self.status.state = str(event.get("state", "unknown"))
            self.status.remaining_bytes = int(event.get("remainingBytes", 0) or 0)
            self.status.remaining_files = int(event.get("remainingFiles", 0) or 0)
            if "wasInSync" in event:
                self.status.was_in_sync = bool(event["wasInSync"])
            if self.status.state != previous:
                log.info(
                    "Replication changed. dir=%s role=%s from=%s to=%s%s",
                    self.directory,
                    self.role,
                    previous,
                    self.status.state,
                    f" reason={event['reason']}" if event.get("reason") else "",
                )
        elif kind == "error":
            self.status.error = str(event.get("message", ""))
            log.error("Replication error. dir=%s role=%s error=%s", self.directory, self.role, self.status.error)
        elif kind == "stopped":
            self.status.state, self.status.mounted = "stopped", False

    def peer_lost(self) -> None:
        """The agent's membership declared the peer lost: a mounted primary ends its stream now
        (SIGUSR1), and the writes waiting for the peer's acks complete locally at once instead of
        after the peer timeout."""
        proc = self._proc
        if self.role == "primary" and self.status.mounted and proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGUSR1)

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL and a lazy unmount if it does not stop in time."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            if await _wait_or_kill(proc, lambda: os.killpg(proc.pid, signal.SIGKILL)):
                log.error(
                    "The replicator did not stop in %gs; killed it. dir=%s pid=%d",
                    STOP_DEADLINE,
                    self.directory,
                    proc.pid,
                )
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await _lazy_unmount(self.directory)
        self.status.state, self.status.mounted = "stopped", False


async def _wait_or_kill(proc: asyncio.subprocess.Process, kill: Callable[[], None]) -> bool:
    """Wait up to STOP_DEADLINE for the process to end, then ``kill`` it; True when it had to be killed."""
    try:
        await asyncio.wait_for(proc.wait(), STOP_DEADLINE)
        return False
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            kill()
        await proc.wait()
        return True


async def _lazy_unmount(directory: Path) -> None:
    """Detach a mount a killed replicator left at ``directory``, if any."""
    if (syscalls.mount_type(str(directory)) or "").startswith("fuse"):
        proc = await asyncio.create_subprocess_exec("fusermount3", "-u", "-z", str(directory))
        await proc.wait()
        log.warning("Lazily unmounted a mount left by a replicator. dir=%s", directory)
