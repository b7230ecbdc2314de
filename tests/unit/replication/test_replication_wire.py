"""Wire format of replication protocol v3: round trips, truncation, limits, garbage."""

from __future__ import annotations

import contextlib
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.replication import messages as m
from agent.replication import wire
from agent.replication.connection import FrameParser

names = st.binary(min_size=1, max_size=12).filter(lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))
entries = st.lists(names, min_size=1, max_size=4).map(b"/".join)
paths = st.one_of(st.just(b""), entries)
u32 = st.integers(0, 2**32 - 1)
off = st.integers(0, 2**63 - 1)
ns = st.integers(-(2**63), 2**63 - 1)
times = st.lists(st.builds(m.TimeFix, paths, ns, ns), max_size=wire.MAX_TIMES).map(tuple)

KINDS: dict[str, st.SearchStrategy[Any]] = {
    "u32": u32,
    "u64": st.integers(0, 2**64 - 1),
    "off": off,
    "errno": st.integers(0, 4095),
    "perm": st.integers(0, 0o7777),
    "mode": st.integers(0, 0o177777),
    "renameflags": st.integers(0, 7),
    "bytes": st.just(wire.MAGIC),
    "str": st.text(max_size=40),
    "bool": st.booleans(),
    "ns": ns,
    "nonce": st.binary(min_size=32, max_size=32),
    "proof": st.one_of(st.just(b""), st.binary(min_size=32, max_size=32)),
    "stream": st.binary(min_size=16, max_size=16),
    "ackmode": st.sampled_from(wire.ACK_MODES),
    "xattr": st.binary(min_size=1, max_size=30).filter(lambda b: b"\0" not in b),
    "target": st.binary(min_size=1, max_size=60).filter(lambda b: b"\0" not in b),
    "path": paths,
    "entry": entries,
    "times": times,
}
for _kind in ("perm", "u32", "off", "ns"):
    KINDS[f"{_kind}?"] = st.one_of(st.none(), KINDS[_kind])


def message_of(cls: type[m.Message]) -> st.SearchStrategy[m.Message]:
    fields = {name: KINDS[kind] for name, kind in cls.FIELDS}
    if cls is m.Hello or cls is m.Challenge:
        fields["magic"], fields["version"] = st.just(wire.MAGIC), st.just(wire.VERSION)
    if cls.DATA:
        fields[cls.DATA] = st.binary(max_size=300)
    return st.fixed_dictionaries(fields).map(lambda kw: cls(**kw))


frames = st.builds(
    wire.Frame,
    st.integers(0, 2**64 - 1),
    st.sampled_from(sorted(m.MESSAGES.values(), key=lambda c: c.OP)).flatmap(message_of),
)


def raw_frame(header: Any, data: bytes = b"") -> bytes:
    packed = msgpack.packb(header, use_bin_type=True)
    return wire.PREFIX.pack(4 + len(packed) + len(data), len(packed)) + packed + data


@given(frames)
def test_every_message_round_trips(frame: wire.Frame) -> None:
    assert wire.decode(wire.encode(frame)) == frame


@given(frames, st.data())
def test_truncated_frame_is_a_protocol_error(frame: wire.Frame, data: st.DataObject) -> None:
    buf = wire.encode(frame)
    cut = data.draw(st.integers(0, len(buf) - 1))
    with pytest.raises(wire.ProtocolError):
        wire.decode(buf[:cut])


def test_oversized_length_is_refused_before_reading_the_body() -> None:
    with pytest.raises(wire.ProtocolError, match="exceeds the limit"):
        wire.frame_length(struct.pack("!I", wire.MAX_LENGTH + 1))
    with pytest.raises(wire.ProtocolError, match="exceeds the limit"):
        wire.decode(struct.pack("!I", 2**32 - 1))


def test_encoder_refuses_data_over_the_limit() -> None:
    big = m.Write(b"f", 0, bytes(wire.MAX_DATA + 1))
    with pytest.raises(ValueError, match="too large"):
        wire.encode(wire.Frame(1, big))


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_random_garbage_never_crashes_the_decoder(garbage: bytes) -> None:
    with contextlib.suppress(wire.ProtocolError):
        wire.decode(garbage)


