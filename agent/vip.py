"""Virtual IP addresses on this node's interfaces: adding, removing, announcing, and the ledger of what we added.

Every address the agent adds is recorded in a ledger in the state dir before it is added, so that after a crash
the next start removes what it should no longer hold and never touches an address it did not add.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import logging
import math
import os
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger("tandem.vip")

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
Addresses = list[tuple[int, IPInterface]]  # (interface index, address with prefix)

ETH_P_ARP = 0x0806
ETH_ZLEN = 60
IFF_UP = 0x1
IFF_RUNNING = 0x40
IFA_F_NODAD = 0x02
ND_NEIGHBOR_ADVERT = 136
ND_NA_FLAG_OVERRIDE = 0x20000000
ND_OPT_TARGET_LINKADDR = 2
ALL_NODES = "ff02::1"
PLACEMENT_SECONDS = 5.0  # how long a standby's reading of where its addresses go is trusted


class VipError(Exception):
    """A virtual IP that cannot be placed or announced; the message says what to change."""


@dataclass(frozen=True, order=True)
class Held:
    """One address (CIDR) on one interface."""

    address: str
    interface: str


def parse(address_cidr: str) -> IPInterface:
    """The address in CIDR form, normalised (so '10.0.0.5/24' and '10.0.0.05/24' are one address)."""
    try:
        return ipaddress.ip_interface(address_cidr)
    except ValueError:
        raise VipError(f"{address_cidr!r} is not an address in CIDR form (e.g. 192.0.2.10/24)") from None


class Ledger:
    """The addresses this agent added, in a JSON file of the state dir rewritten atomically on every change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._held = self._load()

    def held(self) -> frozenset[Held]:
        """Every address recorded as added by this agent and not yet removed."""
        return frozenset(self._held)

    def record(self, held: Held) -> None:
        """Remember an address before it is added, so a crash right after still leaves it on record."""
        if held not in self._held:
            self._held.add(held)
            self._write()

    def forget(self, held: Held) -> None:
        """Drop an address once it is gone from its interface."""
        if held in self._held:
            self._held.discard(held)
            self._write()

    def _load(self) -> set[Held]:
        try:
            data = json.loads(self.path.read_text())
            return {Held(str(parse(e["address"])), str(e["interface"])) for e in data["addresses"]}
        except FileNotFoundError:
            return set()
        except (ValueError, KeyError, TypeError, VipError) as exc:
            aside = self.path.with_name(self.path.name + ".corrupt")
            os.replace(self.path, aside)
            log.warning(
                "Address ledger is unreadable, starting with an empty one; addresses it listed will not be "
                "cleaned up. path=%s moved_to=%s error=%s",
                self.path,
                aside,
                exc,
            )
            return set()

    def _write(self) -> None:
        entries = [{"address": h.address, "interface": h.interface} for h in sorted(self._held)]
        tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"addresses": entries}, indent=2) + "\n")
        # No fsync: addresses do not survive a reboot, so the ledger only has to survive a crash of the process,
        # which the rename alone guarantees.
        os.replace(tmp, self.path)


async def find_interface(address_cidr: str) -> str:
    """The one interface with an address whose subnet contains the VIP (the VIP itself does not count)."""
    vip = parse(address_cidr)
    async with AsyncIPRoute() as ipr:
        links = await _links(ipr)
        return _subnet_interface(vip, links, await _addresses(ipr))


def _subnet_interface(vip: IPInterface, links: dict[int, _LinkInfo], addresses: Addresses) -> str:
    matches = sorted(
        {
            links[index].name
            for index, existing in addresses
            if index in links
            and existing.ip != vip.ip
            and existing.version == vip.version
            and vip.ip in existing.network
        }
    )
    if not matches:
        raise VipError(
            f"no interface has an address in the subnet of {vip}: set the VirtualIP's interface, "
            "or give this node an address on that subnet"
        )
    if len(matches) > 1:
        raise VipError(
            f"{vip} is in the subnet of several interfaces ({', '.join(matches)}): set the VirtualIP's interface"
        )
    return matches[0]


