"""The primary mounts alone, reconnects forever and resyncs every returning secondary, online."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.replication.pairs import Pair, mounted
from tests.integration.replication.test_replication_pair import tree, workload

BLOCK = 64 * 1024

WRITER = """
import os, sys, time
top, stop = sys.argv[1], sys.argv[2]
i = 0
while not os.path.exists(stop):
    for n in range(4):
        with open(os.path.join(top, f"hot{n}"), "r+b") as fh:
            fh.seek((i * 7919 + n * 131) % (4 * 1024 * 1024))
            fh.write(os.urandom(3000))
    i += 1
"""


def assert_same_trees(pair: Pair) -> None:
    primary, secondary = tree(pair.primary_dir), tree(pair.secondary_dir)
    assert primary.keys() == secondary.keys()
    for rel in primary:
        assert primary[rel] == secondary[rel], rel


def stop_both(pair: Pair) -> None:
    assert pair.stop("primary") == 0, pair.log("primary")
    assert not mounted(pair.primary_dir)
    assert pair.stop("secondary") == 0, pair.log("secondary")
    assert not mounted(pair.secondary_dir)
    assert pair.events("primary")[-1] == {"event": "stopped"}
    assert pair.events("secondary")[-1] == {"event": "stopped"}


@pytest.mark.slow
def test_primary_serves_alone_then_resyncs_a_late_secondary(pair: Pair) -> None:
    pair.start_primary()
    workload(pair.primary_dir)  # no secondary anywhere: writes complete locally
    states = [e.get("state") for e in pair.events("primary")]
    assert "connecting" in states and "in-sync" not in states
    pair.start_secondary()
    pair.wait_in_sync()
    peer = [e["state"] for e in pair.events("primary") if e["event"] == "peer"]
    assert peer[0] == "connecting" and "syncing" in peer and peer[-1] == "in-sync"
    syncing = next(e for e in pair.events("primary") if e.get("state") == "syncing")
    assert syncing["remainingFiles"] > 0 and syncing["remainingBytes"] > 3 * 1024 * 1024
    pair.wait_event("secondary", lambda e: e.get("state") == "in-sync")
    (pair.primary_dir / "after").write_text("live")  # live writes flow once in sync
    stop_both(pair)
    assert_same_trees(pair)
    secondary = [e.get("state") for e in pair.events("secondary") if e["event"] == "peer"]
    assert secondary[:3] == ["connected", "syncing", "in-sync"]
    assert {"event": "peer", "state": "disconnected", "wasInSync": True} in pair.events("secondary")


@pytest.mark.slow
def test_a_secondary_with_extra_and_different_files_ends_equal(pair: Pair) -> None:
    p, s = pair.primary_dir, pair.secondary_dir
    (p / "same").write_bytes(b"x" * 200_000)
    (s / "same").write_bytes(b"x" * 200_000)
    (p / "differs").write_bytes(os.urandom(300_000))
    (s / "differs").write_bytes(os.urandom(500_000))
    (s / "extra-dir" / "deep").mkdir(parents=True)
    (s / "extra-dir" / "deep" / "f").write_text("gone soon")
    (s / "extra-file").write_text("gone soon")
    (p / "kind").mkdir()
    (s / "kind").write_text("a file where the primary has a directory")
    os.symlink("a", p / "ln")
    os.symlink("b", s / "ln")
    (p / "one").write_text("separate")
    (p / "two").write_text("separate")
    (s / "one").write_text("linked")
    os.link(s / "one", s / "two")
    os.chmod(s / "same", 0o600)
    os.setxattr(s / "same", "user.stale", b"1")
    pair.start("durable")
    stop_both(pair)
    assert_same_trees(pair)


@pytest.mark.slow
def test_initial_sync_of_every_kind_of_file_into_an_empty_dir(pair: Pair) -> None:
    p = pair.primary_dir
    (p / "d" / "e").mkdir(parents=True)
    for i in range(300):
        (p / "d" / f"small{i}").write_bytes(os.urandom(i * 37))
    (p / "d" / "e" / "empty").write_bytes(b"")
    (p / "suid").write_bytes(b"#!/bin/sh\n")
    os.chown(p / "suid", 1000, 1000)
    os.chmod(p / "suid", 0o4755)
    os.setxattr(p / "d" / "small7", "user.k", b"v")
    os.setxattr(p / "d", "user.dir", b"x")
    os.link(p / "d" / "small9", p / "d" / "e" / "hard")
    with open(p / "sparse-small", "wb") as fh:
        fh.truncate(40_000)
        fh.seek(30_000)
        fh.write(b"tail")
    with open(p / "sparse-large", "wb") as fh:
        fh.write(os.urandom(3_000_000))
        fh.seek(9_000_000)
        fh.write(os.urandom(5_000_000))
        fh.truncate(20_000_000)
    (p / "large").write_bytes(os.urandom(9 * 1024 * 1024 + 5))
    os.symlink("d/small1", p / "ln")
    os.mkfifo(p / "fifo")
    os.utime(p / "d" / "small3", ns=(1, 2))
    pair.start("received")
    stop_both(pair)
    assert_same_trees(pair)


@pytest.mark.slow
def test_secondary_stopped_mid_workload_is_resynced_on_return(pair: Pair) -> None:
    pair.start("received")
    (pair.primary_dir / "a").write_bytes(os.urandom(1_000_000))
    assert pair.stop("secondary") == 0
    pair.wait_event("primary", lambda e: e.get("state") == "disconnected")
    mark = len(pair.events("primary"))
    workload(pair.primary_dir)
    (pair.primary_dir / "a").write_bytes(os.urandom(900_000))
    pair.start_secondary()
    pair.wait_in_sync(after=mark)
    stop_both(pair)
    assert_same_trees(pair)


@pytest.mark.slow
def test_resync_with_a_concurrent_writer_ends_identical(pair: Pair, tmp_path: Path) -> None:
    for n in range(4):
        (pair.primary_dir / f"hot{n}").write_bytes(os.urandom(4 * 1024 * 1024))
    for n in range(30):
        (pair.primary_dir / f"cold{n}").write_bytes(os.urandom(200_000))
    pair.start_primary()
    stop = tmp_path / "stop-writer"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(pair.primary_dir), str(stop)])
    try:
        pair.start_secondary()
        pair.wait_in_sync()
        stop.touch()
        assert writer.wait(30) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    (pair.primary_dir / "barrier").write_text("after the writer")  # acknowledged: everything before applied
    stop_both(pair)
    assert_same_trees(pair)
    # Live writes that reach files not copied yet are expected during a resync, never an error.
    assert "ERROR" not in pair.log("secondary"), pair.log("secondary")


@pytest.mark.slow
def test_only_changed_blocks_are_sent(pair: Pair) -> None:
    size = 64 * 1024 * 1024
    data = bytearray(os.urandom(size))
    (pair.primary_dir / "big").write_bytes(data)
    data[10 * BLOCK : 11 * BLOCK] = os.urandom(BLOCK)
    (pair.secondary_dir / "big").write_bytes(data)
    os.utime(pair.secondary_dir / "big", ns=(0, 0))
    pair.start("durable")
    insync = next(e for e in pair.events("primary") if e.get("state") == "in-sync")
    ratio = insync["wireBytes"] / BLOCK
    print(
        f"resync of one changed 64 KiB block in 64 MiB: data {insync['dataBytes']} B, wire {insync['wireBytes']} B, "
        f"wire/changed = {ratio:.3f}"
    )
    assert insync["dataBytes"] == BLOCK
    assert ratio < 1.1
    stop_both(pair)
    assert_same_trees(pair)


def test_sigterm_with_the_peer_gone_leaves_no_mount(pair: Pair) -> None:
    pair.start_primary()  # the secondary never runs
    (pair.primary_dir / "f").write_text("local")
    assert pair.stop("primary", timeout=5) == 0, pair.log("primary")
    assert not mounted(pair.primary_dir)
    events = pair.events("primary")
    assert events[0] == {"event": "mounted", "dir": str(pair.primary_dir)}
    assert events[-1] == {"event": "stopped"}
    assert (pair.primary_dir / "f").read_text() == "local"
