"""ReplicatedDir.exclude on a real pair: excluded paths stay on each node, the rest is replicated.

Excluded files never reach the secondary; the secondary's own survive the initial sync, live
changes and a resync; entries that cross the boundary by rename or link (the common "write x.tmp,
rename it to x") arrive whole, or leave, before the call returns.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.replication import syscalls
from agent.replication.exclude import Exclude
from tests.daemons import wait_for
from tests.integration.replication.pairs import Pair
from tests.integration.replication.test_replication_pair import tree
from tests.integration.replication.test_replication_resync import stop_both

PATTERNS = ["*.tmp", "cache/*"]
EXCLUDE = Exclude(PATTERNS)
# Names whose inode also has an excluded name on the primary: the secondary holds a copy of its own.
CROSS_LINKED = {"y", "c"}


def replicated(root: Path, exclude: Exclude = EXCLUDE) -> dict[str, tuple[object, ...]]:
    """tree() outside the excluded paths. A directory's link count and size count its entries,
    excluded ones included, so they are left out; so are the link counts of CROSS_LINKED."""
    out: dict[str, tuple[object, ...]] = {}
    for rel, row in tree(root).items():
        if rel != "." and exclude.excluded(os.fsencode(rel)):
            continue
        mode, uid, gid, size, mtime, nlink, rdev, body, xattrs, group = row
        if stat.S_ISDIR(int(str(mode))):
            size = nlink = None
        if rel in CROSS_LINKED:
            nlink = group = None
        out[rel] = (mode, uid, gid, size, mtime, nlink, rdev, body, xattrs, group)
    return out


def assert_equal_outside_excluded(pair: Pair, exclude: Exclude = EXCLUDE) -> None:
    primary, secondary = replicated(pair.primary_dir, exclude), replicated(pair.secondary_dir, exclude)
    assert primary.keys() == secondary.keys()
    for rel in primary:
        assert primary[rel] == secondary[rel], rel


def seed(p: Path, s: Path) -> None:
    """Both nodes' trees before the first start: node-local files in excluded places on each."""
    (p / "keep").mkdir()
    (p / "keep" / "a").write_bytes(os.urandom(5000))
    (p / "a.tmp").write_text("the primary's own")
    (p / "cache").mkdir()
    (p / "cache" / "blob").write_bytes(os.urandom(70_000))
    (p / "d" / "x.tmp" / "inner").mkdir(parents=True)
    (p / "d" / "x.tmp" / "inner" / "f").write_text("excluded with its directory")
    (s / "a.tmp").write_text("the secondary's own, kept")
    (s / "cache").mkdir()
    (s / "cache" / "own").write_text("the secondary's cache, kept")
    (s / "only-here.tmp").mkdir()
    (s / "only-here.tmp" / "f").write_text("kept")
    (s / "stale").write_text("the primary lacks this: removed")
    (p / "gone").mkdir()
    (s / "gone").mkdir()
    (s / "gone" / "own.tmp").write_text("goes with the directory the primary removes")


def secondary_own(s: Path) -> None:
    assert (s / "a.tmp").read_text() == "the secondary's own, kept"
    assert (s / "cache" / "own").read_text() == "the secondary's cache, kept"
    assert (s / "only-here.tmp" / "f").read_text() == "kept"
    assert not (s / "cache" / "blob").exists()
    assert not (s / "d" / "x.tmp").exists()


