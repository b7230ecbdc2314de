"""Replication benchmark: local disk vs a replicated mount, side by side in one run, for each ack mode.

Run as root from the repository: `.venv/bin/python -m bench.replication [--quick] [--modes received,durable,fsync]`.
Both replicators run on 127.0.0.1 and every directory sits on the same disk, so the ratios are fair.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.replication.replicator import LOOPS
from bench import disk, fuse_profile
from tests.integration.replication.pairs import free_port, mounted, unmount

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Sizes:
    """How much work each benchmark does."""

    dd_mib: int
    fsync_writes: int
    small_files: int
    sqlite_tx: int
    replaces: int


FULL = Sizes(dd_mib=1024, fsync_writes=3000, small_files=10_000, sqlite_tx=3000, replaces=2000)
QUICK = Sizes(dd_mib=256, fsync_writes=1000, small_files=2000, sqlite_tx=1000, replaces=500)


@dataclass
class Row:
    """One benchmark's figures on the local disk and through the replicated mount."""

    name: str
    unit: str
    local: float
    replicated: float
    higher_is_better: bool = True

    def ratio(self) -> str:
        if self.higher_is_better:
            return f"{self.replicated / self.local:.2f}x" if self.local else "-"
        return f"{self.replicated - self.local:+.0f} µs"


def _in_sync(log: Path) -> bool:
    return '"state":"in-sync"' in log.read_text(errors="replace")


@contextlib.contextmanager
def replicated_pair(
    base: Path, ack: str, extra: Sequence[str] = ()
) -> Iterator[tuple[Path, subprocess.Popen[bytes], subprocess.Popen[bytes]]]:
    """Start a secondary and a primary replicator; yield the primary's mount and both processes; stop both.

    `extra`: more arguments for both replicators.
    """
    primary_dir, secondary_dir = base / f"primary-{ack}", base / f"secondary-{ack}"
    primary_dir.mkdir()
    secondary_dir.mkdir()
    port, cmd = free_port(), [sys.executable, "-m", "agent.replication.replicator"]
    log = open(base / f"replicators-{ack}.log", "ab")  # noqa: SIM115 - closed below
    secondary = subprocess.Popen(
        [*cmd, "--role", "secondary", "--dir", str(secondary_dir), "--listen", f"127.0.0.1:{port}", *extra],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    primary = subprocess.Popen(
        [*cmd, "--role", "primary", "--dir", str(primary_dir), "--peer", f"127.0.0.1:{port}", "--ack", ack, *extra],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        # Measured only once the first resync is done, so that it never races with the workload.
        deadline = time.monotonic() + 60
        while not (mounted(primary_dir) and mounted(secondary_dir) and _in_sync(Path(log.name))):
            if primary.poll() is not None or secondary.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"replicators did not start or get in sync; see {log.name}")
            time.sleep(0.05)
        yield primary_dir, primary, secondary
    finally:
        for proc, path in ((primary, primary_dir), (secondary, secondary_dir)):
            stop_and_unmount(proc, path)
        log.close()


def stop_and_unmount(proc: subprocess.Popen[bytes], path: Path) -> None:
    """SIGTERM a mount's daemon by PID (SIGKILL if it does not exit in time), then unmount its path."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    unmount(path)


def cpu_seconds(pid: int) -> float:
    """The user and system CPU time a running process has used so far, in seconds (/proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Samples a process's resident set size in a thread; `peak` is the largest seen, in MiB."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.peak = max(self.peak, int(line.split()[1]) / 1024)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def bench_dd(top: Path, sizes: Sizes) -> float:
    """Sequential write with dd, 1 MiB blocks, conv=fsync; MB/s."""
    target = top / "dd.bin"
    start = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={sizes.dd_mib}", "conv=fsync"],
        check=True,
        capture_output=True,
    )
    elapsed = time.perf_counter() - start
    target.unlink()
    return sizes.dd_mib * 1024 * 1024 / elapsed / 1e6


def bench_fsync_latency(top: Path, sizes: Sizes) -> tuple[float, float, float]:
    """4 KiB pwrite + fsync, one at a time; p50 and p99 in µs, and operations per second."""
    block, lat = os.urandom(4096), []
    fd = os.open(top / "lat.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(sizes.fsync_writes):
            t0 = time.perf_counter()
            os.pwrite(fd, block, (i % 1024) * 4096)
            os.fsync(fd)
            lat.append((time.perf_counter() - t0) * 1e6)
    finally:
        os.close(fd)
        os.unlink(top / "lat.bin")
    q = statistics.quantiles(lat, n=100)
    return q[49], q[98], len(lat) / (sum(lat) / 1e6)


def bench_small_files(tops: Sequence[Path], count: int, *, read: bool = False) -> list[tuple[float, ...]]:
    """Create + write 4 KiB + close, (with `read`) open + read + close, then unlink, in each tree.

    Files per second for each phase, per tree. The trees take turns in rounds of 1,000 files, and
    every create comes before any unlink: ext4 skips inodes freed in the last minutes when it
    allocates (recently_deleted), so a create that follows many unlinks is slower, whichever tree.
    """
    body = os.urandom(4096)
    phases = ("create", "read", "unlink") if read else ("create", "unlink")
    dirs = [top / "small" for top in tops]
    for d in dirs:
        d.mkdir()
    spent = [[0.0] * len(phases) for _ in tops]
    for phase, kind in enumerate(phases):
        for start in range(0, count, 1000):
            for k, d in enumerate(dirs):
                t0 = time.perf_counter()
                for i in range(start, min(start + 1000, count)):
                    path = d / f"f{i}"
                    if kind == "create":
                        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                        os.write(fd, body)
                        os.close(fd)
                    elif kind == "read":
                        fd = os.open(path, os.O_RDONLY)
                        os.read(fd, 8192)
                        os.close(fd)
                    else:
                        os.unlink(path)
                spent[k][phase] += time.perf_counter() - t0
    for d in dirs:
        d.rmdir()
    return [tuple(count / seconds for seconds in tree) for tree in spent]


def bench_sqlite(top: Path, sizes: Sizes) -> float:
    """SQLite in WAL mode, synchronous=FULL, one insert per transaction; transactions per second."""
    path = top / "bench.db"
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, payload BLOB)")
        t0 = time.perf_counter()
        for _ in range(sizes.sqlite_tx):
            con.execute("BEGIN")
            con.execute("INSERT INTO t (payload) VALUES (randomblob(200))")
            con.execute("COMMIT")
        elapsed = time.perf_counter() - t0
    finally:
        con.close()
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}{suffix}")
    return sizes.sqlite_tx / elapsed


