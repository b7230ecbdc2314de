"""Initial sync benchmark: `rsync -a` into an empty directory vs Tandem's initial sync, side by side in one run.

Run as root from the repository: `.venv/bin/python -m bench.sync [--quick] [--files N] [--large-mib M]`.
Both copies read the same source tree and write to the same disk; both replicators run on 127.0.0.1.
Then the resync of the unchanged tree (the primary restarted) and after changing 1% of the small files.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import disk
from bench.replication import calibration, machine
from tests.integration.replication.pairs import Pair, mounted, unmount

DIR_ENTRIES = 1000
SMALL_MAX = 8 * 1024
LARGE_FILES = 4
CHUNK = 1024 * 1024
TIMEOUT = 600.0


@dataclass
class Result:
    """One phase of a Tandem run: wall time and what the primary reported at in-sync."""

    seconds: float
    event: dict[str, Any]


def build_tree(src: Path, files: int, large_mib: int, seed: int = 1) -> tuple[int, int]:
    """Small files of 0..8 KiB in directories of ~1,000 entries, plus a few large files; (files, bytes)."""
    rnd = random.Random(seed)
    pool = rnd.randbytes(4 * CHUNK)
    total = 0
    for i in range(files):
        d = src / f"d{i // DIR_ENTRIES:04d}"
        if i % DIR_ENTRIES == 0:
            d.mkdir(parents=True)
        size = rnd.randint(0, SMALL_MAX)
        start = rnd.randrange(len(pool) - SMALL_MAX)
        (d / f"f{i:06d}").write_bytes(pool[start : start + size])
        total += size
    large = src / "large"
    large.mkdir(parents=True)
    per_file = large_mib * CHUNK // LARGE_FILES
    for n in range(LARGE_FILES):
        with open(large / f"big{n}", "wb") as fh:
            for off in range(0, per_file, CHUNK):
                # An 8-byte prefix per chunk keeps chunks distinct without generating 2 GiB of random data.
                k, n = (off // CHUNK) % 3 * CHUNK, min(CHUNK, per_file - off)
                fh.write(off.to_bytes(8, "big") + pool[k : k + n - 8])
        total += per_file
    return files + LARGE_FILES, total


def settle(caches: str) -> None:
    """Put both copies on the same footing: dirty data written back, caches dropped or left warm."""
    os.sync()
    if caches == "drop":
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def warm(src: Path) -> None:
    """Read the whole source once so that both copies read it from the page cache."""
    subprocess.run(["tar", "-cf", "/dev/null", "."], cwd=src, check=True)
    for p in (src / "large").iterdir():
        with open(p, "rb") as fh:
            while fh.read(8 * CHUNK):
                pass


def run_rsync(src: Path, dst: Path) -> float:
    dst.mkdir()
    t0 = time.perf_counter()
    subprocess.run(["rsync", "-a", f"{src}/", f"{dst}/"], check=True)
    return time.perf_counter() - t0


def tandem_sync(pair: Pair, logs: Path) -> Result:
    """Start both replicators (fresh event logs), time from the primary's start to the secondary's in-sync."""
    pair.logs = logs
    logs.mkdir()
    pair.start_secondary("received")
    t0 = time.perf_counter()
    pair.start_primary()
    pair.wait_event("secondary", lambda e: e.get("state") == "in-sync", TIMEOUT)
    seconds = time.perf_counter() - t0
    event = pair.wait_event("primary", lambda e: e.get("state") == "in-sync", TIMEOUT)
    stop(pair, "primary")
    stop(pair, "secondary")
    return Result(seconds, event)


def stop(pair: Pair, role: str) -> None:
    code = pair.stop(role, timeout=120)
    if code != 0:
        raise RuntimeError(f"{role} replicator exited with {code}: {pair.log(role)[-3000:]}")


def change_files(src: Path, files: int, fraction: float, seed: int = 2) -> tuple[int, int]:
    """Rewrite `fraction` of the small files with new content of the same size; (files, bytes) changed."""
    rnd = random.Random(seed)
    picked = rnd.sample(range(files), max(1, int(files * fraction)))
    changed = 0
    for i in picked:
        p = src / f"d{i // DIR_ENTRIES:04d}" / f"f{i:06d}"
        size = p.stat().st_size
        p.write_bytes(rnd.randbytes(size))
        changed += size
    return len(picked), changed


def summary(top: Path) -> tuple[int, int]:
    """(regular files, their total bytes) under top, read beneath the real directory."""
    count = size = 0
    for dirpath, _, names in os.walk(top):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            count, size = count + 1, size + st.st_size
    return count, size


def _meta(p: Path) -> tuple[object, ...]:
    st = os.lstat(p)
    xattrs = sorted(os.listxattr(p, follow_symlinks=False))
    return st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, xattrs


def verify(src: Path, dst: Path, files: int, *, full: bool) -> str:
    """Compare the copy with the source: counts and bytes, then a sample (or everything) of contents."""
    if summary(src) != summary(dst):
        raise AssertionError(f"copy differs: source {summary(src)}, copy {summary(dst)}")
    if full:
        subprocess.run(["diff", "-r", "--no-dereference", str(src), str(dst)], check=True, capture_output=True)
    rnd = random.Random(3)
    sample = [f"d{i // DIR_ENTRIES:04d}/f{i:06d}" for i in rnd.sample(range(files), min(files, 500))]
    sample += [f"large/big{n}" for n in range(LARGE_FILES)] + [f"d{i:04d}" for i in range(files // DIR_ENTRIES)]
    for rel in sample:
        a, b = src / rel, dst / rel
        if _meta(a) != _meta(b):
            raise AssertionError(f"{rel}: metadata differs: {_meta(a)} vs {_meta(b)}")
        if a.is_file() and subprocess.run(["cmp", "-s", str(a), str(b)], check=False).returncode != 0:
            raise AssertionError(f"{rel}: content differs")
    return "diff -r equal" if full else f"counts, bytes equal; {len(sample)} sampled entries equal"


def run(base: Path, files: int, large_mib: int, caches: str, full_diff: bool) -> list[str]:
    src, rsync_dst, tandem_dst, logs = base / "src", base / "rsync-dst", base / "tandem-dst", base / "logs"
    for d in (tandem_dst, logs):
        d.mkdir()
    t0 = time.perf_counter()
    count, size = build_tree(src, files, large_mib)
    print(f"# built {count:,} files, {size / 2**20:,.0f} MiB in {time.perf_counter() - t0:.1f} s", flush=True)
    if caches == "warm":
        warm(src)
    settle(caches)
    rsync_s = run_rsync(src, rsync_dst)
    print(f"# rsync -a: {rsync_s:.2f} s", flush=True)
    # rsync's copy stays until the end: ext4 skips inodes freed in the last minutes when it allocates
    # new ones (recently_deleted), so deleting 100,000 files here would slow every create that follows.
    settle(caches)
    pair = Pair(src, tandem_dst, logs)
    try:
        initial = tandem_sync(pair, logs / "initial")
        print(f"# tandem initial sync: {initial.seconds:.2f} s", flush=True)
        checked = verify(src, tandem_dst, files, full=full_diff)
        settle(caches)
        unchanged = tandem_sync(pair, logs / "unchanged")
        print(f"# tandem resync, nothing changed: {unchanged.seconds:.2f} s", flush=True)
        changed_files, changed_bytes = change_files(src, files, 0.01)
        settle(caches)
        partial = tandem_sync(pair, logs / "partial")
        checked_after = verify(src, tandem_dst, files, full=full_diff)
    finally:
        pair.close()
    mib = size / 2**20
    return [
        "| measure | rsync -a | Tandem | ratio (Tandem / rsync) |",
        "|---|---|---|---|",
        f"| initial sync into an empty dir, {count:,} files, {mib:,.0f} MiB (s) | {rsync_s:.2f} | "
        f"{initial.seconds:.2f} | {initial.seconds / rsync_s:.2f}x |",
        f"| initial sync throughput (MB/s) | {size / rsync_s / 1e6:,.0f} | {size / initial.seconds / 1e6:,.0f} | - |",
        f"| initial sync: data bytes / wire bytes sent | - | {initial.event['dataBytes']:,} / "
        f"{initial.event['wireBytes']:,} | - |",
        f"| resync, nothing changed (s; data / wire bytes) | - | {unchanged.seconds:.2f}; "
        f"{unchanged.event['dataBytes']:,} / {unchanged.event['wireBytes']:,} | - |",
        f"| resync after changing {changed_files:,} files (1%), {changed_bytes:,} bytes (s) | - | "
        f"{partial.seconds:.2f} | - |",
        f"| resync after the change: data bytes / bytes changed | - | {partial.event['dataBytes']:,} / "
        f"{changed_bytes:,} = {partial.event['dataBytes'] / max(1, changed_bytes):.3f} | - |",
        f"| resync after the change: wire bytes / bytes changed | - | {partial.event['wireBytes']:,} / "
        f"{changed_bytes:,} = {partial.event['wireBytes'] / max(1, changed_bytes):.2f} | - |",
        "",
        f"Copy checked after the initial sync: {checked}; after the 1% resync: {checked_after}.",
    ]


def main(argv: list[str] | None = None) -> None:
    """Build the tree, run rsync and Tandem, print a markdown table."""
    p = argparse.ArgumentParser(prog="python -m bench.sync", description=__doc__)
    p.add_argument("--quick", action="store_true", help="10,000 files + 256 MiB, and a full diff -r")
    p.add_argument("--files", type=int, help="small files (default 100,000)")
    p.add_argument("--large-mib", type=int, help="MiB in large files (default 2048)")
    p.add_argument("--caches", choices=["warm", "drop"], default="warm", help="page caches before each copy")
    disk.add_arguments(p, fresh_gib=0)
    args = p.parse_args(argv)
    files = args.files if args.files is not None else (10_000 if args.quick else 100_000)
    large_mib = args.large_mib if args.large_mib is not None else (256 if args.quick else 2048)
    cache_line = (
        "sync; echo 3 > /proc/sys/vm/drop_caches before each copy"
        if args.caches == "drop"
        else "source read once beforehand (warm page cache), sync before each copy"
    )
    print(f"# {' '.join(['python -m bench.sync', *(argv if argv is not None else sys.argv[1:])])}")
    where = disk.describe(args.dir, args.fresh_fs)
    print(f"# {machine()} {where} caches: {cache_line}; Tandem ack=received, secondary mounted", flush=True)
    if args.fresh_fs <= 0:
        disk.wait_for_freed_inodes(args.dir)
    print(f"# {calibration()}\n", flush=True)
    with disk.work_dir(args.dir, "tandem-sync-", args.fresh_fs) as base:
        try:
            lines = run(base, files, large_mib, args.caches, full_diff=args.quick or files <= 20_000)
        finally:
            for d in (base / "src", base / "tandem-dst"):
                if mounted(d):
                    unmount(d)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
