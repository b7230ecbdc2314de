"""What a FUSE request costs in C and in Python here: the floor under any native data path.

Run as root from the repository: `.venv/bin/python -m bench.fuse_floor [--quick] [--profile]`.

Three trees on one disk, side by side in one run: the local directory; `bench/fuse_floor.c`, a
minimal libfuse3 passthrough in C (built here with cc); and Tandem's primary mount running alone
(its peer's port is closed, so nothing is shipped and every write completes locally). Both mounts
answer the same requests beneath a directory fd with the same options and timeouts, so the gap
between them is what Python and pyfuse3 cost per request, and the gap to the local tree is what
FUSE itself costs. Replication adds its round trips on top (bench.replication).

Idle CPUs poll during the whole run (a PM QoS request of 0 µs, as Tandem's replicator holds
while it serves): on a VM whose idle vCPUs halt, each wake-up of a sleeping daemon otherwise
costs 50-700 µs, which would swamp what is measured here.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from agent.replication import awake
from bench import disk, fuse_profile
from bench.replication import FULL, QUICK, REPO, Sizes, bench_fsync_latency, calibration, machine
from tests.integration.replication.pairs import free_port, mounted, unmount

SOURCE = Path(__file__).with_name("fuse_floor.c")
_MOUNT_SECONDS = 30


def build(into: Path) -> Path:
    """Compile fuse_floor.c against libfuse3; the binary's path."""
    if shutil.which("cc") is None or shutil.which("pkg-config") is None:
        raise SystemExit("bench.fuse_floor needs a C compiler and pkg-config (apt-get install gcc pkg-config)")
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True, text=True)
    if flags.returncode != 0:
        raise SystemExit("bench.fuse_floor needs libfuse3's headers (apt-get install libfuse3-dev)")
    binary = into / "fuse_floor"
    subprocess.run(["cc", "-O2", "-Wall", "-o", str(binary), str(SOURCE), *flags.stdout.split()], check=True)
    return binary


@contextlib.contextmanager
def cpus_polling() -> Iterator[None]:
    """Idle CPUs poll instead of halting during the block (PM QoS, agent.replication.awake)."""
    try:
        fd = os.open(awake.DEVICE, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SystemExit(f"bench.fuse_floor needs {awake.DEVICE}: {exc.strerror}") from None
    try:
        os.write(fd, struct.pack("=i", 0))
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
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        unmount(path)


def small_files(tops: Sequence[Path], count: int) -> list[tuple[float, float, float]]:
    """Create+write 4 KiB+close, open+read+close, then unlink, in each tree; files/s for each phase.

    The trees take turns in rounds of 1,000 files, and every create comes before any unlink (ext4
    skips inodes freed in the last minutes when it allocates, bench.disk).
    """
    body = os.urandom(4096)
    dirs = [top / "small" for top in tops]
    for d in dirs:
        d.mkdir()
    spent = [[0.0, 0.0, 0.0] for _ in tops]
    for phase in range(3):
        for start in range(0, count, 1000):
            for k, d in enumerate(dirs):
                t0 = time.perf_counter()
                for i in range(start, min(start + 1000, count)):
                    path = d / f"f{i}"
                    if phase == 0:
                        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                        os.write(fd, body)
                        os.close(fd)
                    elif phase == 1:
                        fd = os.open(path, os.O_RDONLY)
                        os.read(fd, 8192)
                        os.close(fd)
                    else:
                        os.unlink(path)
                spent[k][phase] += time.perf_counter() - t0
    for d in dirs:
        d.rmdir()
    return [(count / c, count / r, count / u) for c, r, u in spent]


def run(base: Path, sizes: Sizes, profile: bool) -> str:
    """Every workload in the three trees; a markdown table, and with `profile` the request tables."""
    local, native, python = base / "local", base / "c", base / "python"
    for d in (local, native, python):
        d.mkdir()
    binary = build(base)
    primary = [sys.executable, "-m", "agent.replication.replicator", "--role", "primary", "--dir", str(python)]
    primary += ["--peer", f"127.0.0.1:{free_port()}", "--node", "floor"]
    rows: list[tuple[str, str, list[float]]] = []
    recorders = [fuse_profile.Recorder(native, enabled=profile), fuse_profile.Recorder(python, enabled=profile)]
    with (
        cpus_polling(),
        serving([str(binary), str(native)], native, base / "c.log"),
        serving(primary, python, base / "python.log"),
    ):
        lat = [bench_fsync_latency(local, sizes)]
        for top, rec in zip((native, python), recorders, strict=True):
            with rec.section("4 KiB write+fsync", sizes.fsync_writes):
                lat.append(bench_fsync_latency(top, sizes))
        rows.append(("4 KiB write+fsync p50", "µs", [p50 for p50, _, _ in lat]))
        rows.append(("4 KiB write+fsync", "IOPS", [iops for _, _, iops in lat]))
        with contextlib.ExitStack() as stack:
            for rec in recorders:
                stack.enter_context(rec.section("small files, per file (create, read, unlink)", sizes.small_files))
            files = small_files((local, native, python), sizes.small_files)
    for i, name in enumerate(("create+write 4 KiB+close", "open+read 4 KiB+close", "unlink")):
        rows.append((f"{name}, {sizes.small_files} files", "files/s", [f[i] for f in files]))
    out = ["| benchmark | unit | local | C (libfuse) | Python (Tandem, alone) | C is faster by |"]
    out.append("|---|---|---|---|---|---|")
    for name, unit, (lv, cv, pv) in rows:
        faster = pv / cv if unit == "µs" else cv / pv
        out.append(f"| {name} | {unit} | {lv:,.0f} | {cv:,.0f} | {pv:,.0f} | {faster:.2f}x |")
    if profile:
        for label, rec in zip(("C (libfuse)", "Python (Tandem, alone)"), recorders, strict=True):
            out += ["", f"Requests, {label}:", "", rec.render()]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.fuse_floor", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smaller sizes (1,000 fsyncs, 2,000 files)")
    p.add_argument("--profile", action="store_true", help="also the FUSE requests of each mount (perf)")
    disk.add_arguments(p, fresh_gib=0)
    args = p.parse_args(argv)
    if args.profile:
        try:
            fuse_profile.check()
        except fuse_profile.ProfileError as exc:
            p.error(str(exc))
    print(f"# {' '.join(['python -m bench.fuse_floor', *(argv or sys.argv[1:])])}")
    print(f"# {machine()} {disk.describe(args.dir, args.fresh_fs)}")
    print(f"# {calibration()}\n")
    with disk.work_dir(args.dir, "tandem-floor-", args.fresh_fs) as tmp:
        print(run(tmp, QUICK if args.quick else FULL, args.profile))


if __name__ == "__main__":
    main()