def bench_replace(top: Path, sizes: Sizes) -> float:
    """The atomic replace that applications use to save a state file: write a temporary file,
    fsync it, close it, rename it over the old one; replacements per second."""
    body, tmp, target = os.urandom(4096), top / "state.tmp", top / "state"
    t0 = time.perf_counter()
    for _ in range(sizes.replaces):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, target)
    elapsed = time.perf_counter() - t0
    target.unlink()
    return sizes.replaces / elapsed


def run_mode(
    base: Path, ack: str, sizes: Sizes, extra: Sequence[str] = (), *, profile: bool = False
) -> tuple[list[Row], float, tuple[float, ...], str]:
    """Every benchmark, local then replicated, with one pair in `ack` mode.

    Also the peak RSS during dd, the CPU time (ms) each replicator (primary, secondary) spent per
    small file created, written, closed and unlinked (the local tree's turns included: nothing of
    theirs reaches the replicators), and with `profile` a table of the FUSE requests of each
    replicated run.
    """
    local = base / f"local-{ack}"
    local.mkdir()
    rows: list[Row] = []
    with replicated_pair(base, ack, extra) as (mnt, primary, secondary):
        traced = fuse_profile.Recorder(mnt, enabled=profile)
        dd_local = bench_dd(local, sizes)
        with RssSampler(primary.pid) as rss, traced.section("dd, per 1 MiB block", sizes.dd_mib):
            dd_repl = bench_dd(mnt, sizes)
        rows.append(Row(f"dd {sizes.dd_mib} MiB bs=1M conv=fsync", "MB/s", dd_local, dd_repl))
        lp50, lp99, liops = bench_fsync_latency(local, sizes)
        with traced.section("4 KiB write+fsync", sizes.fsync_writes):
            rp50, rp99, riops = bench_fsync_latency(mnt, sizes)
        rows.append(Row("4 KiB write+fsync", "IOPS", liops, riops))
        rows.append(Row("4 KiB write+fsync p50", "µs", lp50, rp50, higher_is_better=False))
        rows.append(Row("4 KiB write+fsync p99", "µs", lp99, rp99, higher_is_better=False))
        # The local tree takes turns with the mount here; its requests do not reach the mount.
        before = cpu_seconds(primary.pid), cpu_seconds(secondary.pid)
        with traced.section("small files, per file (create+write+close, later unlink)", sizes.small_files):
            (lc, lu), (rc, ru) = bench_small_files((local, mnt), sizes.small_files)
        procs = (primary, secondary)
        cpu = tuple((cpu_seconds(p.pid) - t0) / sizes.small_files * 1e3 for p, t0 in zip(procs, before, strict=True))
        rows.append(Row(f"create+write 4 KiB+close, {sizes.small_files} files", "files/s", lc, rc))
        rows.append(Row(f"unlink, {sizes.small_files} files", "files/s", lu, ru))
        sqlite_local = bench_sqlite(local, sizes)
        with traced.section("SQLite WAL synchronous=FULL, per transaction", sizes.sqlite_tx):
            sqlite_repl = bench_sqlite(mnt, sizes)
        rows.append(Row("SQLite WAL synchronous=FULL", "tx/s", sqlite_local, sqlite_repl))
        replace_local = bench_replace(local, sizes)
        with traced.section("write+fsync+close+rename over, per replacement", sizes.replaces):
            replace_repl = bench_replace(mnt, sizes)
        rows.append(Row("4 KiB write+fsync+close+rename over", "files/s", replace_local, replace_repl))
    return rows, rss.peak, cpu, traced.render()