async def ensure_present(
    address_cidr: str,
    interface: str | None = None,
    *,
    ledger: Ledger,
    announce: bool = False,
    arp: ArpSocket | None = None,
    netlink: Netlink | None = None,
) -> Held:
    """Hold the address on the interface (found from the subnet when not given); a no-op when already there.

    With ``announce``, one announcement follows at once (through ``arp`` if given), whether the address
    was added or already held. With ``netlink``, where the address goes was read ahead (``Netlink.prepare``)
    and the takeover is one request on a session already open; without it, or when that reading is stale
    or no longer true, the interfaces and addresses are read first.
    """
    vip = parse(address_cidr)
    place = netlink.placement(vip, interface) if netlink is not None else None
    added: bool | None = None
    if place is not None and netlink is not None:
        try:
            added = await _add(await netlink.session(), vip, place, ledger)
        except (VipError, OSError) as exc:  # the interface went since it was read, or the session broke
            log.info(
                "The address's interface as read ahead did not take it; reading again. address=%s reason=%s", vip, exc
            )
            if isinstance(exc, OSError):
                netlink.close()
    if added is None:
        async with AsyncIPRoute() as ipr:
            links = await _links(ipr)
            addresses = await _addresses(ipr)
            place = _place(vip, interface, links, addresses)
            present = any(i == place.index and a == vip for i, a in addresses)
            added = False if present else await _add(ipr, vip, place, ledger)
        if netlink is not None:
            netlink.remember(vip, interface, place)
    assert place is not None
    if added:
        log.info("Added virtual IP. address=%s interface=%s", vip, place.name)
    if announce:
        try:
            await _announce(vip, place.name, place.index, place.mac, count=1, interval=0.0, arp=arp)
        except (VipError, OSError) as exc:  # the address is held; a lost announcement is not a failed takeover
            log.warning("Could not announce the virtual IP. address=%s interface=%s reason=%s", vip, place.name, exc)
    return Held(str(vip), place.name)


@dataclass(frozen=True)
class Placement:
    """Where an address goes: the interface's name, index and hardware address, as read at ``at`` (monotonic)."""

    name: str
    index: int
    mac: str
    at: float = 0.0


def _place(vip: IPInterface, interface: str | None, links: dict[int, _LinkInfo], addresses: Addresses) -> Placement:
    name = interface or _subnet_interface(vip, links, addresses)
    index = next((i for i, link in links.items() if link.name == name), None)
    if index is None:
        raise VipError(f"interface {name!r} does not exist on this node: check the VirtualIP's interface")
    return Placement(name, index, links[index].mac, time.monotonic())


async def _add(ipr: AsyncIPRoute, vip: IPInterface, place: Placement, ledger: Ledger) -> bool:
    """Add the address, on record in the ledger first; False when it was already there."""
    held = Held(str(vip), place.name)
    ours = held in ledger.held()
    ledger.record(held)
    try:
        # NODAD: a VIP must answer at once; duplicate detection would hold it tentative for a second or more.
        flags = IFA_F_NODAD if vip.version == 6 else 0
        await ipr.addr("add", index=place.index, address=str(vip.ip), prefixlen=vip.network.prefixlen, flags=flags)
    except NetlinkError as exc:
        if not ours:  # not added by us: an address someone else put there is never ours to remove
            ledger.forget(held)
        if exc.code == errno.EEXIST:
            return False
        raise VipError(f"cannot add {vip} on {place.name}: {os.strerror(exc.code)}") from exc
    return True


class Netlink:
    """The agent's own netlink session, and where each of its virtual IPs would go, read ahead of a takeover.

    A standby node reads its addresses' interfaces every few seconds (``prepare``), so that taking an
    address over is one netlink request on a session already open: reading every link and address first
    costs 5-15 ms on a busy node, while clients wait. A reading older than ``fresh_for`` seconds is not
    used; one that no longer holds (the interface is gone) makes the takeover read everything again.
    """

    def __init__(self, *, fresh_for: float = PLACEMENT_SECONDS) -> None:
        self.fresh_for = fresh_for
        self._ipr: AsyncIPRoute | None = None
        self._opening = asyncio.Lock()
        self._placements: dict[tuple[str, str | None], Placement] = {}
        self._read_at: dict[tuple[str, str | None], float] = {}  # when prepare last read each (monotonic)

    async def session(self) -> AsyncIPRoute:
        """The long-lived session, opened on first use (once, however many callers wait for it)."""
        async with self._opening:
            if self._ipr is None:
                ipr = AsyncIPRoute(groups=0)  # requests only: no multicast group, so nothing queues up while idle
                try:
                    await ipr.setup_endpoint()
                except BaseException:
                    ipr.close()
                    raise
                self._ipr = ipr
            return self._ipr

    def placement(self, vip: IPInterface, interface: str | None) -> Placement | None:
        """Where the address goes, if read less than ``fresh_for`` seconds ago."""
        place = self._placements.get((str(vip), interface))
        if place is None or time.monotonic() - place.at > self.fresh_for:
            return None
        return place

    def remember(self, vip: IPInterface, interface: str | None, place: Placement) -> None:
        self._placements[(str(vip), interface)] = place

    async def prepare(self, address_cidr: str, interface: str | None) -> None:
        """Read where the address goes unless a fresh reading exists; ``VipError`` if it has nowhere to go."""
        vip = parse(address_cidr)
        key = (str(vip), interface)
        if time.monotonic() - self._read_at.get(key, -math.inf) < self.fresh_for / 2:  # fresh at the next takeover
            return
        self._read_at[key] = time.monotonic()  # a reading that fails is not retried at once either
        await self.session()  # open ahead too
        # The readings use a session of their own: a netlink socket runs one dump at a time (EBUSY), and the
        # takeover's request must never wait behind one.
        async with AsyncIPRoute() as ipr:
            try:
                place = _place(vip, interface, await _links(ipr), await _addresses(ipr))
            except (VipError, NetlinkError) as exc:
                self._placements.pop(key, None)
                if isinstance(exc, NetlinkError):
                    raise VipError(f"cannot read the interfaces: {os.strerror(exc.code)}") from exc
                raise
        self.remember(vip, interface, place)

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None


