"""What a FUSE request costs in C and in Python here: the floor under any native data path.

Run as root from the repository: `.venv/bin/python -m bench.fuse_floor [--quick] [--profile]`.

Six trees on one disk, taking turns in one run: the local directory; `bench/fuse_floor.c`, a
minimal libfuse3 passthrough in C (built here with cc); the same C passthrough shipping every change
to a C peer on loopback that acknowledges it on receipt (an fsync after its own fsync) and applies
it, as Tandem's `received` mode does; the same again shipping to Tandem's own secondary replicator
in protocol v3 (a C primary in front of the Python secondary); Tandem's primary mount running alone (its peer's port is
closed, so nothing is shipped and every write completes locally); and a Tandem pair in `received`
mode. The mounts answer the same requests beneath a directory fd with the same options and
timeouts, so C against Tandem alone is what Python and pyfuse3 cost per request, the local tree
against C alone what FUSE itself costs, and the shipped C tree the floor of a native replicated
data path on this machine.

For the small files, two more trees: the C program with `--null`, which does no file system work at
all (made-up inodes in memory, written bytes dropped), alone and shipping to the C peer. What a
create costs there is the FUSE protocol itself (and shipping it): no data path through FUSE, in any
language, creates files faster on this machine, whatever the disk underneath.

Idle CPUs poll during the whole run (a PM QoS request of 0 µs, as Tandem's replicator holds
while it serves): on a VM whose idle vCPUs halt, each wake-up of a sleeping daemon otherwise
costs 50-700 µs, which would swamp what is measured here.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from agent.replication import awake
from bench import disk, fuse_profile
from bench.replication import (
    FULL,
    QUICK,
    REPO,
    Sizes,
    bench_fsync_latency,
    bench_small_files,
    bench_sqlite,
    header,
    replicated_pair,
    stop_and_unmount,
)
from tests.integration.replication.pairs import free_port, mounted

SOURCE = Path(__file__).with_name("fuse_floor.c")
NATIVE = Path(__file__).resolve().parent.parent / "agent" / "replication" / "native"
_MOUNT_SECONDS = 30


def build(into: Path) -> Path:
    """Compile fuse_floor.c against libfuse3; the binary's path."""
    if shutil.which("cc") is None or shutil.which("pkg-config") is None:
        raise SystemExit("bench.fuse_floor needs a C compiler and pkg-config (apt-get install gcc pkg-config)")
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True, text=True)
    if flags.returncode != 0:
        raise SystemExit("bench.fuse_floor needs libfuse3's headers (apt-get install libfuse3-dev)")
    binary = into / "fuse_floor"
    frames = f"-I{NATIVE}"  # tandem_frames.h, the native data path's frames
    subprocess.run(["cc", "-O2", "-Wall", frames, "-o", str(binary), str(SOURCE), *flags.stdout.split()], check=True)
    return binary


