"""The heartbeat datagram: round trips, authentication, strict refusal of anything else."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.decide import State
from controller.membership import heartbeat as hb
from controller.membership.heartbeat import Echo, Heartbeat, HeartbeatError, ModuleBeat, decode, encode

KEY = b"k" * 32
names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
finite = st.floats(allow_nan=False, allow_infinity=False)
beats = st.builds(
    ModuleBeat,
    state=st.sampled_from(State),
    generation=st.text(max_size=16),
    claiming=st.booleans(),
    grants=st.booleans(),
    handover=st.booleans(),
)
heartbeats = st.builds(
    Heartbeat,
    node=names,
    network=names,
    boot=st.binary(min_size=hb.BOOT_BYTES, max_size=hb.BOOT_BYTES),
    seq=st.integers(0, hb.MAX_SEQ),
    sent=finite,
    modules=st.dictionaries(names, beats, max_size=8),
    echoes=st.lists(st.builds(Echo, names, finite, st.floats(0, 1e9)), max_size=3).map(tuple),
)
keys = st.one_of(st.none(), st.binary(min_size=16, max_size=64))


def sample(modules: int = 2, **kw: object) -> Heartbeat:
    base: dict[str, object] = dict(
        node="node1",
        network="lan",
        boot=b"\x01" * hb.BOOT_BYTES,
        seq=7,
        sent=12.5,
        modules={f"module-{i:02d}": ModuleBeat(State.SECOND, f"{i:016x}", claiming=True) for i in range(modules)},
        echoes=(Echo("node2", 11.0, 0.25),),
    )
    return Heartbeat(**{**base, **kw})  # type: ignore[arg-type]


def code_of(data: bytes, key: bytes | None = KEY) -> str:
    with pytest.raises(HeartbeatError) as info:
        decode(data, key)
    return info.value.code


@given(heartbeats, keys)
@settings(max_examples=200)
def test_every_heartbeat_round_trips_with_or_without_a_key(beat: Heartbeat, key: bytes | None) -> None:
    try:
        data = encode(beat, key)
    except HeartbeatError as exc:
        assert exc.code == "TooLarge"
        return
    assert len(data) <= hb.MAX_DATAGRAM
    assert decode(data, key) == beat


def test_thirty_modules_fit_well_under_1200_bytes_with_a_mac() -> None:
    assert len(encode(sample(modules=30), KEY)) < 1100


def test_an_oversized_heartbeat_is_refused_with_a_reason_that_says_what_to_do() -> None:
    big = sample(modules=40, echoes=())
    with pytest.raises(HeartbeatError, match=r"would be \d+ bytes with 40 modules, more than the 1232") as info:
        encode(big, KEY)
    assert info.value.code == "TooLarge"


def test_every_state_has_a_wire_code_and_no_code_is_shared() -> None:
    assert set(hb.STATE_CODES) == set(State)
    assert len(set(hb.STATE_CODES.values())) == len(State)


def test_a_datagram_signed_with_another_key_is_refused() -> None:
    assert code_of(encode(sample(), b"x" * 32)) == "BadMac"


def test_a_mac_when_we_have_no_key_and_none_when_we_have_one_are_both_refused() -> None:
    assert code_of(encode(sample(), KEY), key=None) == "UnexpectedMac"
    assert code_of(encode(sample(), None), key=KEY) == "MissingMac"


@given(st.data())
@settings(max_examples=200)
def test_any_flipped_byte_of_a_signed_datagram_is_refused(data: st.DataObject) -> None:
    good = bytearray(encode(sample(), KEY))
    at = data.draw(st.integers(0, len(good) - 1))
    good[at] ^= data.draw(st.integers(1, 255))
    with pytest.raises(HeartbeatError):
        decode(bytes(good), KEY)


def test_a_wrong_version_magic_or_flag_is_named() -> None:
    good = encode(sample(), None)
    assert code_of(good[:2] + bytes([2]) + good[3:], None) == "UnsupportedVersion"
    assert code_of(b"XX" + good[2:], None) == "NotAHeartbeat"
    assert code_of(good[:3] + b"\x80" + good[4:], None) == "BadFlags"


def test_truncated_and_oversized_datagrams_are_refused_before_parsing() -> None:
    assert code_of(b"TH", None) == "Truncated"
    assert code_of(hb.HEADER.pack(hb.MAGIC, hb.VERSION, hb.FLAG_MAC) + b"short", KEY) == "Truncated"
    assert code_of(b"TH\x01\x00" + b"\x00" * hb.MAX_DATAGRAM, None) == "TooLarge"


def test_trailing_bytes_after_the_body_are_refused() -> None:
    assert code_of(encode(sample(), None) + b"\x00", None) == "Malformed"


def body(fields: object) -> bytes:
    return struct.pack("!2sBB", hb.MAGIC, hb.VERSION, 0) + msgpack.packb(fields, use_bin_type=True)


GOOD = ["lan", "node1", b"\x01" * 8, 7, 1.5, [["db", 4, 1, "g1"]], [["node2", 1.0, 0.5]]]


@pytest.mark.parametrize(
    ("index", "value", "reason"),
    [
        (0, "", "network must be a string of 1 to 63"),
        (1, "n" * 64, "node must be a string of 1 to 63"),
        (2, b"\x01" * 7, "boot id must be 8 bytes"),
        (3, -1, "sequence must be an integer"),
        (3, True, "sequence must be an integer"),
        (4, 1, "sent must be a finite float"),
        (4, float("nan"), "sent must be a finite float"),
        (5, [["db", 9, 0, ""]], "unknown state code 9"),
        (5, [["db", 4, 8, ""]], "invalid flag bits 8"),
        (5, [["db", 4, 0, "g" * 33]], "generation must be a string of at most 32"),
        (5, [["db", 4, 0, ""], ["db", 4, 0, ""]], "lists module 'db' twice"),
        (5, {"db": 1}, "modules must be a list"),
        (6, [["node2", 1.0, -0.5]], "held for a negative time"),
    ],
)
def test_each_field_is_checked_exactly(index: int, value: object, reason: str) -> None:
    fields = list(GOOD)
    fields[index] = value
    with pytest.raises(HeartbeatError, match=reason):
        decode(body(fields), None)


def test_the_good_body_used_above_does_decode() -> None:
    beat = decode(body(GOOD), None)
    assert beat.modules["db"] == ModuleBeat(State.SECOND, "g1", claiming=True)
    assert beat.modules["db"].view().claiming


@given(st.binary(max_size=1400), keys)
@settings(max_examples=500)
def test_garbage_raises_heartbeat_error_and_nothing_else(data: bytes, key: bytes | None) -> None:
    with pytest.raises(HeartbeatError):
        decode(data, key)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | finite | st.text(max_size=8) | st.binary(max_size=9),
    lambda inner: st.lists(inner, max_size=8) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=20,
)


@given(msgpack_values)
@settings(max_examples=250)
def test_well_formed_msgpack_of_the_wrong_shape_raises_heartbeat_error(value: object) -> None:
    data = body(value)
    if len(data) > hb.MAX_DATAGRAM:
        return
    with pytest.raises(HeartbeatError):
        decode(data, None)


@given(st.binary(max_size=1200))
@settings(max_examples=500)
def test_garbage_behind_a_valid_header_raises_heartbeat_error(data: bytes) -> None:
    with pytest.raises(HeartbeatError):
        decode(hb.HEADER.pack(hb.MAGIC, hb.VERSION, 0) + data, None)