async def ensure_absent(address_cidr: str, interface: str | None = None, *, ledger: Ledger) -> list[Held]:
    """Remove the address from the interface (from every interface when none is given); a no-op when absent."""
    vip = parse(address_cidr)
    removed: list[Held] = []
    async with AsyncIPRoute() as ipr:
        names = await _link_names(ipr)
        for index, existing in await _addresses(ipr):
            if existing == vip and (interface is None or names[index] == interface):
                await _delete(ipr, index, vip)
                removed.append(Held(str(vip), names[index]))
    for held in removed:
        log.info("Removed virtual IP. address=%s interface=%s", held.address, held.interface)
    for held in ledger.held():
        if held.address == str(vip) and (interface is None or held.interface == interface):
            ledger.forget(held)
    return removed


async def cleanup_stale(ledger: Ledger, should_hold: set[str]) -> list[Held]:
    """Remove every recorded address not in should_hold (CIDRs); addresses never recorded are left alone."""
    keep = {str(parse(a)) for a in should_hold}
    removed: list[Held] = []
    async with AsyncIPRoute() as ipr:
        names = await _link_names(ipr)
        present = {Held(str(a), names[i]) for i, a in await _addresses(ipr)}
        for held in sorted(ledger.held()):
            if held.address in keep:
                continue
            if held in present:
                await _delete(ipr, await _index(ipr, held.interface), parse(held.address))
                removed.append(held)
                log.info(
                    "Removed a stale virtual IP left by an earlier run. address=%s interface=%s",
                    held.address,
                    held.interface,
                )
            ledger.forget(held)
    return removed


async def link_up(interface: str) -> bool:
    """True when the interface is administratively up and has carrier; a missing interface counts as down."""
    async with AsyncIPRoute() as ipr:
        indexes = await ipr.link_lookup(ifname=interface)
        if not indexes:
            return False
        (link,) = await ipr.link("get", index=indexes[0])
    flags = int(link["flags"])
    return bool(flags & IFF_UP and flags & IFF_RUNNING)


async def announce(
    address_cidr: str, interface: str | None = None, *, count: int, interval: float, arp: ArpSocket | None = None
) -> int:
    """Tell the segment that this node's MAC now owns the VIP: gratuitous ARP (IPv4) or unsolicited NA (IPv6).

    ``arp``: the agent's long-lived packet socket; without it, one is opened and closed for this call.
    """
    vip = parse(address_cidr)
    async with AsyncIPRoute() as ipr:
        links = await _links(ipr)
        place = _place(vip, interface, links, [] if interface else await _addresses(ipr))
    return await _announce(vip, place.name, place.index, place.mac, count=count, interval=interval, arp=arp)


async def _announce(
    vip: IPInterface, name: str, index: int, mac_text: str, *, count: int, interval: float, arp: ArpSocket | None
) -> int:
    if not mac_text or mac_text == "00:00:00:00:00:00":
        log.info("Interface has no hardware address, nothing to announce. address=%s interface=%s", vip, name)
        return 0
    mac = bytes.fromhex(mac_text.replace(":", ""))
    sender = (
        _ArpSender(name, mac, vip.ip, arp)
        if isinstance(vip, ipaddress.IPv4Interface)
        else _NaSender(index, mac, vip.ip)
    )
    sent = 0
    with sender:
        for i in range(count):
            if i:
                await asyncio.sleep(interval)
            await sender.send()
            sent += 1
    kind = "gratuitous ARP" if vip.version == 4 else "unsolicited neighbour advertisement"
    log.info("Announced virtual IP with %s. address=%s interface=%s mac=%s count=%d", kind, vip, name, mac_text, sent)
    return sent


def arp_announcement(mac: bytes, ip: ipaddress.IPv4Address) -> bytes:
    """An Ethernet broadcast ARP request with sender = target = the VIP (RFC 5227 announcement)."""
    ethernet = b"\xff" * 6 + mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip.packed + b"\x00" * 6 + ip.packed
    return (ethernet + arp).ljust(ETH_ZLEN, b"\x00")


