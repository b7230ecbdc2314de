"""Heartbeats over real UDP sockets on loopback: node1 and node2 on networks lan and backup.

All of 127.0.0.0/8 is loopback on Linux, so each node binds its own addresses without any setup.
Small pulse and timeout, generous deadlines; the tests wait on events, never on durations.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import AsyncIterator, Callable

import pytest

from controller.decide import PeerView, State
from controller.membership.endpoint import Endpoint
from controller.membership.events import Event, NetworkLost, PeerFound, PeerLost, PeerRestarted
from controller.membership.heartbeat import ModuleBeat
from controller.membership.transport import UdpTransport
from tests.conftest import ExpectedLogs

PULSE, TIMEOUT = 0.05, 0.5
DEADLINE = 10.0
KEY = b"k" * 32
ADDRESSES = {
    "node1": {"lan": "127.0.0.1", "backup": "127.0.1.1"},
    "node2": {"lan": "127.0.0.2", "backup": "127.0.1.2"},
}


def free_port() -> int:
    """A UDP port free on every test address (another test run may hold some)."""
    for _ in range(50):
        port = random.randint(20000, 60000)
        sockets = []
        try:
            for addresses in ADDRESSES.values():
                for address in addresses.values():
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    sockets.append(s)
                    s.bind((address, port))
            return port
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no UDP port is free on every loopback test address")


class Node:
    """One running endpoint and the events it reported."""

    def __init__(self, name: str, port: int, key: bytes | None = KEY) -> None:
        self.events: list[Event] = []
        self.endpoint = Endpoint(
            node=name,
            addresses=ADDRESSES,
            networks=["lan", "backup"],
            transport=UdpTransport(),
            payload=lambda: {"db": ModuleBeat(State.SECOND, "g1")},
            key=key,
            pulse=PULSE,
            timeout=TIMEOUT,
            port=port,
            on_event=self.events.append,
        )
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.endpoint.open()
        self.task = asyncio.create_task(self.endpoint.run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.endpoint.close()

    async def wait_for(self, wanted: Callable[[Event], bool]) -> Event:
        """The first event ``wanted`` accepts, waiting for it at most DEADLINE."""
        async with asyncio.timeout(DEADLINE):
            while True:
                found = next((e for e in self.events if wanted(e)), None)
                if found is not None:
                    return found
                await asyncio.sleep(PULSE / 5)

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(DEADLINE):
            while not condition():
                await asyncio.sleep(PULSE / 5)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Node, Node]]:
    port = free_port()
    nodes = Node("node1", port), Node("node2", port)
    try:
        for n in nodes:
            await n.start()
        yield nodes
    finally:
        for n in nodes:
            await n.stop()


def both_links_up(node: Node, peer: str) -> Callable[[], bool]:
    def check() -> bool:
        status = node.endpoint.status()[peer]
        return all(link.up for link in status.links.values()) and status.srtt is not None

    return check


async def test_two_nodes_find_each_other_on_both_networks_and_measure_the_round_trip(pair: tuple[Node, Node]) -> None:
    one, two = pair
    await one.wait_for(lambda e: isinstance(e, PeerFound) and e.node == "node2")
    await two.wait_for(lambda e: isinstance(e, PeerFound) and e.node == "node1")
    await one.wait_until(both_links_up(one, "node2"))
    assert one.endpoint.view("node2", "db") == PeerView(State.SECOND)
    srtt = one.endpoint.status()["node2"].srtt
    assert srtt is not None and 0 <= srtt < TIMEOUT


async def test_one_network_down_is_not_a_peer_loss(pair: tuple[Node, Node], expected_logs: ExpectedLogs) -> None:
    expected_logs.expect(r"^network lan lost, heartbeats continue on backup")
    one, two = pair
    await one.wait_until(both_links_up(one, "node2"))
    await two.wait_until(both_links_up(two, "node1"))
    one.endpoint.links["lan"].close()  # node1's lan socket is gone: nothing crosses lan either way
    lost = await two.wait_for(lambda e: isinstance(e, NetworkLost))
    assert lost == NetworkLost("node1", "lan", lost.at, continuing=("backup",))
    await one.wait_for(lambda e: isinstance(e, NetworkLost) and e.network == "lan")
    # heartbeats keep arriving on backup for more than a whole timeout after the lan went
    await two.wait_until(lambda: (two.endpoint.status()["node1"].links["backup"].last_heard or 0) > lost.at + TIMEOUT)
    assert not [e for e in one.events + two.events if isinstance(e, PeerLost)]
    assert two.endpoint.view("node1", "db") == PeerView(State.SECOND)


async def test_the_peer_is_lost_when_both_networks_stop_and_found_again_when_it_restarts(
    pair: tuple[Node, Node], expected_logs: ExpectedLogs
) -> None:
    expected_logs.expect(r"^peer node2 lost, no heartbeat on any network")
    one, two = pair
    await one.wait_for(lambda e: isinstance(e, PeerFound))
    await two.stop()
    lost = await one.wait_for(lambda e: isinstance(e, PeerLost))
    assert lost.at - lost.last_heard == pytest.approx(TIMEOUT)
    assert one.endpoint.view("node2", "db") is None
    again = Node("node2", one.endpoint.port)
    try:
        await again.start()
        restarted = await one.wait_for(lambda e: isinstance(e, PeerRestarted))
        assert restarted.boot == again.endpoint.boot
        found = [e for e in one.events if isinstance(e, PeerFound)]
        assert len(found) == 2 and found[1].at >= lost.at
    finally:
        await again.stop()


async def test_garbage_and_a_stranger_key_are_dropped_while_heartbeats_go_on(
    pair: tuple[Node, Node], expected_logs: ExpectedLogs
) -> None:
    expected_logs.expect(r"^heartbeat dropped: datagram starts with b'ga'")
    one, _ = pair
    await one.wait_until(both_links_up(one, "node2"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.2", 0))
        s.sendto(b"garbage", ("127.0.0.1", one.endpoint.port))
    await one.wait_until(lambda: one.endpoint.dropped["NotAHeartbeat"] == 1)
    assert one.endpoint.status()["node2"].up
