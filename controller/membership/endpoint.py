"""One node's heartbeat endpoint: pulses our heartbeat on every network and feeds the peers' into a tracker.

The pulse runs on its own coroutine and reads only memory (the ``payload`` callback returns the module
states the reconcile loop last decided), so no script, fsync or replication frame can delay it.
Received datagrams are decoded and accounted for in the socket callback itself: that is a few
microseconds of pure work, never a wait.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Self

from controller.decide import PeerView
from controller.membership.events import Event, NetworkLost, PeerLost
from controller.membership.heartbeat import BOOT_BYTES, Heartbeat, HeartbeatError, ModuleBeat, decode, encode
from controller.membership.tracker import PeerStatus, Tracker
from controller.membership.transport import DEFAULT_PORT, Link, Transport
from controller.resources.kinds import ClusterSpec

log = logging.getLogger("tandem.membership")

Payload = Callable[[], Mapping[str, ModuleBeat]]
# Let the loop's timer fire a hair late rather than early, so a check at a deadline finds it passed.
DEADLINE_SLACK = 0.001
# Spoofed sources are unbounded; what we remember having warned about is not.
MAX_WARNED = 1024


class Endpoint:
    """Heartbeats of one node: ours out every ``pulse``, the peers' in, membership events to ``on_event``."""

    def __init__(
        self,
        *,
        node: str,
        addresses: Mapping[str, Mapping[str, str]],
        networks: Sequence[str],
        transport: Transport,
        payload: Payload,
        key: bytes | None,
        pulse: float,
        timeout: float,
        port: int = DEFAULT_PORT,
        on_event: Callable[[Event], None] | None = None,
        clock: Callable[[], float] | None = None,
        boot: bytes | None = None,
    ) -> None:
        if not 0 < pulse < timeout:
            raise ValueError(f"heartbeat pulse ({pulse}s) must be positive and shorter than the timeout ({timeout}s)")
        self.node = node
        self.networks = tuple(networks)
        self.pulse_interval = pulse
        self.port = port
        self.boot = boot if boot is not None else secrets.token_bytes(BOOT_BYTES)
        self.tracker = Tracker(node=node, peers=addresses, networks=self.networks, timeout=timeout)
        self.dropped: Counter[str] = Counter()  # datagrams refused before reaching the tracker, by reason
        self.failed_pulses = 0  # pulses that sent nothing because the heartbeat could not be built
        self.listening_since: float | None = None
        self._addresses = {n: dict(a) for n, a in addresses.items()}
        self._transport = transport
        self._payload = payload
        self._key = key
        self._on_event = on_event
        self._clock = clock
        self._links: dict[str, Link] = {}
        self._seq = 0
        self._warned: set[tuple[str, str]] = set()

    @classmethod
    def for_cluster(cls, spec: ClusterSpec, node: str, **kw: object) -> Self:
        """An endpoint for ``node`` on every network of the Cluster."""
        addresses = {n.name: n.addresses for n in spec.nodes}
        return cls(node=node, addresses=addresses, networks=spec.networks, **kw)  # type: ignore[arg-type]

    @property
    def links(self) -> Mapping[str, Link]:
        """The bound link of each network."""
        return dict(self._links)

    def now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    async def open(self) -> None:
        """Bind one link per network to this node's address on it."""
        try:
            for network in self.networks:
                address = self._addresses[self.node][network]
                self._links[network] = await self._transport.bind(
                    network=network, address=address, port=self.port, receive=self._receiver(network)
                )
        except BaseException:
            self.close()
            raise
        self.listening_since = self.now()
        log.info(
            "heartbeats start node=%s networks=%s port=%d authenticated=%s",
            self.node,
            ",".join(self.networks),
            self.port,
            self._key is not None,
        )

    def close(self) -> None:
        """Close every link; idempotent."""
        for link in self._links.values():
            link.close()
        self._links.clear()

    async def run(self) -> None:
        """Pulse and check timeouts until cancelled, then close the links."""
        if not self._links:
            await self.open()
        try:
            next_pulse = self.now()
            while True:
                now = self.now()
                if now >= next_pulse:
                    self._pulse_safely()
                    next_pulse = max(next_pulse + self.pulse_interval, now)
                self.check()
                deadline = self.tracker.next_deadline()
                wake = next_pulse if deadline is None else min(next_pulse, deadline + DEADLINE_SLACK)
                await asyncio.sleep(max(0.0, wake - self.now()))
        finally:
            self.close()

    def pulse(self) -> int:
        """Send the current heartbeat once on every network to every peer; the number of datagrams sent."""
        modules = dict(self._payload())
        now = self.now()
        echoes = self.tracker.echoes(now)
        sent = 0
        for network, link in list(self._links.items()):
            self._seq += 1
            beat = Heartbeat(self.node, network, self.boot, self._seq, now, modules, echoes)
            data = encode(beat, self._key)
            for peer, addresses in self._addresses.items():
                if peer != self.node and network in addresses:
                    sent += link.send(data, addresses[network], self.port)
        return sent

    def check(self) -> tuple[Event, ...]:
        """Report the losses whose timeout ran out by now."""
        events = self.tracker.check(self.now())
        self._report(events)
        return events

    def status(self) -> dict[str, PeerStatus]:
        return self.tracker.status(self.now())

    def view(self, peer: str, module: str, *, timeout: float | None = None) -> PeerView | None:
        """What decide takes of ``peer`` for ``module``: None when the peer is lost."""
        return self.tracker.view(peer, module, self.now(), timeout=timeout)

    def _pulse_safely(self) -> None:
        """One pulse; whatever fails is logged once, and the next pulse tries again."""
        try:
            self.pulse()
        except HeartbeatError as exc:
            self.failed_pulses += 1
            self._warn_once("pulse", exc.code, logging.ERROR, "heartbeat not sent: %s node=%s", exc.message, self.node)
        except Exception:  # a bug in the payload must not stop the heartbeats of a later, fixed tick
            self.failed_pulses += 1
            if ("pulse", "bug") not in self._warned:
                self._warned.add(("pulse", "bug"))
                log.exception("heartbeat not sent: building it failed node=%s", self.node)

    def _receiver(self, network: str) -> Callable[[bytes, str], None]:
        def receive(data: bytes, source: str) -> None:
            self._received(network, data, source)

        return receive

    def _received(self, network: str, data: bytes, source: str) -> None:
        now = self.now()
        try:
            beat = decode(data, self._key)
        except HeartbeatError as exc:
            self._refuse(network, source, exc.code, exc.message)
            return
        expected = self._addresses.get(beat.node, {}).get(network)
        if expected is not None and ipaddress.ip_address(expected) != ipaddress.ip_address(source):
            self._refuse(
                network, source, "WrongSource", f"heartbeat of {beat.node} comes from {source}, not {expected}"
            )
            return
        receipt = self.tracker.receive(network, beat, now)
        if not receipt.accepted:
            self._refuse(network, source, receipt.reason, f"heartbeat of {beat.node} refused: {receipt.reason}")
        self._report(receipt.events)

    def _refuse(self, network: str, source: str, code: str, message: str) -> None:
        self.dropped[code] += 1
        level = logging.INFO if code == "Replayed" else logging.WARNING
        self._warn_once(
            source, code, level, "heartbeat dropped: %s network=%s source=%s reason=%s", message, network, source, code
        )

    def _warn_once(self, who: str, code: str, level: int, fmt: str, *args: object) -> None:
        """Log the first of a kind at ``level``, the repeats at DEBUG: a flood of garbage must not flood the log."""
        first = (who, code) not in self._warned and len(self._warned) < MAX_WARNED
        if first:
            self._warned.add((who, code))
        log.log(level if first else logging.DEBUG, fmt, *args)

    def _report(self, events: Sequence[Event]) -> None:
        for event in events:
            level = logging.WARNING if isinstance(event, PeerLost | NetworkLost) else logging.INFO
            log.log(level, "%s node=%s peer=%s", event.message, self.node, event.node)
            if self._on_event is not None:
                self._on_event(event)