def neighbour_advertisement(mac: bytes, ip: ipaddress.IPv6Address) -> bytes:
    """An unsolicited ICMPv6 neighbour advertisement with the override flag; the kernel fills in the checksum."""
    header = struct.pack("!BBHI", ND_NEIGHBOR_ADVERT, 0, 0, ND_NA_FLAG_OVERRIDE)
    return header + ip.packed + struct.pack("!BB", ND_OPT_TARGET_LINKADDR, 1) + mac


class ArpSocket:
    """One raw packet socket for every gratuitous ARP of this agent, kept open for the agent's lifetime.

    Opened with protocol 0 and never bound, it receives nothing; frames go out with ``sendto`` naming the
    interface. Kept open because the kernel waits for an RCU grace period (``synchronize_net``) when a
    packet socket is closed or re-bound: 10-30 ms of a blocked event loop, on the takeover path.
    """

    def __init__(self) -> None:
        self._sock: socket.socket | None = None

    async def send(self, interface: str, frame: bytes) -> None:
        if self._sock is None:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            sock.setblocking(False)
            self._sock = sock
        try:
            await asyncio.get_running_loop().sock_sendto(self._sock, frame, (interface, ETH_P_ARP))
        except OSError as exc:
            raise VipError(f"cannot send gratuitous ARP on {interface}: {exc.strerror}") from exc

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class _ArpSender:
    """Gratuitous ARP announcements of one address on one interface, through an ArpSocket."""

    def __init__(self, interface: str, mac: bytes, ip: ipaddress.IPv4Address, arp: ArpSocket | None) -> None:
        self.frame = arp_announcement(mac, ip)
        self.interface = interface
        self.arp = arp or ArpSocket()
        self.own = arp is None  # a socket of its own for one announcement: closed when done

    async def send(self) -> None:
        await self.arp.send(self.interface, self.frame)

    def __enter__(self) -> _ArpSender:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.own:
            self.arp.close()


class _NaSender:
    """A raw ICMPv6 socket sending neighbour advertisements to all nodes, from the VIP, on one interface."""

    def __init__(self, index: int, mac: bytes, ip: ipaddress.IPv6Address) -> None:
        self.payload = neighbour_advertisement(mac, ip)
        self.index = index
        self.pktinfo = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, ip.packed + struct.pack("@I", index))]
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        # Receivers drop neighbour discovery messages whose hop limit is not 255 (RFC 4861 section 7.1.2).
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        self.sock.setblocking(False)

    async def send(self) -> None:
        try:
            self.sock.sendmsg([self.payload], self.pktinfo, 0, (ALL_NODES, 0, 0, self.index))
        except OSError as exc:
            raise VipError(f"cannot send a neighbour advertisement: {exc.strerror}") from exc

    def __enter__(self) -> _NaSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


async def _index(ipr: AsyncIPRoute, interface: str) -> int:
    indexes = await ipr.link_lookup(ifname=interface)
    if not indexes:
        raise VipError(f"interface {interface!r} does not exist on this node: check the VirtualIP's interface")
    return int(indexes[0])


@dataclass(frozen=True)
class _LinkInfo:
    name: str
    mac: str  # "" when the link has no hardware address


async def _links(ipr: AsyncIPRoute) -> dict[int, _LinkInfo]:
    """Every interface by index: its name and hardware address, in one dump."""
    return {
        int(link["index"]): _LinkInfo(str(link.get("IFLA_IFNAME")), str(link.get("IFLA_ADDRESS") or ""))
        async for link in await ipr.link("dump")
    }


async def _link_names(ipr: AsyncIPRoute) -> dict[int, str]:
    return {index: link.name for index, link in (await _links(ipr)).items()}


async def _addresses(ipr: AsyncIPRoute) -> Addresses:
    """Every address on every interface, as (interface index, address with prefix)."""
    found: Addresses = []
    message: Any
    async for message in await ipr.addr("dump"):
        ip = message.get("IFA_LOCAL") or message.get("IFA_ADDRESS")
        if ip:
            found.append((int(message["index"]), ipaddress.ip_interface(f"{ip}/{message['prefixlen']}")))
    return found


async def _delete(ipr: AsyncIPRoute, index: int, vip: IPInterface) -> None:
    try:
        await ipr.addr("del", index=index, address=str(vip.ip), prefixlen=vip.network.prefixlen)
    except NetlinkError as exc:
        if exc.code not in (errno.EADDRNOTAVAIL, errno.ENODEV):
            raise VipError(f"cannot remove {vip}: {os.strerror(exc.code)}") from exc
