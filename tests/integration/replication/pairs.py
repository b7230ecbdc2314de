"""Two replicator processes on 127.0.0.1 for tests and benchmarks: started, stopped and unmounted by PID."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

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

    def start(self, ack: str, secret: Path | None = None, *, secondary_mount: bool = True) -> None:
        """Start both replicators and wait until the primary (and the secondary, if asked) is mounted."""
        port = free_port()
        common = [sys.executable, "-m", "agent.replication.replicator"]
        auth = ["--secret-file", str(secret)] if secret else []
        mount = [] if secondary_mount else ["--no-mount"]
        secondary = ["--role", "secondary", "--dir", str(self.secondary_dir), "--listen", f"127.0.0.1:{port}"]
        primary = ["--role", "primary", "--dir", str(self.primary_dir), "--peer", f"127.0.0.1:{port}", "--ack", ack]
        self._spawn("secondary", [*common, *secondary, "--node", "node2", *auth, *mount])
        self._spawn("primary", [*common, *primary, "--node", "node1", *auth])
        self._wait_mounted(self.primary_dir)
        if secondary_mount:
            self._wait_mounted(self.secondary_dir)

    def _wait_mounted(self, path: Path) -> None:
        deadline = time.monotonic() + 20
        while not mounted(path):
            for role, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{role} replicator exited with {proc.returncode}: {self.log(role)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} was not mounted: {self.log('primary')}{self.log('secondary')}")
            time.sleep(0.05)

    def _spawn(self, role: str, cmd: list[str]) -> None:
        out = open(self.logs / f"{role}.log", "wb")  # noqa: SIM115 - closed with the process
        self.procs[role] = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        out.close()

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
