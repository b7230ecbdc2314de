"""The virtual IP actuator in a network namespace of its own: addresses, the ledger, announcements, link state.

Each test creates a namespace with a veth pair (veth0 10.99.0.1/24 and fd00:99::1/64, its peer veth1 without
addresses) and runs with this thread inside it, so nothing here can reach the host's interfaces.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent import vip
from agent.vip import Held, Ledger, VipError
from controller.actuators import Actuators, ModuleContext
from controller.resources import Module, VirtualIP
from tests.conftest import ExpectedLogs
from tests.netns import inside, ip, ip_json, namespace

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

VIP = "10.99.0.50/24"
API = "tandem.dev/v1alpha1"
ETH_P_ALL = 0x0003


@dataclass(frozen=True)
class Lab:
    netns: str
    ledger_path: Path

    def addresses(self, interface: str = "veth0") -> set[str]:
        """The addresses on an interface, as `ip` sees them."""
        (link,) = ip_json("addr", "show", "dev", interface, netns=self.netns)
        return {f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"]}

    def mac(self, interface: str = "veth0") -> bytes:
        (link,) = ip_json("link", "show", "dev", interface, netns=self.netns)
        return bytes.fromhex(link["address"].replace(":", ""))

    def ip(self, *args: str) -> None:
        ip(*args, netns=self.netns)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with namespace() as name:
        ip("link", "add", "veth0", "type", "veth", "peer", "name", "veth1", netns=name)
        for interface in ("veth0", "veth1"):
            ip("link", "set", interface, "up", netns=name)
        ip("addr", "add", "10.99.0.1/24", "dev", "veth0", netns=name)
        ip("addr", "add", "fd00:99::1/64", "dev", "veth0", "nodad", netns=name)
        with inside(name):
            yield Lab(name, tmp_path / "state" / "addresses.json")


def recorded(lab: Lab) -> list[dict[str, str]]:
    """The ledger as written on disk."""
    entries: list[dict[str, str]] = json.loads(lab.ledger_path.read_text())["addresses"]
    return entries


async def test_add_is_idempotent_and_remove_leaves_nothing(lab: Lab) -> None:
    ledger = Ledger(lab.ledger_path)
    first = await vip.ensure_present(VIP, "veth0", ledger=ledger)
    again = await vip.ensure_present(VIP, "veth0", ledger=ledger)
    assert first == again == Held(VIP, "veth0")
    assert VIP in lab.addresses()
    assert recorded(lab) == [{"address": VIP, "interface": "veth0"}]

    removed = await vip.ensure_absent(VIP, "veth0", ledger=ledger)
    assert removed == [Held(VIP, "veth0")]
    assert VIP not in lab.addresses()
    assert "10.99.0.1/24" in lab.addresses()
    assert recorded(lab) == []
    assert await vip.ensure_absent(VIP, "veth0", ledger=ledger) == []


async def test_ipv6_addresses_are_added_and_removed(lab: Lab) -> None:
    ledger = Ledger(lab.ledger_path)
    await vip.ensure_present("fd00:99::50/64", None, ledger=ledger)
    assert "fd00:99::50/64" in lab.addresses()
    await vip.ensure_absent("fd00:99::50/64", None, ledger=ledger)
    assert "fd00:99::50/64" not in lab.addresses()


async def test_the_interface_is_found_from_the_subnet(lab: Lab) -> None:
    ledger = Ledger(lab.ledger_path)
    assert await vip.find_interface(VIP) == "veth0"
    held = await vip.ensure_present(VIP, None, ledger=ledger)
    assert held == Held(VIP, "veth0")
    assert VIP in lab.addresses("veth0")
    assert await vip.find_interface(VIP) == "veth0", "the VIP itself must not count as a second candidate"


async def test_no_or_several_candidate_interfaces_is_a_clear_error(lab: Lab) -> None:
    ledger = Ledger(lab.ledger_path)
    with pytest.raises(VipError, match=r"no interface has an address in the subnet of 10\.98\.0\.5/24"):
        await vip.ensure_present("10.98.0.5/24", None, ledger=ledger)
    lab.ip("link", "add", "veth2", "type", "veth", "peer", "name", "veth3")
    lab.ip("addr", "add", "10.99.0.2/24", "dev", "veth2")
    with pytest.raises(VipError, match=r"several interfaces \(veth0, veth2\)"):
        await vip.ensure_present(VIP, None, ledger=ledger)
    with pytest.raises(VipError, match=r"interface 'nope0' does not exist"):
        await vip.ensure_present(VIP, "nope0", ledger=ledger)
    assert not ledger.held()


async def test_a_standby_reads_ahead_and_the_takeover_uses_that_reading(lab: Lab) -> None:
    ledger = Ledger(lab.ledger_path)
    netlink = vip.Netlink()
    try:
        await netlink.prepare(VIP, None)
        # The subnet's address leaves veth0 after the reading: a takeover reading again would find no interface,
        # one that uses the reading (fresh for netlink.fresh_for seconds) puts the VIP where it was to go.
        lab.ip("addr", "del", "10.99.0.1/24", "dev", "veth0")
        with pytest.raises(VipError, match="no interface has an address in the subnet"):
            await vip.ensure_present(VIP, None, ledger=ledger)
        assert await vip.ensure_present(VIP, None, ledger=ledger, netlink=netlink) == Held(VIP, "veth0")
        assert VIP in lab.addresses()
        assert recorded(lab) == [{"address": VIP, "interface": "veth0"}]
        assert await vip.ensure_present(VIP, None, ledger=ledger, netlink=netlink) == Held(VIP, "veth0"), "idempotent"
        assert recorded(lab) == [{"address": VIP, "interface": "veth0"}]
    finally:
        netlink.close()


async def test_a_reading_that_no_longer_holds_is_replaced_by_a_new_one(lab: Lab, expected_logs: ExpectedLogs) -> None:
    expected_logs.expect(r"did not take it; reading again")
    ledger = Ledger(lab.ledger_path)
    netlink = vip.Netlink()
    try:
        await netlink.prepare(VIP, "veth0")
        # veth0 is replaced by a new interface of the same name (a new index): the add on the old index fails.
        lab.ip("link", "del", "veth0")
        lab.ip("link", "add", "veth0", "type", "veth", "peer", "name", "veth1")
        lab.ip("link", "set", "veth0", "up")
        assert await vip.ensure_present(VIP, "veth0", ledger=ledger, netlink=netlink) == Held(VIP, "veth0")
        assert lab.addresses() == {VIP}
        assert recorded(lab) == [{"address": VIP, "interface": "veth0"}]
        with pytest.raises(VipError, match=r"interface 'nope0' does not exist"):
            await netlink.prepare(VIP, "nope0")
        assert netlink.placement(vip.parse(VIP), "nope0") is None
        await netlink.prepare(VIP, "nope0")  # not read again at once: a misconfigured standby does not spin
    finally:
        netlink.close()


async def test_every_standby_module_gets_its_addresses_read_ahead(lab: Lab, tmp_path: Path) -> None:
    def context(name: str, address: str) -> ModuleContext:
        module = Module.model_validate(
            {"apiVersion": API, "kind": "Module", "metadata": {"name": name}, "spec": {"nodes": ["a", "b"]}}
        )
        vip_ = VirtualIP.model_validate(
            {
                "apiVersion": API,
                "kind": "VirtualIP",
                "metadata": {"name": f"{name}-vip"},
                "spec": {"module": name, "address": address},
            }
        )
        return ModuleContext(module=module, vips=[vip_], dirs=[])

    actuators = Actuators(node="a", state_dir=tmp_path / "state")
    first, second = context("one", VIP), context("two", "10.99.0.51/24")
    try:
        for _ in range(3):  # ticks: the first module's readings must not keep the second one's from running
            actuators.prepare(first)
            actuators.prepare(second)
            await asyncio.sleep(0.05)
        for address in (VIP, "10.99.0.51/24"):
            place = actuators.netlink.placement(vip.parse(address), None)
            assert place is not None and place.name == "veth0", address
    finally:
        await actuators.aclose()


async def test_an_address_someone_else_added_is_not_recorded_by_the_read_ahead_path(lab: Lab) -> None:
    lab.ip("addr", "add", VIP, "dev", "veth0")
    ledger = Ledger(lab.ledger_path)
    netlink = vip.Netlink()
    try:
        await netlink.prepare(VIP, "veth0")
        assert await vip.ensure_present(VIP, "veth0", ledger=ledger, netlink=netlink) == Held(VIP, "veth0")
    finally:
        netlink.close()
    assert not ledger.held(), "never ours to remove"
    assert await vip.cleanup_stale(Ledger(lab.ledger_path), set()) == []
    assert VIP in lab.addresses()


async def test_cleanup_never_touches_addresses_it_did_not_record(lab: Lab) -> None:
    lab.ip("addr", "add", VIP, "dev", "veth0")
    ledger = Ledger(lab.ledger_path)
    assert await vip.cleanup_stale(ledger, set()) == []
    assert VIP in lab.addresses()
    assert "10.99.0.1/24" in lab.addresses()


async def test_a_stale_recorded_address_is_removed_at_start(lab: Lab) -> None:
    before_crash = Ledger(lab.ledger_path)
    await vip.ensure_present(VIP, "veth0", ledger=before_crash)
    await vip.ensure_present("10.99.0.51/24", "veth0", ledger=before_crash)
    # The daemon crashes here; a new one starts and reads the ledger from disk.
    after_restart = Ledger(lab.ledger_path)
    removed = await vip.cleanup_stale(after_restart, {"10.99.0.51/24"})
    assert removed == [Held(VIP, "veth0")]
    assert VIP not in lab.addresses()
    assert "10.99.0.51/24" in lab.addresses()
    assert recorded(lab) == [{"address": "10.99.0.51/24", "interface": "veth0"}]


async def test_a_recorded_address_already_gone_is_just_forgotten(lab: Lab) -> None:
    ledger = Ledger(lab.ledger_path)
    await vip.ensure_present(VIP, "veth0", ledger=ledger)
    lab.ip("addr", "del", VIP, "dev", "veth0")
    assert await vip.cleanup_stale(Ledger(lab.ledger_path), set()) == []
    assert recorded(lab) == []


async def test_an_unreadable_ledger_is_set_aside(lab: Lab, expected_logs: ExpectedLogs) -> None:
    expected_logs.expect(r"Address ledger is unreadable")
    lab.ledger_path.parent.mkdir(parents=True)
    lab.ledger_path.write_text("{not json")
    assert Ledger(lab.ledger_path).held() == frozenset()
    assert lab.ledger_path.with_name("addresses.json.corrupt").read_text() == "{not json"


def capture(interface: str) -> socket.socket:
    """A raw socket that sees every frame arriving on the interface."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((interface, ETH_P_ALL))
    sock.setblocking(False)
    return sock


