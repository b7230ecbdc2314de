"""The peer tracker in virtual time: plain numbers for ``now``, exact events out."""

from __future__ import annotations

from dataclasses import replace

import pytest

from controller.decide import PeerView, State
from controller.membership.events import NetworkLost, NetworkRestored, PeerFound, PeerLost, PeerRestarted
from controller.membership.heartbeat import Echo, Heartbeat, ModuleBeat
from controller.membership.tracker import Tracker

TIMEOUT = 30.0
BOOT = b"\x01" * 8


def tracker() -> Tracker:
    return Tracker(node="node1", peers=["node1", "node2"], networks=["lan", "backup"], timeout=TIMEOUT)


class Peer:
    """node2's side: numbers its datagrams as a daemon does, one sequence across networks."""

    def __init__(self, boot: bytes = BOOT) -> None:
        self.boot = boot
        self.seq = 0

    def beat(self, network: str, state: State = State.SECOND, **kw: object) -> Heartbeat:
        self.seq += 1
        base: dict[str, object] = dict(modules={"db": ModuleBeat(state, "g1")}, sent=float(self.seq))
        return Heartbeat("node2", network, self.boot, self.seq, **{**base, **kw})  # type: ignore[arg-type]


def test_the_first_heartbeat_finds_the_peer() -> None:
    t = tracker()
    receipt = t.receive("lan", Peer().beat("lan"), now=1.0)
    assert receipt.accepted
    assert receipt.events == (PeerFound("node2", "lan", 1.0),)
    assert t.status(1.0)["node2"].up


def test_the_peer_is_lost_exactly_one_timeout_after_the_last_heartbeat_on_any_network() -> None:
    t, p = tracker(), Peer()
    t.receive("lan", p.beat("lan"), now=10.0)
    t.receive("backup", p.beat("backup"), now=12.0)
    assert t.check(41.999) == ()  # the lan timed out at 40, but nothing came on backup since: no news yet
    assert t.status(41.999)["node2"].up
    assert t.check(42.0) == (PeerLost("node2", 42.0, last_heard=12.0),)
    status = t.status(42.0)["node2"]
    assert not status.up
    assert {n: link.up for n, link in status.links.items()} == {"lan": False, "backup": False}
    assert t.check(100.0) == ()


def test_a_late_check_dates_each_loss_when_its_timeout_ran_out() -> None:
    t, p = tracker(), Peer()
    t.receive("lan", p.beat("lan"), now=0.0)
    t.receive("backup", p.beat("backup"), now=5.0)
    events = t.receive("backup", p.beat("backup"), now=31.0).events + t.check(500.0)
    assert [(type(e).__name__, e.at) for e in events] == [("NetworkLost", 30.0), ("PeerLost", 61.0)]


def test_a_dying_peer_whose_networks_fall_silent_microseconds_apart_is_one_peer_loss() -> None:
    t, p = tracker(), Peer()
    t.receive("lan", p.beat("lan"), now=10.0)
    t.receive("backup", p.beat("backup"), now=10.00002)
    assert t.check(30.0) == ()
    assert t.check(40.00002) == (PeerLost("node2", 40.00002, last_heard=10.00002),)


def test_a_network_that_times_out_and_comes_back_before_the_others_speak_was_never_lost() -> None:
    t, p = tracker(), Peer()
    t.receive("lan", p.beat("lan"), now=0.0)
    t.receive("backup", p.beat("backup"), now=1.0)
    t.check(30.5)
    assert t.receive("lan", p.beat("lan"), now=30.6).events == ()
    assert t.receive("backup", p.beat("backup"), now=30.7).events == ()


def test_two_networks_silent_since_the_same_instant_are_one_peer_loss() -> None:
    t, p = tracker(), Peer()
    t.receive("lan", p.beat("lan"), now=0.0)
    t.receive("backup", p.beat("backup"), now=0.0)
    assert t.check(30.0) == (PeerLost("node2", 30.0, last_heard=0.0),)


def test_one_network_lost_is_an_event_not_a_peer_loss() -> None:
    t, p = tracker(), Peer()
    t.receive("lan", p.beat("lan"), now=0.0)
    t.receive("backup", p.beat("backup"), now=0.0)
    events = []
    for now in range(1, 61):  # the lan is cut: only backup carries heartbeats, every second
        events += t.receive("backup", p.beat("backup"), now=float(now)).events
    (lost,) = events
    assert lost == NetworkLost("node2", "lan", 30.0, continuing=("backup",))
    assert lost.message == "network lan lost, heartbeats continue on backup"
    assert t.status(60.0)["node2"].up
    assert t.view("node2", "db", 60.0) == PeerView(State.SECOND)
    assert t.receive("lan", p.beat("lan"), now=61.0).events == (NetworkRestored("node2", "lan", 61.0),)


def test_a_replayed_datagram_is_dropped_counted_and_keeps_nobody_alive() -> None:
    t, p = tracker(), Peer()
    first = p.beat("lan")
    t.receive("lan", first, now=0.0)
    t.receive("lan", p.beat("lan"), now=1.0)
    for now in (2.0, 20.0, 30.5):
        receipt = t.receive("lan", first, now=now)
        assert (receipt.accepted, receipt.reason) == (False, "Replayed")
    assert t.status(30.5)["node2"].dropped == {"Replayed": 3}
    assert t.check(31.0) == (PeerLost("node2", 31.0, last_heard=1.0),)


