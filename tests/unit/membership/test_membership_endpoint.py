"""Two endpoints over the in-memory network, stepped by hand in virtual time: partitions, drops, keys."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from controller.decide import Observed, PeerView, State, decide
from controller.membership.endpoint import Endpoint
from controller.membership.events import Event, NetworkLost, NetworkRestored, PeerFound, PeerLost, PeerRestarted
from controller.membership.heartbeat import Heartbeat, HeartbeatError, ModuleBeat, encode
from controller.membership.memory import MemoryNetwork
from tests.conftest import ExpectedLogs

KEY = b"k" * 32
PULSE, TIMEOUT = 1.0, 5.0
ADDRESSES = {
    "node1": {"lan": "10.0.0.1", "backup": "10.0.1.1"},
    "node2": {"lan": "10.0.0.2", "backup": "10.0.1.2"},
}


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Node:
    """One endpoint, what it announces, and what it reported."""

    def __init__(
        self, net: MemoryNetwork, clock: Clock | None, name: str, key: bytes | None = KEY, boot: bytes | None = None
    ) -> None:
        self.modules: dict[str, ModuleBeat] = {"db": ModuleBeat(State.SECOND, "g1")}
        self.events: list[Event] = []
        self.endpoint = Endpoint(
            node=name,
            addresses=ADDRESSES,
            networks=["lan", "backup"],
            transport=net.transport(name),
            payload=lambda: self.modules,
            key=key,
            pulse=PULSE,
            timeout=TIMEOUT,
            on_event=self.events.append,
            clock=clock,
            boot=boot,
        )

    def kinds(self) -> list[str]:
        return [type(e).__name__ for e in self.events]


async def cluster(net: MemoryNetwork, clock: Clock, **kw: bytes | None) -> tuple[Node, Node]:
    one, two = Node(net, clock, "node1"), Node(net, clock, "node2", **kw)
    await one.endpoint.open()
    await two.endpoint.open()
    return one, two


def run_for(clock: Clock, seconds: float, *nodes: Node) -> None:
    """Every node pulses once per PULSE, then checks its timeouts, for ``seconds`` of virtual time."""
    for _ in range(round(seconds / PULSE)):
        clock.t += PULSE
        for n in nodes:
            n.endpoint.pulse()
        for n in nodes:
            n.endpoint.check()


async def test_two_nodes_find_each_other_and_see_each_others_modules() -> None:
    net, clock = MemoryNetwork(), Clock()
    one, two = await cluster(net, clock)
    run_for(clock, 3, one, two)
    assert one.events == [PeerFound("node2", "lan", 1.0)]
    assert two.kinds() == ["PeerFound"]
    assert one.endpoint.view("node2", "db") == PeerView(State.SECOND)
    status = one.endpoint.status()["node2"]
    assert status.up and all(link.up for link in status.links.values())
    assert status.rtt == 0.0  # delivery is instant in memory


async def test_one_network_partitioned_is_a_network_loss_on_both_sides_not_a_peer_loss(
    expected_logs: ExpectedLogs,
) -> None:
    expected_logs.expect(r"^network lan lost, heartbeats continue on backup")
    net, clock = MemoryNetwork(), Clock()
    one, two = await cluster(net, clock)
    run_for(clock, 2, one, two)
    net.partition_network("lan")
    run_for(clock, 20, one, two)
    assert one.kinds() == two.kinds() == ["PeerFound", "NetworkLost"]
    assert one.events[-1] == NetworkLost("node2", "lan", 7.0, continuing=("backup",))
    assert one.endpoint.view("node2", "db") == PeerView(State.SECOND)
    net.heal()
    run_for(clock, 1, one, two)
    assert one.events[-1] == NetworkRestored("node2", "lan", 23.0)


async def test_a_partition_between_the_nodes_loses_the_peer_and_healing_finds_it(expected_logs: ExpectedLogs) -> None:
    expected_logs.expect(r"^peer node[12] lost, no heartbeat on any network for 5s")
    net, clock = MemoryNetwork(), Clock()
    one, two = await cluster(net, clock)
    run_for(clock, 2, one, two)
    net.partition("node1", "node2")
    run_for(clock, 4, one, two)
    assert one.endpoint.view("node2", "db") is not None  # 4s of silence: not yet a timeout
    run_for(clock, 1, one, two)
    assert one.events[-1] == PeerLost("node2", 7.0, last_heard=2.0)
    assert two.kinds()[-1] == "PeerLost"
    assert one.endpoint.view("node2", "db") is None
    net.heal()
    run_for(clock, 1, one, two)
    assert one.events[-1] == PeerFound("node2", "lan", 8.0)


async def test_datagrams_dropped_for_less_than_a_timeout_change_nothing() -> None:
    net, clock = MemoryNetwork(), Clock()
    one, two = await cluster(net, clock)
    run_for(clock, 1, one, two)
    net.drop_next(3 * 4)  # three pulses of two nodes on two networks
    run_for(clock, 10, one, two)
    assert net.dropped == 12
    assert one.kinds() == two.kinds() == ["PeerFound"]


async def test_a_restarted_peer_is_recognised_by_its_new_boot_id() -> None:
    net, clock = MemoryNetwork(), Clock()
    one, two = await cluster(net, clock)
    run_for(clock, 2, one, two)
    two.endpoint.close()
    again = Node(net, clock, "node2", boot=b"\x02" * 8)
    await again.endpoint.open()
    run_for(clock, 1, one, again)
    assert one.events[-1] == PeerRestarted("node2", 3.0, b"\x02" * 8)
    assert one.endpoint.status()["node2"].dropped == {}


async def test_a_peer_with_another_key_is_never_found(expected_logs: ExpectedLogs) -> None:
    expected_logs.expect(r"^heartbeat dropped: heartbeat MAC does not match the cluster key network=(lan|backup)")
    net, clock = MemoryNetwork(), Clock()
    one, two = await cluster(net, clock, key=b"x" * 32)
    run_for(clock, 10, one, two)
    assert one.events == two.events == []
    assert one.endpoint.dropped == {"BadMac": 20}


async def test_a_heartbeat_sent_from_another_address_is_refused(expected_logs: ExpectedLogs) -> None:
    expected_logs.expect(r"^heartbeat dropped: heartbeat of node2 comes from 10.0.0.9, not 10.0.0.2")
    net, clock = MemoryNetwork(), Clock()
    one = Node(net, clock, "node1", key=None)
    await one.endpoint.open()
    intruder = await net.transport("intruder").bind(network="lan", address="10.0.0.9", port=9011, receive=print)
    forged = encode(Heartbeat("node2", "lan", b"\x03" * 8, 1, 0.0, {"db": ModuleBeat(State.STOP)}), None)
    intruder.send(forged, "10.0.0.1", 9011)
    assert one.endpoint.dropped == {"WrongSource": 1}
    assert one.events == []


async def test_a_closed_link_sends_nothing_and_the_peer_sees_that_network_go() -> None:
    net, clock = MemoryNetwork(), Clock()
    one, two = await cluster(net, clock)
    run_for(clock, 1, one, two)
    one.endpoint.links["backup"].close()
    assert one.endpoint.pulse() == 1


def test_an_endpoint_refuses_a_pulse_that_does_not_fit_in_the_timeout() -> None:
    with pytest.raises(ValueError, match=r"pulse \(5.0s\) must be positive and shorter than the timeout \(5.0s\)"):
        Endpoint(
            node="node1",
            addresses=ADDRESSES,
            networks=["lan"],
            transport=MemoryNetwork().transport("node1"),
            payload=dict,
            key=None,
            pulse=5.0,
            timeout=5.0,
        )


async def test_an_oversized_heartbeat_is_an_error_logged_once_while_the_pulse_keeps_running(
    expected_logs: ExpectedLogs, caplog: pytest.LogCaptureFixture
) -> None:
    expected_logs.expect(r"^heartbeat not sent: the heartbeat of node1 would be \d+ bytes with 99 modules")
    one = Node(MemoryNetwork(), None, "node1")  # the loop's own clock: run() really sleeps
    one.endpoint.pulse_interval = 0.001
    one.modules = {f"module-{i:02d}": ModuleBeat(State.STOP, "g" * 32) for i in range(99)}
    await one.endpoint.open()
    with pytest.raises(HeartbeatError, match="would be"):
        one.endpoint.pulse()
    task = asyncio.create_task(one.endpoint.run())
    for _ in range(1000):
        await asyncio.sleep(0.001)
        if one.endpoint.failed_pulses >= 3 or task.done():
            break
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert one.endpoint.failed_pulses >= 3
    assert len([r for r in caplog.records if r.message.startswith("heartbeat not sent")]) == 1
    assert one.endpoint.links == {}


def tick(node: str, state: State, last: Mapping[str, bool], peer: PeerView | None, now: float) -> Observed:
    return Observed(
        node=node,
        nodes=("node1", "node2"),
        state=state,
        enabled=True,
        now=now,
        peer=peer,
        timeout=TIMEOUT,
        claiming=last["claim"],
        handing_over=last["handover"],
    )


async def test_decide_over_heartbeats_elects_exactly_one_node() -> None:
    """The wiring: each node decides from the peer's latest heartbeat and announces its decision."""
    net, clock = MemoryNetwork(), Clock()
    nodes = await cluster(net, clock)
    last = {n.endpoint.node: {"claim": False, "handover": False} for n in nodes}
    states = {n.endpoint.node: State.STOP for n in nodes}
    for _ in range(10):
        run_for(clock, 1, *nodes)
        for n, other in (nodes, nodes[::-1]):
            name = n.endpoint.node
            d = decide(tick(name, states[name], last[name], n.endpoint.view(other.endpoint.node, "db"), clock.t))
            states[name], last[name] = d.state, {"claim": d.claim, "handover": d.handover}
            n.modules = {"db": ModuleBeat(d.state, "g1", claiming=d.claim, grants=d.grant, handover=d.handover)}
    assert sorted(s.serving for s in states.values()) == [False, True]
    assert State.SECOND in states.values()