@settings(max_examples=500)
@given(st.binary(max_size=200), st.binary(max_size=50))
def test_garbage_header_in_a_well_framed_body(header: bytes, data: bytes) -> None:
    body = struct.pack("!I", len(header)) + header + data
    with contextlib.suppress(wire.ProtocolError):
        wire.decode(struct.pack("!I", len(body)) + body)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=20) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=20,
)


@settings(max_examples=500)
@given(st.integers(0, 40), st.integers(-5, 2**64 - 1), st.lists(msgpack_values, max_size=9), st.binary(max_size=20))
def test_well_formed_msgpack_with_wrong_fields_is_refused_cleanly(
    op: int, seq: int, fields: list[Any], data: bytes
) -> None:
    try:
        frame = wire.decode(raw_frame([op, seq, *fields], data))
    except wire.ProtocolError:
        return
    assert wire.decode(wire.encode(frame)) == frame


@pytest.mark.parametrize(
    ("header", "data", "reason"),
    [
        ([99, 1], b"", "unknown op code 99"),
        ({"op": 16}, b"", "not a list"),
        ([16, -1, b"f", 0, []], b"", "sequence number"),
        ([16, 1, b"../x", 0, []], b"", r"Write.path: component b'..'"),
        ([16, 1, b"/etc/passwd", 0, []], b"", "Write.path: absolute path"),
        ([16, 1, b"a//b", 0, []], b"", "empty component"),
        ([16, 1, b"a\0b", 0, []], b"", "NUL"),
        ([16, 1, b"", 0, []], b"", "the root cannot"),
        ([16, 1, "text", 0, []], b"", "Write.path"),
        ([16, 1, b"f", -1, []], b"", "Write.offset"),
        ([16, 1, b"f", 0], b"", "expected 3 fields, got 2"),
        ([22, 1, b"f", []], b"x", "carries 1 data bytes but takes none"),
        ([24, 1, b"a", b"b", 8, []], b"", "Rename.flags"),
        ([27, 1, b"f", None, None, None, None, None, None, [[b"../up", 0, 0]]], b"", r"times\[0\].path"),
        ([1, 0, b"NOPE", 1, "n", b"x" * 32, b"y" * 16, "durable"], b"", "bad magic"),
        ([1, 0, wire.MAGIC, wire.VERSION, "n", b"x" * 32, b"y" * 16, "sometimes"], b"", "Hello.ack: expected one of"),
        ([1, 0, wire.MAGIC, 4, "n", b"x" * 32, b"y" * 16, "durable", "future"], b"", "version 4, this node speaks 3"),
        ([1, 0, wire.MAGIC, 2, "n", b"x" * 32, b"y" * 16, "durable"], b"", "version 2, this node speaks 3"),
    ],
)
def test_precise_reasons(header: Any, data: bytes, reason: str) -> None:
    with pytest.raises(wire.ProtocolError, match=reason):
        wire.decode(raw_frame(header, data))


def test_bad_header_length_word() -> None:
    body = struct.pack("!I", 1000) + b"\x90"
    with pytest.raises(wire.ProtocolError, match="header length 1000"):
        wire.decode(struct.pack("!I", len(body)) + body)


def test_parser_splits_frames_across_any_chunking_then_ends_cleanly() -> None:
    first = wire.Frame(1, m.Write(b"a", 3, b"abc" * 1000))
    second = wire.Frame(2, m.Fsync(b"a", True))
    payload = wire.encode(first) + wire.encode(second)
    for size in (1, 3, 4, 7, 4096, len(payload)):
        parser, got = FrameParser(), []
        for i in range(0, len(payload), size):
            got += parser.feed(payload[i : i + size])
        assert got == [first, second]
        parser.end()


@pytest.mark.parametrize("cut", [2, 6, 20])
def test_parser_end_mid_frame_is_a_protocol_error(cut: int) -> None:
    parser = FrameParser()
    assert parser.feed(wire.encode(wire.Frame(1, m.Write(b"a", 3, b"abcdefghijklmnopqrstuvwxyz")))[:cut]) == []
    with pytest.raises(wire.ProtocolError, match="stream ended"):
        parser.end()


def test_parser_refuses_an_oversized_length_before_the_body_arrives() -> None:
    with pytest.raises(wire.ProtocolError, match="exceeds the limit"):
        FrameParser().feed(struct.pack("!I", 2**31))
