"""pgbench benchmark: PostgreSQL on the local disk vs on a replicated mount, side by side in one run, for each ack mode.

Run as root from the repository: `.venv/bin/python -m bench.pgbench [--quick] [--modes received,durable]`.
Both PostgreSQL servers get the same settings (fsync and synchronous_commit on, a Unix socket in a temp dir
and 127.0.0.1 on a free port); both replicators run on 127.0.0.1 and every directory sits on the same disk.
After each replicated run the pair is stopped and a PostgreSQL started on the secondary's copy must find
every pgbench row and the same balances.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import disk
from bench.replication import add_replicator_arguments, calibration, machine, replicated_pair, replicator_arguments
from controller.demo import pid_alive
from tests.postgres import Postgres
from tests.postgres import pg_bin as find_pg_bin

ROWS_PER_SCALE = 100_000
TPS = re.compile(r"^tps = ([\d.]+) \(without initial connection time\)$", re.MULTILINE)
LATENCY = re.compile(r"^latency average = ([\d.]+) ms$", re.MULTILINE)
FAILED = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)


@dataclass(frozen=True)
class Load:
    """How much work pgbench does."""

    scale: int
    clients: int
    seconds: int


FULL = Load(scale=10, clients=4, seconds=20)
QUICK = Load(scale=1, clients=2, seconds=5)


@dataclass(frozen=True)
class Run:
    """One server's figures: read-write TPS without connection time, average latency, time of `pgbench -i`."""

    tps: float
    latency_ms: float
    init_s: float


@dataclass(frozen=True)
class Row:
    """One ack mode's figures on the local disk and through the replicated mount."""

    ack: str
    local: Run
    replicated: Run


class Server(Postgres):
    """The test suite's PostgreSQL, started with the benchmark's explicit settings and killable by PID."""

    pid: int | None = None

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.run} -c listen_addresses=127.0.0.1 -c fsync=on -c synchronous_commit=on"
        self._ctl("-l", str(self.run / "postgres.log"), "-o", opts, "start")
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])

    def pgbench(self, *args: str, timeout: float) -> str:
        """Run pgbench against the `postgres` database; its stdout."""
        cmd = [str(self.bin / "pgbench"), "-h", str(self.run), "-p", str(self.port), "-U", "postgres", *args]
        return self._as_postgres(*cmd, "postgres", timeout=timeout)

    def close(self) -> None:
        """Fast shutdown if it still runs; if pg_ctl cannot stop it (a dead mount), SIGQUIT its postmaster."""
        if self.pid is None or not pid_alive(self.pid):
            return
        try:
            self.stop(check=False)
        finally:
            if pid_alive(self.pid):
                os.kill(self.pid, signal.SIGQUIT)
                _wait_gone(self.pid, 30)


def _wait_gone(pid: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)


def _postgres_dir(path: Path) -> Path:
    """Create `path` for the postgres user (mode 0700, as initdb wants) and return it."""
    path.mkdir(mode=0o700, parents=True)
    shutil.chown(path, "postgres", "postgres")
    return path


def parse(out: str) -> tuple[float, float]:
    """TPS (without initial connection time) and average latency in ms from pgbench's report."""
    tps, latency, failed = TPS.search(out), LATENCY.search(out), FAILED.search(out)
    if tps is None or latency is None:
        raise RuntimeError(f"no tps or latency line in pgbench's output:\n{out}")
    if failed is not None and int(failed.group(1)):
        raise RuntimeError(f"pgbench reports failed transactions:\n{out}")
    return float(tps.group(1)), float(latency.group(1))


def bench(pg: Server, load: Load) -> Run:
    """initdb, start, `pgbench -i`, then a timed read-write run with prepared statements; the server is left up."""
    pg.initdb()
    pg.start()
    t0 = time.perf_counter()
    pg.pgbench("-i", "-q", "-s", str(load.scale), timeout=600)
    init_s = time.perf_counter() - t0
    threads = min(2, load.clients)
    args = ("-c", str(load.clients), "-j", str(threads), "-T", str(load.seconds), "-M", "prepared")
    tps, latency = parse(pg.pgbench(*args, timeout=load.seconds + 300))
    return Run(tps, latency, init_s)


def bench_local(base: Path, ack: str, pg_bin: Path, load: Load) -> Run:
    """pgbench with the data directory on the local disk."""
    pg = Server(pg_bin, _postgres_dir(base / f"local-{ack}" / "pg"), _postgres_dir(base / f"run-local-{ack}"))
    try:
        run = bench(pg, load)
        pg.stop()
    finally:
        pg.close()
    shutil.rmtree(pg.data)
    return run


