"""Heartbeat sockets: one UDP socket per network, bound to this node's address on it.

The ``Transport`` protocol is what the endpoint needs (bind a link, send on it, close it); ``UdpTransport``
is the real one and ``controller.membership.memory`` an in-memory one for tests. Sending never waits:
a datagram that the kernel cannot take at once is dropped, as the network could have dropped it, and
the next pulse carries newer news anyway.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import Protocol

# UDP; the API listens on TCP 9010, and the demo's API ports are TCP as well.
DEFAULT_PORT = 9011
RECEIVE_BYTES = 65535  # the whole datagram, so that an oversized one is refused rather than truncated
MAX_BUFFERED = 64 * 1024  # bytes queued in the transport beyond which a pulse is skipped

log = logging.getLogger("tandem.membership.transport")

Receive = Callable[[bytes, str], None]  # (datagram, source address)


class Link(Protocol):
    """One bound socket on one network."""

    network: str
    address: str

    def send(self, data: bytes, address: str, port: int) -> bool:
        """Hand one datagram to the network without waiting; False when it was not sent."""
        ...

    def close(self) -> None:
        """Stop sending and receiving; idempotent."""
        ...


class Transport(Protocol):
    """Makes links; one per network per node."""

    async def bind(self, *, network: str, address: str, port: int, receive: Receive) -> Link:
        """A link bound to ``address``:``port`` that calls ``receive`` for every datagram that arrives."""
        ...


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, network: str, receive: Receive) -> None:
        self.network = network
        self.receive = receive

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.receive(data, str(addr[0]))

    def error_received(self, exc: Exception) -> None:
        log.debug("heartbeat socket reported an error network=%s error=%s", self.network, exc)


class UdpLink:
    """A UDP socket bound to one address on one network."""

    def __init__(self, network: str, address: str, transport: asyncio.DatagramTransport) -> None:
        self.network = network
        self.address = address
        self._transport = transport

    @property
    def closed(self) -> bool:
        return self._transport.is_closing()

    def send(self, data: bytes, address: str, port: int) -> bool:
        if self._transport.is_closing() or self._transport.get_write_buffer_size() > MAX_BUFFERED:
            return False
        self._transport.sendto(data, (address, port))
        return True

    def close(self) -> None:
        self._transport.close()


class UdpTransport:
    """Real UDP sockets on the running event loop."""

    async def bind(self, *, network: str, address: str, port: int, receive: Receive) -> Link:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Datagrams(network, receive), local_addr=(address, port), family=family
            )
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"cannot bind the heartbeat socket of network {network} to {address} port {port}: {exc.strerror}",
            ) from None
        return UdpLink(network, address, transport)
