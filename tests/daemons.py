"""Real tandemd processes for tests: started with their own state dir, stopped by PID, always."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from controller.daemon import command_line

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]


def inert_manifest(path: Path) -> str:
    """An example manifest with its modules not started at boot.

    Daemons in these tests run on this machine itself, not in a lab: a module that started would put
    its virtual IP on the machine's real interface and run the example's scripts here.
    """
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for doc in docs:
        if doc["kind"] == "Module":
            doc["spec"]["bootStart"] = False
    return yaml.safe_dump_all(docs, sort_keys=False)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for(what: str, probe: Callable[[], T | None], *, timeout: float = 20.0, interval: float = 0.05) -> T:
    """Poll ``probe`` until it returns something other than None/False, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = probe()
            if value:
                return value
        except Exception as exc:  # the probe may fail until the condition holds
            last = exc
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last error: {last})" if last else "")
    )


def process_state(pid: int, tid: int | None = None) -> str:
    """The state letter of a process, or of one of its threads, in /proc ('T' stopped, 'Z' zombie); '' if gone."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        return Path(path).read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def freeze(pid: int, within: float = 5.0) -> None:
    """SIGSTOP a process; return once every one of its threads is stopped.

    kill() only queues the stop: one thread starts the group stop when it next runs, and until each
    thread has stopped it goes on (a replicator's C thread can still answer a frame that reaches it,
    while its main thread waits for the disk or for a CPU).
    """
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + within
    while any(process_state(pid, int(t.name)) not in ("T", "Z", "") for t in Path(f"/proc/{pid}/task").glob("*")):
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} did not stop within {within:.0f} s of SIGSTOP")
        time.sleep(0.002)


def tandem(*args: str, server: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real CLI as a user would."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if server:
        env["TANDEM_SERVER"] = server
    proc = subprocess.run(
        [sys.executable, "-m", "controller.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"tandem {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


class Daemon:
    """One node's tandemd on its own loopback address (its heartbeats bind there) and its own port."""

    def __init__(
        self, node: str, state_dir: Path, port: int, *, address: str = "127.0.0.1", store: str = "embedded"
    ) -> None:
        self.node, self.state_dir, self.port, self.address, self.store = node, state_dir, port, address, store
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    def start(self) -> Daemon:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        out = open(self.state_dir / "daemon.out", "ab")  # noqa: SIM115 - owned by the child process
        self.proc = subprocess.Popen(
            command_line(
                node=self.node, state_dir=self.state_dir, listen=f"{self.address}:{self.port}", store=self.store
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        out.close()
        wait_for(f"{self.node} to answer /healthz", self._healthy)
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.node} exited with {self.proc.returncode}: {self.output()[-2000:]}")
        return self.get("/healthz")["status"] == "ok"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=5) as response:
            return json.loads(response.read())

    def get_or_none(self, path: str) -> Any:
        try:
            return self.get(path)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def output(self) -> str:
        path = self.state_dir / "daemon.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
