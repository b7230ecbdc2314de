"""A peer that goes silent ends the stream: its host (a partition, a power cut: no reset, no FIN), or
only its replicator (stopped: its kernel still acknowledges every byte).

Each replicator runs in a network namespace of its own, with a router namespace between them; the
partition makes the router drop every packet (a pfifo qdisc of length 0 on its links), so that
neither host's kernel learns anything. Within the peer timeout the primary's waiting writes
complete locally and the secondary lets go of the dead session; once the router forwards again
the pair resyncs by itself.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.daemons import freeze
from tests.integration.replication.pairs import Pair
from tests.integration.replication.test_replication_resync import assert_same_trees
from tests.netns import ip, namespace, tc

PEER_TIMEOUT = "2"
SECONDARY = "10.213.8.2"  # the primary is 10.213.7.1, the router .254 on both


@contextmanager
def two_hosts() -> Iterator[tuple[str, str, str]]:
    """Two hosts, 10.213.7.1 and 10.213.8.2, and a router between them: three namespaces, deleted on exit."""
    with namespace("tq") as primary, namespace("tq") as router, namespace("tq") as secondary:
        for host, net in ((primary, "10.213.7"), (secondary, "10.213.8")):
            ip("link", "add", "uplink", "type", "veth", "peer", "name", f"to-{net[-1]}", "netns", router, netns=host)
            ip("addr", "add", f"{net}.{1 if host == primary else 2}/24", "dev", "uplink", netns=host)
            ip("addr", "add", f"{net}.254/24", "dev", f"to-{net[-1]}", netns=router)
            ip("link", "set", "uplink", "up", netns=host)
            ip("link", "set", f"to-{net[-1]}", "up", netns=router)
            ip("route", "add", "default", "via", f"{net}.254", netns=host)
        # The router's own /proc/sys/net (the namespace's), without needing procps' sysctl.
        ip("netns", "exec", router, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")
        yield primary, router, secondary


@contextmanager
def partitioned(router: str) -> Iterator[None]:
    """The router drops every packet it would forward (a pfifo of length 0 on both its links).

    Both hosts' own stacks send as usual and nothing answers: what a pulled cable or a power cut
    on the far side looks like. (A drop on a host's own link is seen by its TCP as local congestion.)
    """
    links = ("to-7", "to-8")
    for dev in links:
        tc("qdisc", "add", "dev", dev, "root", "pfifo", "limit", "0", netns=router)
    try:
        yield
    finally:
        for dev in links:
            tc("qdisc", "del", "dev", dev, "root", netns=router)


def write_in_background(path: Path) -> tuple[threading.Event, list[BaseException]]:
    """pwrite 4 KiB + fsync of a new file in a thread: (set once it returned, what it raised)."""

    def write() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, b"d" * 4096, 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    return in_background(write)


def in_background(fn: Callable[[], None]) -> tuple[threading.Event, list[BaseException]]:
    """Run `fn` in a thread: (set once it returned, what it raised)."""
    done, errors = threading.Event(), []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # reported by the test, in its own thread
            errors.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    return done, errors


@pytest.mark.parametrize("ack", ["received", "durable"])
def test_a_silent_secondary_host_ends_the_stream_and_the_write_completes_locally(pair: Pair, ack: str) -> None:
    with two_hosts() as (primary, router, secondary):
        pair.host, pair.netns = SECONDARY, {"primary": primary, "secondary": secondary}
        pair.extra = ["--peer-timeout", PEER_TIMEOUT]
        pair.start(ack)
        (pair.primary_dir / "before").write_bytes(b"b" * 8192)
        seen = len(pair.events("primary")), len(pair.events("secondary"))
        with partitioned(router):
            done, errors = write_in_background(pair.primary_dir / "during")
            lost = pair.wait_event("primary", lambda e: e.get("state") == "disconnected", 60, seen[0])
            # A hang detector, not a timing: without the peer timeout this waits ~15 minutes.
            assert done.wait(60), "the write through the primary still waits for the silent secondary"
            assert not errors, errors
            # Whichever notices first: the kernel (data unacknowledged) or the pings (no pong).
            assert "silent for 2 s" in lost["reason"] or "answered nothing for" in lost["reason"], lost
            pair.wait_event("secondary", lambda e: e.get("state") == "disconnected", 60, seen[1])
        assert "the peer's host was silent for 2 s (TCP_USER_TIMEOUT)" in pair.log("secondary")
        pair.wait_in_sync(after=seen[0])
        assert (pair.secondary_dir / "during").read_bytes() == b"d" * 4096
        assert_same_trees(pair)


def test_a_secondary_whose_replicator_hangs_is_dropped_and_the_write_completes_locally(pair: Pair) -> None:
    pair.extra = ["--peer-timeout", PEER_TIMEOUT]
    # No read-only mount on the secondary: its daemon is the process stopped here.
    pair.start("received", secondary_mount=False)
    (pair.primary_dir / "before").write_bytes(b"b" * 8192)
    seen = len(pair.events("primary"))
    freeze(pair.pid("secondary"))
    try:
        done, errors = write_in_background(pair.primary_dir / "during")
        lost = pair.wait_event("primary", lambda e: e.get("state") == "disconnected", 60, seen)
        # A hang detector, not a timing: the stopped replicator's kernel acknowledges every byte,
        # so without the pings this write waits for as long as the process stays stopped.
        assert done.wait(60), "the write through the primary still waits for the stopped secondary"
        assert not errors, errors
        assert "the peer's replicator answered nothing for" in lost["reason"], lost
    finally:
        os.kill(pair.pid("secondary"), signal.SIGCONT)
    pair.wait_in_sync(after=seen)
    assert (pair.secondary_dir / "during").read_bytes() == b"d" * 4096
    assert_same_trees(pair)