def machine() -> str:
    """One line naming the machine the figures come from."""
    return f"nproc={os.cpu_count()} kernel={platform.release()} python={platform.python_version()}"


def header(module: str, argv: list[str] | None, args: argparse.Namespace) -> None:
    """The lines every disk benchmark starts with: its command, the machine and disk, a calibration."""
    print(f"# {' '.join([f'python -m {module}', *(argv or sys.argv[1:])])}")
    print(f"# {machine()} {disk.describe(args.dir, args.fresh_fs)}")
    print(f"# {calibration()}\n")


def calibration(rounds: int = 2000) -> str:
    """How fast this machine is right now: a ping-pong between two processes, p50, and the load.

    A shared or throttled VM moves every figure; this line says how much, next to the figures.
    """
    left, right = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the echo side
        left.close()
        with contextlib.suppress(OSError):
            while data := right.recv(64):
                right.sendall(data)
        os._exit(0)
    right.close()
    lat = []
    try:
        for _ in range(rounds):
            t0 = time.perf_counter()
            left.sendall(b"x")
            left.recv(64)
            lat.append(time.perf_counter() - t0)
    finally:
        left.close()
        os.waitpid(pid, 0)
    load = os.getloadavg()[0]
    return f"calibration: process ping-pong p50 {statistics.median(lat) * 1e6:.0f} µs, load {load:.2f}"


def render(ack: str, rows: list[Row], rss: float, cpu: tuple[float, ...]) -> str:
    """A markdown table of one mode's results."""
    out = [f"### ack: {ack}", "", "| benchmark | unit | local | replicated | ratio |", "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.name} | {r.unit} | {r.local:,.0f} | {r.replicated:,.0f} | {r.ratio()} |")
    out.append(f"| replicator RSS during the dd write (peak) | MiB | - | {rss:.0f} | - |")
    shown = " / ".join(f"{ms:.2f}" for ms in cpu)
    out.append(f"| replicators' CPU per small file (primary / secondary) | ms | - | {shown} | - |")
    return "\n".join(out)


def add_replicator_arguments(p: argparse.ArgumentParser) -> None:
    """The options a benchmark passes on to both replicators (replicator_arguments)."""
    p.add_argument(
        "--keep-cpus-awake",
        metavar="SECONDS",
        help="passed to both replicators (0: idle CPUs sleep during replication); default: the replicator's",
    )
    p.add_argument("--event-loop", choices=sorted(LOOPS), help="passed to both replicators; default: the replicator's")
    p.add_argument(
        "--no-native-answers",
        action="store_true",
        help="passed to both replicators: every FUSE request through Python (to compare with the default)",
    )
    p.add_argument(
        "--no-native-writes",
        action="store_true",
        help="passed to both replicators: writes and fsyncs served through Python, not the native data path",
    )
    p.add_argument(
        "--no-native-creates",
        action="store_true",
        help="passed to both replicators: creates, unlinks and opens served through Python, writes still natively",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="passed to the primary (ReplicatedDir.exclude; repeatable): what patterns cost where nothing matches",
    )


def replicator_arguments(args: argparse.Namespace) -> list[str]:
    """The replicators' own arguments for what add_replicator_arguments parsed."""
    extra = [] if args.keep_cpus_awake is None else ["--keep-cpus-awake", args.keep_cpus_awake]
    extra += [] if args.event_loop is None else ["--event-loop", args.event_loop]
    for flag in ("no_native_answers", "no_native_writes", "no_native_creates"):
        extra += [f"--{flag.replace('_', '-')}"] if getattr(args, flag) else []
    return extra + [f"--exclude={pattern}" for pattern in args.exclude]


def main(argv: list[str] | None = None) -> None:
    """Run the benchmarks and print markdown tables."""
    p = argparse.ArgumentParser(prog="python -m bench.replication", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smaller sizes (256 MiB dd, 2,000 files), ~1 minute")
    p.add_argument("--modes", default="received,durable,fsync", help="comma-separated ack modes")
    add_replicator_arguments(p)
    p.add_argument(
        "--fuse-profile",
        action="store_true",
        help="also count and time the FUSE requests of each replicated run (perf, the kernel's fuse tracepoints)",
    )
    disk.add_arguments(p, fresh_gib=0)
    args = p.parse_args(argv)
    if args.fuse_profile:
        fuse_profile.require(p)
    extra = replicator_arguments(args)
    sizes = QUICK if args.quick else FULL
    header("bench.replication", argv, args)
    with disk.work_dir(args.dir, "tandem-bench-", args.fresh_fs) as tmp:
        for ack in args.modes.split(","):
            rows, rss, cpu, requests = run_mode(tmp, ack, sizes, extra, profile=args.fuse_profile)
            print(render(ack, rows, rss, cpu), "\n", flush=True)
            if requests:
                print(requests, "\n", flush=True)


if __name__ == "__main__":
    main()