def frames(sock: socket.socket, want: int, deadline: float = 5.0) -> list[bytes]:
    """Read frames until `want` of them matched or the deadline passed (the caller filters)."""
    got: list[bytes] = []
    end = time.monotonic() + deadline
    while time.monotonic() < end and len(got) < want:
        try:
            got.append(sock.recv(65535))
        except BlockingIOError:
            time.sleep(0.01)
    return got


async def test_gratuitous_arp_frames_reach_the_peer(lab: Lab) -> None:
    await vip.ensure_present(VIP, "veth0", ledger=Ledger(lab.ledger_path))
    mac = lab.mac("veth0")
    with capture("veth1") as sock:
        sent = await vip.announce(VIP, None, count=3, interval=0.05)
        garps = [f for f in frames(sock, want=50, deadline=1.0) if f[12:14] == b"\x08\x06"]
    assert sent == 3
    assert len(garps) == 3, garps
    address = ipaddress.IPv4Address("10.99.0.50").packed
    for frame in garps:
        assert frame[0:6] == b"\xff" * 6, "broadcast"
        assert frame[6:12] == mac
        htype, ptype, hlen, plen, oper = struct.unpack("!HHBBH", frame[14:22])
        assert (htype, ptype, hlen, plen, oper) == (1, 0x0800, 6, 4, 1)
        assert frame[22:28] == mac, "sender MAC"
        assert frame[28:32] == address, "sender IP"
        assert frame[38:42] == address, "target IP"