def bench_replicated(base: Path, ack: str, pg_bin: Path, load: Load, extra: Sequence[str] = ()) -> tuple[Run, str]:
    """pgbench with the data directory inside the primary's mount; the run and the committed sum of balances.

    `extra`: more arguments for both replicators."""
    with replicated_pair(base, ack, extra) as (mnt, primary, _):
        pg = Server(pg_bin, _postgres_dir(mnt / "pg"), _postgres_dir(base / f"run-replicated-{ack}"))
        try:
            run = bench(pg, load)
            balance = pg.scalar("SELECT sum(abalance) FROM pgbench_accounts")
            pg.stop()
        finally:
            pg.close()
    log = _log(base, ack).read_text(errors="replace")
    if primary.returncode != 0 or "ERROR" in log or "Traceback" in log:
        raise RuntimeError(f"the primary exited with {primary.returncode}, errors in the log? see {_log(base, ack)}")
    return run, balance


def check_copy(base: Path, ack: str, pg_bin: Path, load: Load, balance: str) -> None:
    """Start PostgreSQL on the secondary's copy (pair stopped, unmounted) and check every row and balance."""
    copy = Server(pg_bin, base / f"secondary-{ack}" / "pg", _postgres_dir(base / f"run-copy-{ack}"))
    try:
        copy.start()
        count = copy.scalar("SELECT count(*) FROM pgbench_accounts")
        copied = copy.scalar("SELECT sum(abalance) FROM pgbench_accounts")
        copy.stop()
    finally:
        copy.close()
    if count != str(load.scale * ROWS_PER_SCALE) or copied != balance:
        raise RuntimeError(
            f"the secondary's copy is not whole: {count} accounts (want {load.scale * ROWS_PER_SCALE}), "
            f"sum(abalance) {copied} (want {balance})"
        )


def _log(base: Path, ack: str) -> Path:
    """Where `bench.replication.replicated_pair` writes both replicators' output, events included."""
    return base / f"replicators-{ack}.log"


def run_mode(base: Path, ack: str, pg_bin: Path, load: Load, extra: Sequence[str] = ()) -> Row:
    """Local then replicated pgbench in `ack` mode, then the check of the secondary's copy."""
    local = bench_local(base, ack, pg_bin, load)
    replicated, balance = bench_replicated(base, ack, pg_bin, load, extra)
    check_copy(base, ack, pg_bin, load, balance)
    return Row(ack, local, replicated)


def render(rows: list[Row], load: Load) -> str:
    """A markdown table of every mode's results."""
    out = [
        f"pgbench -s {load.scale}, read-write, -c {load.clients} -T {load.seconds} -M prepared; "
        "TPS without connection time; the secondary's copy checked after every replicated run",
        "",
        "| ack | local TPS | replicated TPS | ratio | latency avg local (ms) | latency avg replicated (ms) "
        "| pgbench -i local (s) | pgbench -i replicated (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, rp = r.local, r.replicated
        out.append(
            f"| {r.ack} | {lo.tps:,.0f} | {rp.tps:,.0f} | {rp.tps / lo.tps:.2f}x | {lo.latency_ms:.2f} "
            f"| {rp.latency_ms:.2f} | {lo.init_s:.1f} | {rp.init_s:.1f} |"
        )
    return "\n".join(out)


def _show_logs(base: Path) -> None:
    """Print the tail of every replicator and PostgreSQL log before the temp dir goes."""
    for log in sorted([*base.glob("replicators-*.log"), *base.glob("run-*/postgres.log")]):
        print(f"--- {log.relative_to(base)} (tail)", file=sys.stderr)
        print(log.read_text(errors="replace")[-4000:], file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Run pgbench locally and replicated for each ack mode and print a markdown table."""
    p = argparse.ArgumentParser(prog="python -m bench.pgbench", description=__doc__)
    quick = f"scale {QUICK.scale}, {QUICK.clients} clients, {QUICK.seconds} s"
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--modes", default="received,durable,fsync", help="comma-separated ack modes")
    p.add_argument("--clients", type=int, help=f"pgbench clients (default {FULL.clients})")
    p.add_argument("--seconds", type=int, help=f"length of each timed run (default {FULL.seconds})")
    p.add_argument("--scale", type=int, help=f"pgbench scale factor (default {FULL.scale})")
    add_replicator_arguments(p)
    disk.add_arguments(p, fresh_gib=0)
    args = p.parse_args(argv)
    base_load = QUICK if args.quick else FULL
    load = Load(
        scale=args.scale or base_load.scale,
        clients=args.clients or base_load.clients,
        seconds=args.seconds or base_load.seconds,
    )
    pg_bin = find_pg_bin()
    if pg_bin is None:
        sys.exit("PostgreSQL is missing: apt-get install -y postgresql")
    print(f"# {' '.join(['python -m bench.pgbench', *(argv if argv is not None else sys.argv[1:])])}")
    print(f"# {machine()} postgresql={pg_bin.parent.name} {disk.describe(args.dir, args.fresh_fs)}", flush=True)
    print(f"# {calibration()}\n", flush=True)
    with disk.work_dir(args.dir, "tandem-pgbench-", args.fresh_fs) as base:
        base.chmod(0o755)  # the postgres user must traverse it
        try:
            rows = [run_mode(base, ack, pg_bin, load, replicator_arguments(args)) for ack in args.modes.split(",")]
        except BaseException:
            _show_logs(base)
            raise
    print(render(rows, load), flush=True)


if __name__ == "__main__":
    main()
