"""A peer host that goes silent (a partition or a power cut: no reset, no FIN) ends the stream.

Each replicator runs in a network namespace of its own, with a router namespace between them; the
partition makes the router drop every packet (a pfifo qdisc of length 0 on its links), so that
neither host's kernel learns anything. Within the peer timeout the primary's waiting writes
complete locally and the secondary lets go of the dead session; once the router forwards again
the pair resyncs by itself.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.integration.replication.pairs import Pair
from tests.integration.replication.test_replication_resync import assert_same_trees
from tests.netns import ip, namespace

PEER_TIMEOUT = "2"
PRIMARY, SECONDARY = "10.213.7.1", "10.213.8.2"


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
        subprocess.run(
            ["ip", "netns", "exec", router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        yield primary, router, secondary


@contextmanager
def partitioned(router: str) -> Iterator[None]:
    """The router drops every packet it would forward (a pfifo of length 0 on both its links).

    Both hosts' own stacks send as usual and nothing answers: what a pulled cable or a power cut
    on the far side looks like. (A drop on a host's own link is seen by its TCP as local congestion.)
    """
    links = ("to-7", "to-8")
    for dev in links:
        _tc("qdisc", "add", "dev", dev, "root", "pfifo", "limit", "0", netns=router)
    try:
        yield
    finally:
        for dev in links:
            _tc("qdisc", "del", "dev", dev, "root", netns=router)


def _tc(*args: str, netns: str) -> None:
    done = subprocess.run(["tc", "-n", netns, *args], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"tc {' '.join(args)} failed: {done.stderr.strip()}")


@pytest.mark.parametrize("ack", ["received", "durable"])
def test_a_silent_secondary_host_ends_the_stream_and_the_write_completes_locally(pair: Pair, ack: str) -> None:
    with two_hosts() as (primary, router, secondary):
        pair.host, pair.netns = SECONDARY, {"primary": primary, "secondary": secondary}
        pair.extra = ["--peer-timeout", PEER_TIMEOUT]
        pair.start(ack)
        (pair.primary_dir / "before").write_bytes(b"b" * 8192)
        seen = len(pair.events("primary")), len(pair.events("secondary"))
        done = threading.Event()
        errors: list[BaseException] = []

        def write() -> None:
            try:
                fd = os.open(pair.primary_dir / "during", os.O_WRONLY | os.O_CREAT, 0o644)
                try:
                    os.pwrite(fd, b"d" * 4096, 0)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except BaseException as exc:  # reported below, in the test's thread
                errors.append(exc)
            finally:
                done.set()

        with partitioned(router):
            writer = threading.Thread(target=write, daemon=True)
            writer.start()
            lost = pair.wait_event("primary", lambda e: e.get("state") == "disconnected", 60, seen[0])
            # A hang detector, not a timing: without the peer timeout this waits ~15 minutes.
            assert done.wait(60), "the write through the primary still waits for the silent secondary"
            assert not errors, errors
            assert "silent for 2 s" in lost["reason"], lost
            pair.wait_event("secondary", lambda e: e.get("state") == "disconnected", 60, seen[1])
        assert "the peer's host was silent for 2 s (TCP_USER_TIMEOUT)" in pair.log("secondary")
        pair.wait_in_sync(after=seen[0])
        assert (pair.secondary_dir / "during").read_bytes() == b"d" * 4096
        assert_same_trees(pair)