@contextlib.contextmanager
def cpus_polling() -> Iterator[None]:
    """Idle CPUs poll instead of halting during the block (PM QoS, agent.replication.awake)."""
    try:
        fd = os.open(awake.DEVICE, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SystemExit(f"bench.fuse_floor needs {awake.DEVICE}: {exc.strerror}") from None
    try:
        os.write(fd, awake.POLL)
        yield
    finally:
        os.close(fd)


def _wait_mounted(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + _MOUNT_SECONDS
    while not mounted(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{path} was not mounted (exit {proc.poll()})")
        time.sleep(0.02)


@contextlib.contextmanager
def serving(cmd: Sequence[str], path: Path, log: Path) -> Iterator[None]:
    """Run a FUSE daemon that mounts over `path`; SIGTERM it by PID and unmount after the block."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_mounted(path, proc)
        yield
    finally:
        stop_and_unmount(proc, path)


@contextlib.contextmanager
def _listening(cmd: Sequence[str], marker: bytes, what: str, log: Path) -> Iterator[None]:
    """Run a peer until the block ends, once a line of its stdout holds `marker` (it listens)."""
    with open(log, "ab") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err)
    try:
        assert proc.stdout is not None
        if not any(marker in line for line in proc.stdout):
            raise SystemExit(f"{what} did not start (exit {proc.poll()}); see {log}")
        yield
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()


@contextlib.contextmanager
def acker(binary: Path, mirror: Path, log: Path) -> Iterator[int]:
    """The C floor's peer (`fuse_floor --acker`) on a free loopback port; yields the port."""
    port = free_port()
    with _listening([str(binary), "--acker", str(mirror), str(port)], b"listening", "fuse_floor --acker", log):
        yield port


@contextlib.contextmanager
def tandem_secondary(mirror: Path, log: Path) -> Iterator[int]:
    """A Tandem secondary replicator (no mount) on a free loopback port, for `fuse_floor --tandem`."""
    port = free_port()
    cmd = [sys.executable, "-m", "agent.replication.replicator", "--role", "secondary", "--dir", str(mirror)]
    cmd += ["--listen", f"127.0.0.1:{port}", "--no-mount", "--node", "mirror"]
    with _listening(cmd, b'"listening"', "the secondary replicator", log):
        yield port


TREES = (
    "local",
    "C",
    "C, shipped to a C peer",
    "C, shipped to Tandem's secondary",
    "Tandem alone",
    "Tandem, received",
    "C, no disk work",
    "C, no disk work, shipped to a C peer",
)
# The trees of `fuse_floor --null`: only the small files run there (nothing is stored to read back).
FILES_ONLY = 2


def run(base: Path, sizes: Sizes, profile: bool) -> str:
    """Every workload in every tree (TREES), taking turns; a markdown table, with `profile` the requests."""
    local, native, shipped, alone = base / "local", base / "c", base / "c-shipped", base / "python"
    to_tandem, null, null_shipped = base / "c-to-tandem", base / "c-null", base / "c-null-shipped"
    mirrors = (base / "c-mirror", base / "tandem-mirror", base / "c-null-mirror")
    for d in (local, native, shipped, to_tandem, alone, null, null_shipped, *mirrors):
        d.mkdir()
    binary = build(base)
    primary = [sys.executable, "-m", "agent.replication.replicator", "--role", "primary", "--dir", str(alone)]
    primary += ["--peer", f"127.0.0.1:{free_port()}", "--node", "floor"]
    with contextlib.ExitStack() as stack:
        stack.enter_context(cpus_polling())
        stack.enter_context(serving([str(binary), str(native)], native, base / "c.log"))
        port = stack.enter_context(acker(binary, base / "c-mirror", base / "acker.log"))
        stack.enter_context(serving([str(binary), str(shipped), "--peer", str(port)], shipped, base / "c.log"))
        port = stack.enter_context(tandem_secondary(base / "tandem-mirror", base / "tandem-mirror.log"))
        stack.enter_context(serving([str(binary), str(to_tandem), "--tandem", str(port)], to_tandem, base / "c.log"))
        stack.enter_context(serving(primary, alone, base / "python.log"))
        replicated, _, _ = stack.enter_context(replicated_pair(base, "received"))
        stack.enter_context(serving([str(binary), str(null), "--null"], null, base / "c.log"))
        port = stack.enter_context(acker(binary, base / "c-null-mirror", base / "acker.log"))
        cmd = [str(binary), str(null_shipped), "--null", "--peer", str(port)]
        stack.enter_context(serving(cmd, null_shipped, base / "c.log"))
        tops = (local, native, shipped, to_tandem, alone, replicated, null, null_shipped)
        recorders = [fuse_profile.Recorder(top, enabled=profile) for top in tops[1:]]
        try:
            rows = _workloads(tops, recorders, sizes)
        except OSError as exc:
            if exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
                raise
            logs = "\n".join(_tail(base / name) for name in ("c.log", "acker.log", "tandem-mirror.log"))
            raise SystemExit(f"a mount's daemon died during the run ({exc}); its logs:\n{logs}") from None
    out = ["| benchmark | unit | " + " | ".join(TREES) + " |", "|---" * (len(TREES) + 2) + "|"]
    for name, unit, values in rows:
        cells = [f"{values[0]:,.0f}"]
        for v in values[1:]:
            if v is None:
                cells.append("-")
            elif unit == "µs":
                cells.append(f"{v - values[0]:+,.0f}")
            else:
                cells.append(f"{v:,.0f} ({v / values[0]:.2f}x)")
        out.append(f"| {name} | {unit} | " + " | ".join(cells) + " |")
    if profile:
        for label, rec in zip(TREES[1:], recorders, strict=True):
            out += ["", f"Requests, {label}:", "", rec.render()]
    return "\n".join(out)


def _tail(log: Path, lines: int = 20) -> str:
    """The last lines of a daemon's log, named, for an error message."""
    text = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else ["(no log)"]
    return f"--- {log.name}\n" + "\n".join(text)


def _workloads(
    tops: Sequence[Path], recorders: Sequence[fuse_profile.Recorder], sizes: Sizes
) -> list[tuple[str, str, list[float | None]]]:
    """write+fsync latency, small files and SQLite in each tree (the last FILES_ONLY: small files
    only); rows of (name, unit, one value per tree, None where it did not run)."""
    rows: list[tuple[str, str, list[float | None]]] = []
    stored = len(tops) - FILES_ONLY
    skipped: list[float | None] = [None] * FILES_ONLY
    lat = [bench_fsync_latency(tops[0], sizes)]
    for top, rec in zip(tops[1:stored], recorders, strict=False):
        with rec.section("4 KiB write+fsync", sizes.fsync_writes):
            lat.append(bench_fsync_latency(top, sizes))
    rows.append(("4 KiB write+fsync p50 (added over local)", "µs", [p50 for p50, _, _ in lat] + skipped))
    rows.append(("4 KiB write+fsync", "IOPS", [iops for _, _, iops in lat] + skipped))
    with contextlib.ExitStack() as stack:
        for rec in recorders:
            stack.enter_context(rec.section("small files, per file (create, read, unlink)", sizes.small_files))
        files = bench_small_files(tops, sizes.small_files, read=True)
    for i, name in enumerate(("create+write 4 KiB+close", "open+read 4 KiB+close", "unlink")):
        values: list[float | None] = [f[i] for f in files]
        if name.startswith("open+read"):
            values[stored:] = skipped  # --null stores nothing: its reads are of empty files
        rows.append((f"{name}, {sizes.small_files} files", "files/s", values))
    tx: list[float | None] = [bench_sqlite(tops[0], sizes)]
    for top, rec in zip(tops[1:stored], recorders, strict=False):
        with rec.section("SQLite WAL FULL, per transaction", sizes.sqlite_tx):
            tx.append(bench_sqlite(top, sizes))
    rows.append(("SQLite WAL synchronous=FULL", "tx/s", tx + skipped))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.fuse_floor", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smaller sizes (1,000 fsyncs, 2,000 files)")
    p.add_argument("--profile", action="store_true", help="also the FUSE requests of each mount (perf)")
    disk.add_arguments(p, fresh_gib=0)
    args = p.parse_args(argv)
    if args.profile:
        fuse_profile.require(p)
    header("bench.fuse_floor", argv, args)
    with disk.work_dir(args.dir, "tandem-floor-", args.fresh_fs) as tmp:
        print(run(tmp, QUICK if args.quick else FULL, args.profile))


if __name__ == "__main__":
    main()
