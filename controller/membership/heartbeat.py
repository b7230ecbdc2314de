"""The heartbeat datagram: what a node tells its peers every pulse, encoded compactly and authenticated.

Layout, version 1::

    b"TH"   magic
    u8      version
    u8      flags: bit 0 set = a 32-byte HMAC-SHA256 trailer follows the body
    body    msgpack array [network, node, boot, seq, sent, modules, echoes]
    mac     HMAC-SHA256 keyed by the cluster key over every byte before it (only when keyed)

``modules`` is a list of ``[name, state code, flag bits, generation]`` and ``echoes`` a list of
``[node, sent, held]``: the newest send time heard from that node and how long it was held, so that
the node it names measures a round trip on its own clock. Nothing here reads a clock: ``sent`` is the
sender's loop time and only ever comes back to the sender.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from controller.decide import PeerView, State

MAGIC = b"TH"
VERSION = 1
HEADER = struct.Struct("!2sBB")
FLAG_MAC = 0x01
MAC_BYTES = 32
# An IPv6 path carries at least 1280 bytes unfragmented: less 40 of IPv6 and 8 of UDP header.
MAX_DATAGRAM = 1232
BOOT_BYTES = 8
MAX_NAME = 63
MAX_GENERATION = 32
MAX_SEQ = 2**63 - 1
BODY_FIELDS = 7

# Wire codes, fixed forever: a new State gets a new code, an old code is never reused.
STATE_CODES: dict[State, int] = {
    State.STOP: 0,
    State.WAIT: 1,
    State.ALONE: 2,
    State.PRIM: 3,
    State.SECOND: 4,
    State.UP: 5,
}
_STATES = {code: state for state, code in STATE_CODES.items()}
_CLAIMING, _GRANTS, _HANDOVER = 0x01, 0x02, 0x04
_ALL_BITS = _CLAIMING | _GRANTS | _HANDOVER


class HeartbeatError(Exception):
    """A datagram that is not a valid heartbeat for this cluster, or one that cannot be built."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code  # CamelCase, for counters and tests
        self.message = message


@dataclass(frozen=True)
class ModuleBeat:
    """One module's state on the sender, with the handshake flags decide reads from the peer."""

    state: State
    generation: str = ""  # opaque id of the data generation the sender holds
    claiming: bool = False
    grants: bool = False
    handover: bool = False

    def view(self) -> PeerView:
        """The PeerView decide takes."""
        return PeerView(self.state, handover=self.handover, claiming=self.claiming, grants=self.grants)


@dataclass(frozen=True)
class Echo:
    """The newest heartbeat heard from ``node``: its send time as written, and how long it was held since."""

    node: str
    sent: float
    held: float


@dataclass(frozen=True)
class Heartbeat:
    """One datagram: who sends, on which network, from which daemon start, and what it says of its modules."""

    node: str
    network: str
    boot: bytes  # random per daemon start, so that a restarted peer is recognised
    seq: int  # increases with every datagram the daemon sends, on any network
    sent: float  # the sender's loop time: for the round trip only, never for liveness
    modules: Mapping[str, ModuleBeat] = field(default_factory=dict)
    echoes: tuple[Echo, ...] = ()


def encode(beat: Heartbeat, key: bytes | None) -> bytes:
    """The datagram for ``beat``, with a MAC when there is a key; HeartbeatError if it is invalid or too large."""
    _check_heartbeat(beat)
    body = msgpack.packb(
        [
            beat.network,
            beat.node,
            beat.boot,
            beat.seq,
            beat.sent,
            [[name, STATE_CODES[m.state], _bits(m), m.generation] for name, m in beat.modules.items()],
            [[e.node, e.sent, e.held] for e in beat.echoes],
        ],
        use_bin_type=True,
    )
    head = HEADER.pack(MAGIC, VERSION, FLAG_MAC if key is not None else 0) + body
    data = head + _mac(key, head) if key is not None else head
    if len(data) > MAX_DATAGRAM:
        raise HeartbeatError(
            "TooLarge",
            f"the heartbeat of {beat.node} would be {len(data)} bytes with {len(beat.modules)} modules, more than "
            f"the {MAX_DATAGRAM} that cross any network unfragmented: use shorter module names or generation ids",
        )
    return data


def decode(data: bytes, key: bytes | None) -> Heartbeat:
    """The heartbeat in ``data``, checked against ``key``; HeartbeatError with a precise reason otherwise."""
    if len(data) > MAX_DATAGRAM:
        raise HeartbeatError("TooLarge", f"datagram of {len(data)} bytes is larger than {MAX_DATAGRAM}")
    if len(data) < HEADER.size:
        raise HeartbeatError("Truncated", f"datagram of {len(data)} bytes is shorter than a heartbeat header")
    magic, version, flags = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise HeartbeatError("NotAHeartbeat", f"datagram starts with {magic!r}, not the heartbeat magic {MAGIC!r}")
    if version != VERSION:
        raise HeartbeatError("UnsupportedVersion", f"heartbeat version {version} is not supported (only {VERSION})")
    if flags & ~FLAG_MAC:
        raise HeartbeatError("BadFlags", f"heartbeat flags 0x{flags:02x} have unknown bits set")
    body = _authenticated_body(data, flags & FLAG_MAC != 0, key)
    try:
        fields = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise HeartbeatError("Malformed", f"heartbeat body is not valid msgpack: {exc}") from None
    return _heartbeat(fields)


