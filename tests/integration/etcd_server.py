"""A real, throw-away etcd server on loopback for the store tests."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.daemons import freeze

ETCD = Path("/usr/bin/etcd")
LOOPBACK = "127.0.0.1"


class EtcdServer:
    """One etcd member with a fresh data dir, listening on free loopback ports until exit."""

    def __init__(self, *, ready_within: float = 20.0, stop_within: float = 5.0) -> None:
        if not ETCD.is_file():
            raise FileNotFoundError(
                f"{ETCD} is missing: install Debian's etcd-server package (apt-get install etcd-server)"
            )
        self.ready_within, self.stop_within = ready_within, stop_within
        self.client_port = self.peer_port = 0
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"etcd://{LOOPBACK}:{self.client_port}"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("etcd is not running: use EtcdServer as a context manager")
        return self._process.pid

    def __enter__(self) -> EtcdServer:
        self._dir = Path(tempfile.mkdtemp(prefix="tandem-etcd-"))
        try:
            self._start()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open but nothing answers.

        Returns once every thread of the server is stopped (tests.daemons.freeze).
        """
        freeze(self.pid)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Terminate the server by its PID (SIGTERM, then SIGKILL) and remove its data dir."""
        if self._process is not None:
            _terminate(self._process, self.stop_within)
            self._process = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _start(self) -> None:
        assert self._dir is not None
        self.client_port = self.peer_port = free_port()
        while self.peer_port == self.client_port:
            self.peer_port = free_port()
        client, peer = f"http://{LOOPBACK}:{self.client_port}", f"http://{LOOPBACK}:{self.peer_port}"
        command = [
            str(ETCD),
            "--name=test",
            f"--data-dir={self._dir / 'data'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=test={peer}",
            "--initial-cluster-state=new",
            "--logger=zap",
            "--log-outputs=stderr",
        ]
        with open(self._dir / "etcd.log", "wb") as log:
            # A session of its own so a Ctrl-C in the terminal reaches pytest, which stops etcd cleanly.
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_within
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"etcd exited with {self._process.returncode} at start:\n{self._log_tail()}")
            if _healthy(self.client_port):
                return
            time.sleep(0.1)
        raise TimeoutError(f"etcd did not answer on {self.url} within {self.ready_within:g} s:\n{self._log_tail()}")

    def _log_tail(self, lines: int = 20) -> str:
        assert self._dir is not None
        log = self._dir / "etcd.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _healthy(port: int) -> bool:
    """Whether etcd's /health answers true (it does once the member has a leader)."""
    # http.client, not urllib: it never goes through a proxy from the environment.
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=1)
    try:
        connection.request("GET", "/health")
        response = connection.getresponse()
        return response.status == 200 and b'"true"' in response.read()
    except OSError:
        return False
    finally:
        connection.close()


def _terminate(process: subprocess.Popen[bytes], within: float) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``within`` seconds; reap it either way."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGCONT)  # a paused etcd would never act on SIGTERM
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=within)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=within)