async def test_an_unsolicited_neighbour_advertisement_reaches_the_peer(lab: Lab) -> None:
    address = "fd00:99::50/64"
    await vip.ensure_present(address, "veth0", ledger=Ledger(lab.ledger_path))
    mac = lab.mac("veth0")
    target = ipaddress.IPv6Address("fd00:99::50").packed
    with capture("veth1") as sock:
        await vip.announce(address, "veth0", count=2, interval=0.05)
        received = frames(sock, want=50, deadline=1.0)
    adverts = [
        f
        for f in received
        if f[12:14] == b"\x86\xdd" and f[20] == 58 and f[54] == 136 and f[62:78] == target and f[6:12] == mac
    ]
    assert len(adverts) == 2, received
    for frame in adverts:
        assert frame[21] == 255, "hop limit 255, or receivers drop it"
        assert frame[22:38] == target, "sent from the VIP"
        assert frame[58] & 0x20, "override flag"
        assert frame[78:80] == b"\x02\x01" and frame[80:86] == mac, "target link-layer address option"


async def test_link_up_follows_the_link(lab: Lab) -> None:
    assert await vip.link_up("veth0")
    lab.ip("link", "set", "veth0", "down")
    assert not await vip.link_up("veth0")
    lab.ip("link", "set", "veth0", "up")
    assert await vip.link_up("veth0")
    lab.ip("link", "set", "veth1", "down")
    assert not await vip.link_up("veth0"), "no carrier when the other end is down"
    assert not await vip.link_up("nope0")