def _authenticated_body(data: bytes, has_mac: bool, key: bytes | None) -> bytes:
    """The body once the MAC, or its required absence, checks out."""
    if has_mac and key is None:
        raise HeartbeatError("UnexpectedMac", "heartbeat carries a MAC but this node has no cluster key")
    if not has_mac and key is not None:
        raise HeartbeatError("MissingMac", "heartbeat carries no MAC but this node has a cluster key")
    if key is None:
        return data[HEADER.size :]
    if len(data) < HEADER.size + MAC_BYTES:
        raise HeartbeatError("Truncated", f"datagram of {len(data)} bytes is too short to hold its MAC")
    head, mac = data[:-MAC_BYTES], data[-MAC_BYTES:]
    if not hmac.compare_digest(mac, _mac(key, head)):
        raise HeartbeatError("BadMac", "heartbeat MAC does not match the cluster key")
    return head[HEADER.size :]


def _mac(key: bytes, head: bytes) -> bytes:
    return hmac.new(key, head, hashlib.sha256).digest()


def _bits(m: ModuleBeat) -> int:
    return (_CLAIMING if m.claiming else 0) | (_GRANTS if m.grants else 0) | (_HANDOVER if m.handover else 0)


def _heartbeat(fields: Any) -> Heartbeat:
    if type(fields) is not list or len(fields) != BODY_FIELDS:
        raise HeartbeatError("Malformed", f"heartbeat body must be a list of {BODY_FIELDS} fields")
    network, node, boot, seq, sent, modules, echoes = fields
    beat = Heartbeat(
        node=_name("node", node),
        network=_name("network", network),
        boot=boot,
        seq=seq,
        sent=_time("sent", sent),
        modules=_modules(modules),
        echoes=_echoes(echoes),
    )
    _check_heartbeat(beat)
    return beat


def _modules(raw: Any) -> dict[str, ModuleBeat]:
    if type(raw) is not list:
        raise HeartbeatError("Malformed", "heartbeat modules must be a list")
    modules: dict[str, ModuleBeat] = {}
    for item in raw:
        if type(item) is not list or len(item) != 4:
            raise HeartbeatError("Malformed", "each heartbeat module must be [name, state, flags, generation]")
        name, code, bits, generation = item
        name = _name("module name", name)
        if name in modules:
            raise HeartbeatError("Malformed", f"heartbeat lists module {name!r} twice")
        if type(code) is not int or code not in _STATES:
            raise HeartbeatError("Malformed", f"module {name!r} has unknown state code {code!r}")
        if type(bits) is not int or bits & ~_ALL_BITS or bits < 0:
            raise HeartbeatError("Malformed", f"module {name!r} has invalid flag bits {bits!r}")
        state = _STATES[code]
        modules[name] = ModuleBeat(
            state, generation, bool(bits & _CLAIMING), bool(bits & _GRANTS), bool(bits & _HANDOVER)
        )
    return modules


def _echoes(raw: Any) -> tuple[Echo, ...]:
    if type(raw) is not list:
        raise HeartbeatError("Malformed", "heartbeat echoes must be a list")
    echoes = []
    for item in raw:
        if type(item) is not list or len(item) != 3:
            raise HeartbeatError("Malformed", "each heartbeat echo must be [node, sent, held]")
        node, sent, held = item
        echoes.append(Echo(_name("echo node", node), _time("echo sent", sent), _time("echo held", held)))
    return tuple(echoes)


def _name(what: str, value: Any) -> str:
    if type(value) is not str or not 1 <= len(value) <= MAX_NAME:
        raise HeartbeatError("Malformed", f"heartbeat {what} must be a string of 1 to {MAX_NAME} characters")
    return value


def _time(what: str, value: Any) -> float:
    if type(value) is not float or not math.isfinite(value):
        raise HeartbeatError("Malformed", f"heartbeat {what} must be a finite float, not {value!r}")
    return value


def _check_heartbeat(beat: Heartbeat) -> None:
    """The same rules for what we build and what we accept, so that a round trip never fails."""
    _name("node", beat.node)
    _name("network", beat.network)
    if type(beat.boot) is not bytes or len(beat.boot) != BOOT_BYTES:
        raise HeartbeatError("Malformed", f"heartbeat boot id must be {BOOT_BYTES} bytes")
    if type(beat.seq) is not int or not 0 <= beat.seq <= MAX_SEQ:
        raise HeartbeatError("Malformed", f"heartbeat sequence must be an integer from 0 to {MAX_SEQ}")
    _time("sent", beat.sent)
    for name, m in beat.modules.items():
        _name("module name", name)
        if m.state not in STATE_CODES:
            raise HeartbeatError("Malformed", f"module {name!r} has unknown state {m.state!r}")
        if type(m.generation) is not str or len(m.generation) > MAX_GENERATION:
            raise HeartbeatError(
                "Malformed", f"module {name!r} generation must be a string of at most {MAX_GENERATION} characters"
            )
    for e in beat.echoes:
        _name("echo node", e.node)
        _time("echo sent", e.sent)
        if _time("echo held", e.held) < 0:
            raise HeartbeatError("Malformed", f"echo of {e.node} was held for a negative time {e.held!r}")
