"""An in-memory network for membership tests: links that deliver at once, and faults on demand.

After hashicorp/raft's inmem transport: ``partition(a, b)`` cuts two nodes apart on every network,
``partition_network(name)`` silences one network for everyone, ``drop_next(n)`` loses the next n
datagrams, and ``heal()`` undoes all of it. Delivery is synchronous, so a test that steps the
endpoints by hand is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from controller.membership.transport import Link, Receive


@dataclass
class MemoryLink:
    """One node's bound address on one in-memory network."""

    net: MemoryNetwork
    node: str
    network: str
    address: str
    port: int
    receive: Receive
    closed: bool = False

    def send(self, data: bytes, address: str, port: int) -> bool:
        if self.closed:
            return False
        self.net.deliver(self, data, address, port)
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.net.links.pop((self.network, self.address, self.port), None)


@dataclass
class MemoryNetwork:
    """Every in-memory link of a test cluster, and the faults between them."""

    links: dict[tuple[str, str, int], MemoryLink] = field(default_factory=dict)
    cut: set[frozenset[str]] = field(default_factory=set)
    silent: set[str] = field(default_factory=set)
    to_drop: int = 0
    delivered: int = 0
    dropped: int = 0

    def transport(self, node: str) -> MemoryTransport:
        """The transport one node binds its links with."""
        return MemoryTransport(self, node)

    def partition(self, a: str, b: str) -> None:
        """Nothing passes between nodes ``a`` and ``b``, on any network, until heal()."""
        self.cut.add(frozenset((a, b)))

    def partition_network(self, name: str) -> None:
        """Nothing passes on network ``name`` until heal()."""
        self.silent.add(name)

    def drop_next(self, n: int) -> None:
        """Lose the next ``n`` datagrams, whoever sends them."""
        self.to_drop += n

    def heal(self) -> None:
        """Undo every partition and pending drop."""
        self.cut.clear()
        self.silent.clear()
        self.to_drop = 0

    def deliver(self, source: MemoryLink, data: bytes, address: str, port: int) -> None:
        target = self.links.get((source.network, address, port))
        if target is None:
            return
        if source.network in self.silent or frozenset((source.node, target.node)) in self.cut:
            self.dropped += 1
            return
        if self.to_drop:
            self.to_drop -= 1
            self.dropped += 1
            return
        self.delivered += 1
        target.receive(bytes(data), source.address)


@dataclass
class MemoryTransport:
    """Binds one node's links on a MemoryNetwork."""

    net: MemoryNetwork
    node: str

    async def bind(self, *, network: str, address: str, port: int, receive: Receive) -> Link:
        key = (network, address, port)
        if key in self.net.links:
            raise OSError(f"{address} port {port} on network {network} is already bound")
        link = MemoryLink(self.net, self.node, network, address, port, receive)
        self.net.links[key] = link
        return link
