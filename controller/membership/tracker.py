"""The peer tracker: pure bookkeeping of which peer was heard, on which network, when, and what it said.

No clock, no I/O: every method takes ``now`` (the loop time of this node), so timeouts are tested with
plain numbers. Liveness comes only from when datagrams arrived here, never from the send time they carry.

Rules:
- A network of a peer is up while a heartbeat arrived on it less than ``timeout`` ago; the peer is up
  while any of its networks is. One network falling silent is a ``NetworkLost`` event, not a loss.
- Within one boot id, a datagram whose sequence is not greater than the last one accepted on the same
  network is a replay or arrived out of order: it is dropped and counted, and keeps nobody alive. The
  module states come from the newest sequence accepted on any network.
- A new boot id is a restarted daemon: its sequence starts anew. Boot ids already replaced are refused,
  so that a datagram recorded before a restart cannot be replayed after it.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from controller.decide import PeerView, State
from controller.membership.events import (
    Event,
    NetworkLost,
    NetworkRestored,
    PeerFound,
    PeerLost,
    PeerRestarted,
)
from controller.membership.heartbeat import Echo, Heartbeat, ModuleBeat

RETIRED_BOOTS = 16
# Smoothing of the round trip, as TCP's SRTT (RFC 6298): new = 7/8 old + 1/8 sample.
RTT_GAIN = 0.125


@dataclass(frozen=True)
class LinkStatus:
    """One network of one peer, at one instant."""

    network: str
    up: bool
    last_heard: float | None


@dataclass(frozen=True)
class PeerStatus:
    """One peer at one instant: liveness per network, the last module states it sent, round trip, drops."""

    node: str
    up: bool
    last_heard: float | None
    links: dict[str, LinkStatus]
    boot: bytes | None
    modules: dict[str, ModuleBeat]
    rtt: float | None  # the latest sample, in seconds
    srtt: float | None  # smoothed
    dropped: dict[str, int]


@dataclass(frozen=True)
class Receipt:
    """What became of one received heartbeat."""

    accepted: bool
    reason: str = ""  # why it was dropped: Replayed, StaleBoot, UnknownNode, OwnName, WrongNetwork
    events: tuple[Event, ...] = ()


@dataclass
class _Link:
    last_heard: float | None = None
    last_seq: int = -1
    up: bool = False
    lost: bool = False  # reported lost while the peer stayed up: its return is news
    silent_since: float | None = None  # timed out; reported lost once another network carries a later heartbeat


@dataclass
class _Peer:
    name: str
    links: dict[str, _Link]
    up: bool = False
    boot: bytes | None = None
    retired: deque[bytes] = field(default_factory=lambda: deque(maxlen=RETIRED_BOOTS))
    max_seq: int = -1
    modules: dict[str, ModuleBeat] = field(default_factory=dict)
    their_sent: float | None = None  # the newest heartbeat's send time, echoed back to the peer
    received_at: float | None = None
    echo_used: float | None = None  # our send time whose echo last gave a round-trip sample
    rtt: float | None = None
    srtt: float | None = None
    dropped: Counter[str] = field(default_factory=Counter)

    def last_heard(self) -> float | None:
        heard = [link.last_heard for link in self.links.values() if link.last_heard is not None]
        return max(heard) if heard else None


class Tracker:
    """The peers of one node as their heartbeats describe them."""

    def __init__(self, *, node: str, peers: Iterable[str], networks: Sequence[str], timeout: float) -> None:
        if timeout <= 0:
            raise ValueError(f"heartbeat timeout must be positive, not {timeout}")
        self.node = node
        self.networks = tuple(networks)
        self.timeout = timeout
        self._peers = {p: _Peer(p, {n: _Link() for n in self.networks}) for p in peers if p != node}
        self.dropped: Counter[str] = Counter()  # datagrams no known peer can be charged with

    def receive(self, network: str, beat: Heartbeat, now: float) -> Receipt:
        """Account for a heartbeat that arrived on ``network`` at ``now``."""
        events = list(self.check(now))
        peer = self._peers.get(beat.node)
        reason = self._refusal(network, beat, peer)
        if reason or peer is None:
            return self._drop(peer, reason, events)
        if beat.boot != peer.boot:
            if beat.boot in peer.retired:
                return self._drop(peer, "StaleBoot", events)
            events.extend(self._new_boot(peer, beat.boot, now))
        link = peer.links[network]
        if beat.seq <= link.last_seq:
            return self._drop(peer, "Replayed", events)
        link.last_seq, link.last_heard = beat.seq, now
        if beat.seq > peer.max_seq:
            peer.max_seq, peer.modules = beat.seq, dict(beat.modules)
            peer.their_sent, peer.received_at = beat.sent, now
        self._sample_rtt(peer, beat.echoes, now)
        events.extend(self._confirm_losses(peer))
        if not link.up:
            link.up = True
            if peer.up and link.lost:
                events.append(NetworkRestored(peer.name, network, now))
            link.lost, link.silent_since = False, None
        if not peer.up:
            peer.up = True
            events.append(PeerFound(peer.name, network, now))
        return Receipt(True, events=tuple(events))

    def check(self, now: float) -> tuple[Event, ...]:
        """The losses that happened by ``now``, each dated when its timeout ran out, in order."""
        events: list[Event] = []
        for peer in self._peers.values():
            events.extend(self._expire(peer, now))
            events.extend(self._confirm_losses(peer))
        return tuple(sorted(events, key=lambda e: e.at))

    def status(self, now: float) -> dict[str, PeerStatus]:
        """Every peer, per network: up or down and when last heard."""
        return {name: self._status(peer, now) for name, peer in self._peers.items()}

    def beat(
        self,
        peer: str,
        module: str,
        now: float,
        *,
        timeout: float | None = None,
        networks: Iterable[str] | None = None,
    ) -> ModuleBeat | None:
        """What ``peer`` last said of ``module``; None when it is lost (per the module's own timeout and networks).

        A live peer that says nothing of the module is STOP: it neither serves it, nor claims, nor grants.
        """
        p = self._peers[peer]
        limit = self.timeout if timeout is None else timeout
        nets = self.networks if networks is None else tuple(networks)
        if not any(self._alive(p.links[n].last_heard, now, limit) for n in nets if n in p.links):
            return None
        return p.modules.get(module, ModuleBeat(State.STOP))

    def view(self, peer: str, module: str, now: float, *, timeout: float | None = None) -> PeerView | None:
        """The PeerView decide takes for ``module``, or None when the peer is lost."""
        beat = self.beat(peer, module, now, timeout=timeout)
        return None if beat is None else beat.view()

    def echoes(self, now: float) -> tuple[Echo, ...]:
        """For our next heartbeat: each peer's newest send time and how long we have held it."""
        return tuple(
            Echo(p.name, p.their_sent, max(0.0, now - p.received_at))
            for p in self._peers.values()
            if p.their_sent is not None and p.received_at is not None
        )

    def next_deadline(self) -> float | None:
        """The earliest instant at which a network or a peer may be lost, for scheduling the next check."""
        ends = [
            link.last_heard + self.timeout
            for p in self._peers.values()
            for link in p.links.values()
            if link.up and link.last_heard is not None
        ]
        return min(ends) if ends else None

    def _refusal(self, network: str, beat: Heartbeat, peer: _Peer | None) -> str:
        if beat.node == self.node:
            return "OwnName"
        if peer is None:
            return "UnknownNode"
        if network not in peer.links or beat.network != network:
            return "WrongNetwork"
        return ""

    def _drop(self, peer: _Peer | None, reason: str, events: list[Event]) -> Receipt:
        (peer.dropped if peer is not None else self.dropped)[reason] += 1
        return Receipt(False, reason, tuple(events))

    def _new_boot(self, peer: _Peer, boot: bytes, now: float) -> list[Event]:
        restarted = peer.boot is not None
        if peer.boot is not None:
            peer.retired.append(peer.boot)
        peer.boot, peer.max_seq, peer.modules = boot, -1, {}
        peer.their_sent = peer.received_at = None
        for link in peer.links.values():
            link.last_seq = -1
        return [PeerRestarted(peer.name, now, boot)] if restarted else []

    def _sample_rtt(self, peer: _Peer, echoes: tuple[Echo, ...], now: float) -> None:
        mine = next((e for e in echoes if e.node == self.node), None)
        if mine is None or (peer.echo_used is not None and mine.sent <= peer.echo_used):
            return
        sample = now - mine.sent - mine.held
        if not 0 <= sample < self.timeout:
            return  # an echo of a send time from before this tracker's clock, or nonsense
        peer.echo_used, peer.rtt = mine.sent, sample
        peer.srtt = sample if peer.srtt is None else (1 - RTT_GAIN) * peer.srtt + RTT_GAIN * sample

    def _expire(self, peer: _Peer, now: float) -> list[Event]:
        if not peer.up:
            return []
        ending = sorted(
            (link.last_heard + self.timeout, net)
            for net, link in peer.links.items()
            if link.up and not self._alive(link.last_heard, now, self.timeout)
        )
        events: list[Event] = []
        for at, net in ending:
            if not peer.links[net].up:
                continue
            peer.links[net].up = False
            if any(link.up and self._alive(link.last_heard, at, self.timeout) for link in peer.links.values()):
                peer.links[net].silent_since = at
                continue
            for link in peer.links.values():
                link.up = link.lost = False
                link.silent_since = None
            peer.up = False
            last = peer.last_heard()
            events.append(PeerLost(peer.name, at, at if last is None else last))
            break
        return events

    def _confirm_losses(self, peer: _Peer) -> list[Event]:
        """A timed-out network is lost, not the peer, once another network carries a heartbeat sent after it.

        When a peer dies, its networks fall silent microseconds apart: the first to time out is no news.
        """
        events: list[Event] = []
        for net, link in peer.links.items():
            at = link.silent_since
            if at is None:
                continue
            continuing = tuple(
                n
                for n, other in peer.links.items()
                if n != net and other.last_heard is not None and other.last_heard > at
            )
            if continuing:
                link.silent_since, link.lost = None, True
                events.append(NetworkLost(peer.name, net, at, continuing))
        return events

    def _alive(self, last: float | None, now: float, timeout: float) -> bool:
        return last is not None and now - last < timeout

    def _status(self, peer: _Peer, now: float) -> PeerStatus:
        links = {
            n: LinkStatus(n, self._alive(link.last_heard, now, self.timeout), link.last_heard)
            for n, link in peer.links.items()
        }
        return PeerStatus(
            node=peer.name,
            up=any(link.up for link in links.values()),
            last_heard=peer.last_heard(),
            links=links,
            boot=peer.boot,
            modules=dict(peer.modules),
            rtt=peer.rtt,
            srtt=peer.srtt,
            dropped=dict(peer.dropped),
        )