def crossing_workload(top: Path) -> None:
    """Live changes through the primary's mount, on both sides of the boundary and across it."""
    # Excluded only: applied here, not shipped (the directory's times still go).
    (top / "b.tmp").write_bytes(os.urandom(10_000))
    with open(top / "a.tmp", "ab") as fh:
        fh.write(b" and more")
        os.fsync(fh.fileno())
    (top / "t.tmp").mkdir()
    (top / "t.tmp" / "f").write_text("inside an excluded directory")
    (top / "cache" / "new").write_text("excluded by cache/*")
    os.unlink(top / "b.tmp")
    # Empty on the primary, not on the secondary: it goes there with its excluded entries.
    os.rmdir(top / "gone")
    # Write x.tmp, fsync, rename to x: x arrives whole, with its data written before and after.
    fd = os.open(top / "x.tmp", os.O_CREAT | os.O_WRONLY, 0o640)
    os.write(fd, os.urandom(300_000))  # larger than one SyncFile: Create and Writes
    os.fsync(fd)
    os.rename(top / "x.tmp", top / "x")
    os.pwrite(fd, b"written through the handle opened as x.tmp", 1000)
    os.fsync(fd)
    os.close(fd)
    (top / "small.tmp").write_text("small")
    os.chmod(top / "small.tmp", 0o604)
    os.setxattr(top / "small.tmp", "user.k", b"v")
    os.rename(top / "small.tmp", top / "small")
    # Over an existing replicated file.
    (top / "over").write_text("replaced by a renamed excluded file")
    (top / "over.tmp").write_text("the new content")
    os.rename(top / "over.tmp", top / "over")
    # A directory crosses with its subtree (and its excluded entries stay behind on the secondary).
    (top / "build.tmp" / "sub").mkdir(parents=True)
    for i in range(20):
        (top / "build.tmp" / "sub" / f"f{i}").write_bytes(os.urandom(i * 1000))
    (top / "build.tmp" / "sub" / "part.tmp").write_text("still excluded inside")
    os.symlink("sub/f1", top / "build.tmp" / "ln")
    os.rename(top / "build.tmp", top / "build")
    # Replicated to excluded: it leaves the secondary.
    os.rename(top / "keep" / "a", top / "keep" / "a.tmp")
    # Links across the boundary both ways.
    (top / "y.tmp").write_text("linked into the replicated tree")
    os.link(top / "y.tmp", top / "y")
    (top / "c").write_text("linked out")
    os.link(top / "c", top / "c.tmp")
    # An exchange across the boundary: the replicated path gets the excluded content.
    (top / "e1").write_text("replicated, then excluded")
    (top / "e2.tmp").write_text("excluded, then replicated")
    dfd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        syscalls.renameat2(dfd, b"e1", dfd, b"e2.tmp", syscalls.RENAME_EXCHANGE)
    finally:
        os.close(dfd)
    # Writes to a file after it crossed, through a new handle.
    with open(top / "build" / "sub" / "f3", "r+b") as fh:
        fh.write(b"changed after the crossing")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ack", "extra"),
    [("received", []), ("fsync", []), ("durable", ["--no-native-writes"])],
    ids=["received", "fsync", "durable-python"],
)
def test_excluded_paths_stay_on_each_node_and_crossings_arrive_whole(pair: Pair, ack: str, extra: list[str]) -> None:
    p, s = pair.primary_dir, pair.secondary_dir
    seed(p, s)
    pair.extra = [*extra, *(f"--exclude={pattern}" for pattern in PATTERNS)]
    pair.start(ack)
    secondary_own(s)
    assert not (s / "stale").exists()
    assert (s / "keep" / "a").read_bytes() == (p / "keep" / "a").read_bytes()
    assert (s / "cache").is_dir() and not (s / "a.tmp").read_text().startswith("the primary")

    crossing_workload(p)
    # `received` and `fsync` acknowledge before the secondary applies: checked once it stopped.
    stop_both(pair)
    assert (s / "x").read_bytes() == (p / "x").read_bytes()
    assert (s / "build" / "sub" / "f19").read_bytes() == (p / "build" / "sub" / "f19").read_bytes()
    assert (s / "e2.tmp").exists() is False and (s / "e1").read_text() == "excluded, then replicated"
    assert not (s / "keep" / "a").exists() and not (s / "keep" / "a.tmp").exists()
    assert not (s / "c.tmp").exists() and (s / "y").read_text() == "linked into the replicated tree"
    assert (s / "over").read_text() == "the new content"
    assert not (s / "gone").exists()
    secondary_own(s)
    assert_equal_outside_excluded(pair)
    assert not (s / "build" / "sub" / "part.tmp").exists()
    assert not (s / "t.tmp").exists() and not (s / "cache" / "new").exists()

    # A resync (here after a restart of both) leaves the secondary's own excluded files alone too.
    (s / "cache" / "own2").write_text("made on the secondary while it was stopped")
    pair.start(ack)
    (p / "after").write_text("live again")
    stop_both(pair)
    assert_equal_outside_excluded(pair)
    secondary_own(s)
    assert (s / "cache" / "own2").exists()
    assert "exclude=['*.tmp', 'cache/*']" in pair.log("primary")
    assert not [e for e in pair.events("primary") if e["event"] == "error"], pair.log("primary")


WRITER = """
import os, sys, time
path, stop = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_WRONLY)
i = 0
while not os.path.exists(stop) and i < 200_000:
    os.pwrite(fd, os.urandom(4096), (i * 7919 % 256) * 4096)
    i += 1
os.fsync(fd)
os.close(fd)
print(i)
"""


@pytest.mark.slow
@pytest.mark.parametrize("ack", ["received", "fsync"])
def test_a_file_renamed_across_the_boundary_while_written_ends_equal(pair: Pair, ack: str) -> None:
    """The copy of a crossing file races with live writes through a handle opened before it crossed:
    each live write is either in the part of the copy read after it or shipped after that part."""
    p = pair.primary_dir
    pair.extra = [f"--exclude={pattern}" for pattern in PATTERNS]
    pair.start(ack)
    (p / "big.tmp").write_bytes(os.urandom(1024 * 1024))
    stop = pair.logs / "stop"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(p / "big.tmp"), str(stop)], stdout=subprocess.PIPE)
    try:
        time.sleep(0.2)
        # Back and forth: each arrival copies the file while the writer goes on.
        for _ in range(40):
            os.rename(p / "big.tmp", p / "big")
            time.sleep(0.01)
            os.rename(p / "big", p / "big.tmp")
        os.rename(p / "big.tmp", p / "big")
        time.sleep(0.1)
    finally:
        stop.touch()
        out, _ = writer.communicate(timeout=60)
    assert writer.returncode == 0 and int(out) > 0
    stop_both(pair)
    assert_equal_outside_excluded(pair)
    assert (pair.secondary_dir / "big").read_bytes() == (p / "big").read_bytes()
    assert not [e for e in pair.events("primary") if e["event"] == "error"], pair.log("primary")


