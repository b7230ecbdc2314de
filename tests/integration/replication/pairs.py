"""Two replicator processes on 127.0.0.1 for tests and benchmarks: started, stopped and unmounted by PID."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]


def mounted(path: Path) -> bool:
    """Whether a mount point sits at `path` (from /proc/mounts)."""
    target = str(path).replace(" ", "\\040")
    return any(line.split()[1] == target for line in Path("/proc/mounts").read_text().splitlines())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unmount(path: Path) -> None:
    """Unmount, falling back to a lazy unmount if the mount is busy or its daemon is gone."""
    if mounted(path):
        subprocess.run(["fusermount3", "-u", str(path)], check=False, capture_output=True)
    if mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False, capture_output=True)


@dataclass
class Pair:
    """A primary and a secondary replicator over two directories of one machine."""

    primary_dir: Path
    secondary_dir: Path
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    port: int = 0
    ack: str = "received"
    secret: Path | None = None
    # More arguments for both replicators.
    extra: list[str] = field(default_factory=list)
    # The address the secondary listens on and the primary connects to.
    host: str = "127.0.0.1"
    # Role -> the network namespace (its name under /run/netns) the replicator runs in; its mounts
    # stay in this mount namespace, where the test sees them.
    netns: dict[str, str] = field(default_factory=dict)

    def start(self, ack: str, secret: Path | None = None, *, secondary_mount: bool = True) -> None:
        """Start both replicators and wait until the primary has resynced the secondary and is in sync
        (events of earlier runs, which the events files keep, do not count)."""
        after = len(self.events("primary"))
        self.start_secondary(ack, secret, mount=secondary_mount)
        self.start_primary()
        self.wait_in_sync(after)

    def start_secondary(self, ack: str = "received", secret: Path | None = None, *, mount: bool = True) -> None:
        """Start (or restart, on the same port) the secondary and wait for it to listen."""
        self.port, self.ack, self.secret = self.port or free_port(), ack, secret
        cmd = ["--role", "secondary", "--dir", str(self.secondary_dir), "--listen", f"{self.host}:{self.port}"]
        after = len(self.events("secondary"))
        self._spawn("secondary", [*cmd, "--node", "node2", *self._auth(), *([] if mount else ["--no-mount"])])
        self.wait_event("secondary", lambda e: e["event"] == "listening", after=after)

    def start_primary(self) -> None:
        """Start the primary (which mounts at once, whether the secondary runs or not) and wait for its mount."""
        self.port = self.port or free_port()
        cmd = ["--role", "primary", "--dir", str(self.primary_dir), "--peer", f"{self.host}:{self.port}"]
        after = len(self.events("primary"))
        self._spawn("primary", [*cmd, "--ack", self.ack, "--node", "node1", *self._auth()])
        self.wait_event("primary", lambda e: e["event"] == "mounted", after=after)
        assert mounted(self.primary_dir)

    def _auth(self) -> list[str]:
        return ["--secret-file", str(self.secret)] if self.secret else []

    def events(self, role: str) -> list[dict[str, Any]]:
        """Every event the replicator wrote on stdout so far."""
        path = self.logs / f"{role}.events"
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(line) for line in lines if line.endswith("}")]

    def wait_event(
        self, role: str, match: Callable[[dict[str, Any]], bool], timeout: float = 30, after: int = 0
    ) -> dict[str, Any]:
        """Wait for an event (from index `after` on) that matches; fail if the process exits first."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events(role)[after:]:
                if match(event):
                    return event
            proc = self.procs[role]
            if proc.poll() is not None and not any(match(e) for e in self.events(role)[after:]):
                raise RuntimeError(f"{role} replicator exited with {proc.returncode}: {self.log(role)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no matching {role} event: {self.events(role)} {self.log(role)}")
            time.sleep(0.05)

    def wait_in_sync(self, after: int = 0, timeout: float = 60) -> dict[str, Any]:
        """Wait until the primary reports the peer in sync (from event index `after` on)."""
        return self.wait_event("primary", lambda e: e.get("state") == "in-sync", timeout, after)

    def _spawn(self, role: str, cmd: list[str]) -> None:
        # Logs (stderr) and events (stdout) append, so a restarted replicator keeps the earlier ones.
        err = open(self.logs / f"{role}.log", "ab")  # noqa: SIM115 - closed with the process
        out = open(self.logs / f"{role}.events", "ab")  # noqa: SIM115
        full = [sys.executable, "-m", "agent.replication.replicator", *cmd, *self.extra]
        if role in self.netns:
            # nsenter execs the replicator itself, so the PID kept here is the replicator's.
            full = ["nsenter", f"--net=/run/netns/{self.netns[role]}", *full]
        self.procs[role] = subprocess.Popen(full, cwd=REPO, stdout=out, stderr=err)
        out.close()
        err.close()

    def pid(self, role: str) -> int:
        return self.procs[role].pid

    def log(self, role: str) -> str:
        path = self.logs / f"{role}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, role: str, timeout: float = 20) -> int | None:
        """SIGTERM one replicator by PID (SIGKILL if it does not exit in time), then make sure it is unmounted."""
        proc = self.procs.get(role)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        unmount(self.primary_dir if role == "primary" else self.secondary_dir)
        return proc.returncode

    def kill(self, role: str) -> None:
        """SIGKILL one replicator by PID (its FUSE mount stays behind until unmount)."""
        proc = self.procs[role]
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)

    def close(self) -> None:
        """Stop everything this pair started and leave no mount behind, whatever happened before."""
        try:
            self.stop("primary")
        finally:
            unmount(self.primary_dir)
            try:
                self.stop("secondary")
            finally:
                unmount(self.secondary_dir)
