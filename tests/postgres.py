"""A PostgreSQL server from Debian's packages, run as the postgres user, for tests and benchmarks."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.integration.replication.pairs import free_port


def pg_bin() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian's layout), or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return found[-1].parent if found else None


class Postgres:
    """One PostgreSQL server run as the postgres user on a data dir, its socket and log outside the mount."""

    def __init__(self, bin_dir: Path, data: Path, run: Path) -> None:
        self.bin, self.data, self.run = bin_dir, data, run
        self.port = free_port()

    def _as_postgres(self, *cmd: str, timeout: float = 120, check: bool = True) -> str:
        done = subprocess.run(
            ["runuser", "-u", "postgres", "--", *cmd], capture_output=True, text=True, timeout=timeout, cwd="/"
        )
        if check:
            assert done.returncode == 0, f"{cmd[0]} failed: {done.stdout}{done.stderr}{self.server_log()}"
        return done.stdout

    def server_log(self) -> str:
        """The end of the server log."""
        log = self.run / "postgres.log"
        return log.read_text(errors="replace")[-4000:] if log.exists() else ""

    def initdb(self) -> None:
        """Create the cluster in the data directory."""
        self._as_postgres(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres")

    def _ctl(self, *args: str, check: bool = True) -> None:
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60", *args, check=check)

    def start(self) -> None:
        """Start on a free port, listening on 127.0.0.1 and a socket in the run directory."""
        opts = f"-p {self.port} -k {self.run} -c listen_addresses=127.0.0.1"
        self._ctl("-l", str(self.run / "postgres.log"), "-o", opts, "start")

    def stop(self, *, check: bool = True) -> None:
        """Fast shutdown; with check=False it is safe in a finally block, running or not."""
        self._ctl("-m", "fast", "stop", check=check)

    def client(self, tool: str, *args: str) -> str:
        """Run a client tool against this server as postgres; its stdout."""
        return self._as_postgres(str(self.bin / tool), "-h", str(self.run), "-p", str(self.port), *args)

    def scalar(self, sql: str) -> str:
        """One value from a query."""
        return self.client("psql", "-At", "-U", "postgres", "-d", "postgres", "-c", sql).strip()