@pytest.mark.slow
def test_anchored_patterns_keep_the_native_creates_out_of_the_directories_they_reach(pair: Pair) -> None:
    """Without a pattern that matches names anywhere, F still creates files, but not where an
    anchored pattern reaches, nor in a directory that moved there."""
    p, s = pair.primary_dir, pair.secondary_dir
    (p / "cache").mkdir()
    pair.extra = ["--exclude=cache/*"]
    pair.start("received")
    for i in range(50):
        (p / f"f{i}").write_text("created by the native data path")
    for i in range(5):
        (p / "cache" / f"c{i}").write_text("excluded")
    (p / "d").mkdir()
    for i in range(20):
        (p / "d" / f"g{i}").write_text("replicated")
    os.rename(p / "d", p / "cache" / "d")  # departs: gone from the secondary
    # `received` acknowledges before the secondary applies: wait for the apply.
    wait_for("d gone from the secondary", lambda: not (s / "d").exists())
    for i in range(20):
        (p / "cache" / "d" / f"h{i}").write_text("excluded: made where cache/* reaches")
    os.unlink(p / "cache" / "d" / "g0")
    os.rename(p / "cache" / "d", p / "e")  # arrives whole
    for i in range(10):
        (p / "e" / f"k{i}").write_text("replicated again")
    os.unlink(p / "e" / "h1")
    wait_for(
        "e on the secondary", lambda: (s / "e").is_dir() and sorted(os.listdir(s / "e")) == sorted(os.listdir(p / "e"))
    )
    stop_both(pair)
    assert sorted(os.listdir(s / "cache")) == []
    assert_equal_outside_excluded(pair)
    counts = re.search(r"answered natively: .*\bcreate=(\d+)", pair.log("primary"))
    assert counts is not None and int(counts.group(1)) >= 50, pair.log("primary")[-2000:]
    assert not [e for e in pair.events("primary") if e["event"] == "error"], pair.log("primary")


def native_count(pair: Pair, kind: str) -> int:
    counts = re.search(rf"answered natively: .*\b{kind}=(\d+)", pair.log("primary"))
    assert counts is not None, pair.log("primary")[-2000:]
    return int(counts.group(1))


@pytest.mark.slow
@pytest.mark.parametrize("ack", ["received", "fsync"])
def test_names_excluded_anywhere_are_left_to_python_by_the_native_creates(pair: Pair, ack: str) -> None:
    """With patterns that match names at any depth, F still creates and unlinks the other files in
    every directory; a name a pattern may match (its widened form: `[xy]?.log` is `*.log`) is
    Python's, which ships it only if excluded() says no. The secondary's own excluded files are never
    created over or removed."""
    patterns = ["*.tmp", "[xy]?.log", "core"]
    exclude = Exclude(patterns)
    p, s = pair.primary_dir, pair.secondary_dir
    (p / "d").mkdir()
    (s / "d").mkdir()
    for rel in ["own.tmp", "d/own.tmp", "xa.log", "core", "d/\u00e9.tmp"]:
        (s / rel).write_text(f"the secondary's own {rel}")
    pair.extra = [f"--exclude={e}" for e in patterns]
    pair.start(ack)
    for top in (p, p / "d"):
        for i in range(30):
            (top / f"f{i}").write_text("created by the native data path")
        for name in ["own.tmp", "xa.log", "core", "\u00e9.tmp"]:
            (top / name).write_bytes(os.urandom(3000))  # created here only
        (top / "za.log").write_text("widened, not excluded: replicated by Python")
        for i in range(10):
            os.unlink(top / f"f{i}")
        for name in ["own.tmp", "xa.log", "core", "\u00e9.tmp"]:
            os.unlink(top / name)
        os.unlink(top / "za.log")
        (top / "za.log").write_text("again")
    stop_both(pair)
    for rel in ["own.tmp", "d/own.tmp", "xa.log", "core", "d/\u00e9.tmp"]:
        assert (s / rel).read_bytes() == f"the secondary's own {rel}".encode(), rel
    assert not (s / "\u00e9.tmp").exists() and not (s / "d" / "xa.log").exists()
    assert (s / "za.log").read_text() == (s / "d" / "za.log").read_text() == "again"
    assert_equal_outside_excluded(pair, exclude)
    assert native_count(pair, "create") >= 50  # of 60 (a directory is registered at its first lookup)
    assert native_count(pair, "unlink") >= 15  # of 20
    assert not [e for e in pair.events("primary") if e["event"] == "error"], pair.log("primary")