def test_order_is_kept_per_network_and_module_states_come_from_the_newest_datagram() -> None:
    t, p = tracker(), Peer()
    older = p.beat("lan", State.SECOND)
    newer = p.beat("backup", State.ALONE)
    t.receive("backup", newer, now=1.0)
    assert t.receive("lan", older, now=1.1).accepted  # the lan's own order is intact
    assert t.view("node2", "db", 1.1) == PeerView(State.ALONE)
    assert t.status(1.1)["node2"].links["lan"].last_heard == 1.1


def test_a_datagram_cannot_be_moved_to_another_network() -> None:
    t = tracker()
    receipt = t.receive("backup", Peer().beat("lan"), now=0.0)
    assert (receipt.accepted, receipt.reason) == (False, "WrongNetwork")
    assert not t.status(0.0)["node2"].up


def test_strangers_and_our_own_name_are_dropped_and_counted() -> None:
    t = tracker()
    stranger = replace(Peer().beat("lan"), node="node9")
    ourselves = replace(Peer().beat("lan"), node="node1")
    assert t.receive("lan", stranger, now=0.0).reason == "UnknownNode"
    assert t.receive("lan", ourselves, now=0.0).reason == "OwnName"
    assert t.dropped == {"UnknownNode": 1, "OwnName": 1}


def test_a_new_boot_id_is_a_restart_and_its_sequence_starts_anew() -> None:
    t, before, after = tracker(), Peer(), Peer(boot=b"\x02" * 8)
    for now in range(5):
        t.receive("lan", before.beat("lan"), now=float(now))
    receipt = t.receive("lan", after.beat("lan", State.STOP), now=5.0)
    assert receipt.accepted
    assert receipt.events == (PeerRestarted("node2", 5.0, b"\x02" * 8),)
    assert t.view("node2", "db", 5.0) == PeerView(State.STOP)
    assert t.status(5.0)["node2"].boot == b"\x02" * 8


def test_a_datagram_of_a_replaced_boot_is_refused() -> None:
    t, before, after = tracker(), Peer(), Peer(boot=b"\x02" * 8)
    recorded = before.beat("lan")
    t.receive("lan", recorded, now=0.0)
    t.receive("lan", after.beat("lan"), now=1.0)
    assert t.receive("lan", replace(recorded, seq=10**6), now=2.0).reason == "StaleBoot"


def test_a_restarted_peer_that_was_lost_is_found_again() -> None:
    t = tracker()
    t.receive("lan", Peer().beat("lan"), now=0.0)
    assert t.check(30.0) == (PeerLost("node2", 30.0, last_heard=0.0),)
    events = t.receive("lan", Peer(boot=b"\x02" * 8).beat("lan"), now=40.0).events
    assert events == (PeerRestarted("node2", 40.0, b"\x02" * 8), PeerFound("node2", "lan", 40.0))


def test_a_receive_after_a_silent_timeout_reports_the_loss_before_the_finding() -> None:
    t, p = tracker(), Peer()
    t.receive("lan", p.beat("lan"), now=0.0)
    events = t.receive("lan", p.beat("lan"), now=45.0).events
    assert events == (PeerLost("node2", 30.0, last_heard=0.0), PeerFound("node2", "lan", 45.0))


def test_the_round_trip_comes_from_our_own_send_time_echoed_back() -> None:
    t, p = tracker(), Peer()
    # we sent at 10.0; node2 held our heartbeat 0.3s before its own, which arrives at 10.5
    t.receive("lan", p.beat("lan", echoes=(Echo("node1", 10.0, 0.3),)), now=10.5)
    assert t.status(10.5)["node2"].rtt == pytest.approx(0.2)
    # the same echo on the other network gives no second, inflated sample
    t.receive("backup", p.beat("backup", echoes=(Echo("node1", 10.0, 0.3),)), now=10.9)
    assert t.status(10.9)["node2"].rtt == pytest.approx(0.2)
    t.receive("lan", p.beat("lan", echoes=(Echo("node1", 11.0, 0.1),)), now=11.5)
    status = t.status(11.5)["node2"]
    assert status.rtt == pytest.approx(0.4)
    assert status.srtt == pytest.approx(0.2 * 7 / 8 + 0.4 / 8)


def test_our_echoes_tell_each_peer_its_send_time_and_how_long_we_held_it() -> None:
    t, p = tracker(), Peer()
    assert t.echoes(0.0) == ()
    t.receive("lan", p.beat("lan", sent=1234.5), now=10.0)
    assert t.echoes(10.25) == (Echo("node2", 1234.5, 0.25),)


def test_a_live_peer_silent_about_a_module_neither_serves_nor_grants_it() -> None:
    t = tracker()
    t.receive("lan", Peer().beat("lan"), now=0.0)
    assert t.view("node2", "web", 1.0) == PeerView(State.STOP)
    assert t.view("node2", "db", 30.0) is None


def test_a_module_may_use_its_own_timeout_and_networks() -> None:
    t, p = tracker(), Peer()
    t.receive("backup", p.beat("backup"), now=0.0)
    assert t.beat("node2", "db", 5.0, timeout=5.0) is None
    assert t.beat("node2", "db", 4.0, timeout=5.0) == ModuleBeat(State.SECOND, "g1")
    assert t.beat("node2", "db", 4.0, networks=["lan"]) is None


def test_the_next_deadline_is_the_first_instant_a_link_may_be_lost() -> None:
    t, p = tracker(), Peer()
    assert t.next_deadline() is None
    t.receive("lan", p.beat("lan"), now=3.0)
    t.receive("backup", p.beat("backup"), now=5.0)
    assert t.next_deadline() == 33.0
    t.check(33.0)
    assert t.next_deadline() == 35.0
