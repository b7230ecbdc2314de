"""The native data path (agent/replication/native): writes and fsyncs that its own thread serves and
ships keep the secondary equal to the primary while Python renames their directories, renames the
files themselves, truncates them and unlinks others around them, all at once."""

from __future__ import annotations

import os
import random
import re
import threading
from pathlib import Path

import pytest

from tests.integration.replication.pairs import Pair
from tests.integration.replication.test_replication_resync import assert_same_trees, stop_both

DIRS, FILES, ROUNDS = 4, 4, 300


def _counts(log: str) -> dict[str, int]:
    line = [ln for ln in log.splitlines() if "answered natively:" in ln][-1]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line.split("answered natively:")[1])}


def _workload(top: Path) -> None:
    """Writers through open fds, while other threads rename, truncate and unlink beneath them."""
    fds = {}
    for d in range(DIRS):
        (top / f"d{d}").mkdir()
        for f in range(FILES):
            fds[d, f] = os.open(top / f"d{d}" / f"f{f}", os.O_RDWR | os.O_CREAT, 0o644)
    (top / "scratch").mkdir()
    errors: list[BaseException] = []

    def guarded(fn):  # type: ignore[no-untyped-def]
        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                errors.append(exc)

        return run

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        for i in range(ROUNDS):
            fd = fds[rng.randrange(DIRS), rng.randrange(FILES)]
            os.pwrite(fd, rng.randbytes(rng.choice((1, 512, 3000, 4096, 70_000))), rng.randrange(1 << 20))
            if i % 16 == 0:
                (os.fdatasync if i % 32 else os.fsync)(fd)

    def renamer() -> None:
        # Each directory, and the files of d0, keep changing names while the writers write.
        for i in range(ROUNDS // 5):
            d = i % DIRS
            os.rename(top / f"d{d}", top / f"moved{d}")
            os.rename(top / f"moved{d}", top / f"d{d}")
            os.rename(top / "d0" / "f1", top / "d0" / "renamed")
            os.rename(top / "d0" / "renamed", top / "d0" / "f1")

    def truncater() -> None:
        rng = random.Random(7)
        for _ in range(ROUNDS // 5):
            os.ftruncate(fds[rng.randrange(DIRS), rng.randrange(FILES)], rng.randrange(1 << 20))

    def churn() -> None:
        # Files created, written, synced and unlinked by path: their names come and go.
        for i in range(ROUNDS // 5):
            path = top / "scratch" / f"t{i % 3}"
            with open(path, "wb") as fh:
                fh.write(b"t" * (i + 1))
                fh.flush()
                os.fsync(fh.fileno())
            if i % 2:
                path.unlink()

    threads = [threading.Thread(target=guarded(lambda s=s: writer(s))) for s in range(4)]
    threads += [threading.Thread(target=guarded(fn)) for fn in (renamer, truncater, churn)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for fd in fds.values():
        os.close(fd)
    assert not errors, errors


@pytest.mark.slow
@pytest.mark.parametrize("ack", ["received", "durable"])
def test_native_writes_among_renames_truncates_and_unlinks_leave_equal_trees(pair: Pair, ack: str) -> None:
    pair.start(ack)
    _workload(pair.primary_dir)
    stop_both(pair)
    assert_same_trees(pair)
    counts = _counts(pair.log("primary"))
    # Most writes and fsyncs went the native way; those a rename caught went through Python.
    assert counts["write"] > ROUNDS and counts["fsync"] > 0, counts
    assert "The native data path serves writes and fsyncs" in pair.log("primary")


@pytest.mark.slow
def test_without_native_writes_python_serves_them_all(pair: Pair) -> None:
    pair.extra = ["--no-native-writes"]
    pair.start("received")
    (pair.primary_dir / "f").write_bytes(b"x" * 10_000)
    stop_both(pair)
    assert_same_trees(pair)
    counts = _counts(pair.log("primary"))
    assert counts["write"] == counts["fsync"] == 0, counts
