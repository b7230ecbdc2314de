"""Framing of replication protocol version 3: length prefix, msgpack header, raw data; pure codec + streams."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from agent.replication import messages as m
from agent.replication.beneath import PathEscape, split_relpath

MAGIC = b"TNDM"
VERSION = 3
MAX_DATA = 64 * 1024 * 1024
MAX_HEADER = 256 * 1024
MAX_PATH = 64 * 1024
MAX_TIMES = 8
MAX_TEXT = 4096
ACK_MODES = ("received", "durable", "fsync")
# The length word counts everything after itself: the header-length word, the header and the data.
MAX_LENGTH = 4 + MAX_HEADER + MAX_DATA
PREFIX = struct.Struct("!II")
_LENGTH = struct.Struct("!I")
_U32 = 2**32 - 1
_U64 = 2**64 - 1
_I64 = 2**63 - 1
_RENAME_FLAGS = 0b111  # NOREPLACE | EXCHANGE | WHITEOUT


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid frame of this protocol; nothing from them is applied."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame on the wire: a sequence number and a message."""

    seq: int
    msg: m.Message


def _fail(msg: str, field: str, why: str) -> ProtocolError:
    return ProtocolError(f"{msg}.{field}: {why}")


def _uint(limit: int) -> Callable[[Any, str, str], int]:
    def check(value: Any, msg: str, field: str) -> int:
        if type(value) is not int or not 0 <= value <= limit:
            raise _fail(msg, field, f"expected an integer in [0, {limit}], got {value!r:.80}")
        return value

    return check


def _bytes(limit: int) -> Callable[[Any, str, str], bytes]:
    def check(value: Any, msg: str, field: str) -> bytes:
        if type(value) is not bytes or len(value) > limit:
            raise _fail(msg, field, f"expected at most {limit} bytes, got {type(value).__name__}")
        return value

    return check


def _path(allow_root: bool) -> Callable[[Any, str, str], bytes]:
    def check(value: Any, msg: str, field: str) -> bytes:
        if type(value) is not bytes or len(value) > MAX_PATH:
            raise _fail(msg, field, f"expected a path of at most {MAX_PATH} bytes")
        try:
            parts = split_relpath(value)
        except PathEscape as exc:
            raise _fail(msg, field, exc.reason) from exc
        if not parts and not allow_root:
            raise _fail(msg, field, "the root cannot be created, removed or renamed")
        return value

    return check


def _str(value: Any, msg: str, field: str) -> str:
    if type(value) is not str or len(value) > MAX_TEXT:
        raise _fail(msg, field, f"expected text of at most {MAX_TEXT} characters")
    return value


def _bool(value: Any, msg: str, field: str) -> bool:
    if type(value) is not bool:
        raise _fail(msg, field, f"expected a boolean, got {value!r:.80}")
    return value


def _ns(value: Any, msg: str, field: str) -> int:
    if type(value) is not int or not -_I64 - 1 <= value <= _I64:
        raise _fail(msg, field, "expected a signed 64-bit nanosecond count")
    return value


def _nonce(value: Any, msg: str, field: str) -> bytes:
    if type(value) is not bytes or len(value) != 32:
        raise _fail(msg, field, "expected 32 bytes")
    return value


def _proof(value: Any, msg: str, field: str) -> bytes:
    if type(value) is not bytes or len(value) not in (0, 32):
        raise _fail(msg, field, "expected an empty proof or a 32-byte HMAC-SHA256")
    return value


def _stream(value: Any, msg: str, field: str) -> bytes:
    if type(value) is not bytes or len(value) != 16:
        raise _fail(msg, field, "expected a 16-byte stream id")
    return value


def _ackmode(value: Any, msg: str, field: str) -> str:
    if value not in ACK_MODES:
        raise _fail(msg, field, f"expected one of {', '.join(ACK_MODES)}, got {value!r:.40}")
    return str(value)


def _xattr(value: Any, msg: str, field: str) -> bytes:
    if type(value) is not bytes or not 0 < len(value) <= 255 or b"\0" in value:
        raise _fail(msg, field, "expected an attribute name of 1..255 bytes without NUL")
    return value


def _target(value: Any, msg: str, field: str) -> bytes:
    if type(value) is not bytes or not 0 < len(value) <= 4095 or b"\0" in value:
        raise _fail(msg, field, "expected a symlink target of 1..4095 bytes without NUL")
    return value


def _times(value: Any, msg: str, field: str) -> m.Times:
    if type(value) is not list or len(value) > MAX_TIMES:
        raise _fail(msg, field, f"expected a list of at most {MAX_TIMES} [path, atime_ns, mtime_ns]")
    fixes = []
    for i, item in enumerate(value):
        if type(item) is not list or len(item) != 3:
            raise _fail(msg, f"{field}[{i}]", "expected [path, atime_ns, mtime_ns]")
        path = _path(True)(item[0], msg, f"{field}[{i}].path")
        fixes.append(m.TimeFix(path, _ns(item[1], msg, field), _ns(item[2], msg, field)))
    return tuple(fixes)


def _optional(check: Callable[[Any, str, str], Any]) -> Callable[[Any, str, str], Any]:
    def opt(value: Any, msg: str, field: str) -> Any:
        return None if value is None else check(value, msg, field)

    return opt


_KINDS: dict[str, Callable[[Any, str, str], Any]] = {
    "u32": _uint(_U32),
    "u64": _uint(_U64),
    "off": _uint(_I64),
    "errno": _uint(4095),
    "perm": _uint(0o7777),
    "mode": _uint(0o177777),
    "renameflags": _uint(_RENAME_FLAGS),
    "bytes": _bytes(MAX_TEXT),
    "str": _str,
    "bool": _bool,
    "ns": _ns,
    "nonce": _nonce,
    "proof": _proof,
    "stream": _stream,
    "xattr": _xattr,
    "ackmode": _ackmode,
    "target": _target,
    "path": _path(True),
    "entry": _path(False),
    "times": _times,
}
_KINDS.update({f"{kind}?": _optional(_KINDS[kind]) for kind in ("perm", "u32", "off", "ns")})


def _wire_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_wire_value(v) for v in value]
    return value


def encode_parts(frame: Frame) -> tuple[bytes, bytes]:
    """Encode a frame as (prefix + header, data) so large data is written without a copy."""
    msg = frame.msg
    fields = [_wire_value(getattr(msg, name)) for name, _ in msg.FIELDS]
    header = msgpack.packb([msg.OP, frame.seq, *fields], use_bin_type=True)
    data = getattr(msg, msg.DATA) if msg.DATA else b""
    if len(header) > MAX_HEADER or len(data) > MAX_DATA:
        raise ValueError(f"frame too large: header {len(header)} bytes, data {len(data)} bytes")
    return PREFIX.pack(4 + len(header) + len(data), len(header)) + header, data


def encode(frame: Frame) -> bytes:
    """Encode a frame into its complete wire bytes."""
    head, data = encode_parts(frame)
    return head + data


def frame_length(word: bytes) -> int:
    """Validate the 4-byte length word and return how many bytes follow it."""
    (length,) = _LENGTH.unpack(word)
    if length < 4:
        raise ProtocolError(f"frame length {length} is shorter than its own header-length word")
    if length > MAX_LENGTH:
        raise ProtocolError(f"frame length {length} exceeds the limit of {MAX_LENGTH} bytes")
    return length


def decode_body(body: bytes | memoryview) -> Frame:
    """Decode the bytes that follow the length word into a validated frame, or raise ProtocolError."""
    if len(body) < 4:
        raise ProtocolError(f"frame body of {len(body)} bytes has no header-length word")
    (hlen,) = _LENGTH.unpack_from(body)
    if hlen > MAX_HEADER or hlen > len(body) - 4:
        raise ProtocolError(f"header length {hlen} exceeds the frame ({len(body) - 4} bytes) or the limit")
    try:
        header = msgpack.unpackb(body[4 : 4 + hlen], raw=False, use_list=True, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise ProtocolError(f"header is not valid msgpack: {exc}") from exc
    return _decode_header(header, bytes(body[4 + hlen :]))


def _decode_header(header: Any, data: bytes) -> Frame:
    if type(header) is not list or len(header) < 2:
        raise ProtocolError("header is not a list [op, seq, fields...]")
    op, seq = header[0], header[1]
    cls = m.MESSAGES.get(op) if type(op) is int else None
    if cls is None:
        raise ProtocolError(f"unknown op code {op!r:.40}")
    if type(seq) is not int or not 0 <= seq <= _U64:
        raise ProtocolError(f"{cls.__name__}: sequence number {seq!r:.40} is not an unsigned 64-bit integer")
    if cls is m.Hello:
        _check_hello_version(header)
    values = header[2:]
    if len(values) != len(cls.FIELDS):
        raise ProtocolError(f"{cls.__name__}: expected {len(cls.FIELDS)} fields, got {len(values)}")
    kwargs = {name: _KINDS[kind](v, cls.__name__, name) for (name, kind), v in zip(cls.FIELDS, values, strict=True)}
    if cls.DATA:
        kwargs[cls.DATA] = data
    elif data:
        raise ProtocolError(f"{cls.__name__}: carries {len(data)} data bytes but takes none")
    return Frame(seq, cls(**kwargs))


def _check_hello_version(header: list[Any]) -> None:
    # Checked before the field count so that a future version's longer Hello gets a precise answer.
    if len(header) < 4 or header[2] != MAGIC:
        raise ProtocolError("not a Tandem replication peer (bad magic)")
    if header[3] != VERSION:
        raise ProtocolError(f"peer speaks protocol version {header[3]!r:.20}, this node speaks {VERSION}")


def decode(buf: bytes) -> Frame:
    """Decode exactly one complete frame (length word included)."""
    if len(buf) < 4:
        raise ProtocolError(f"truncated frame: {len(buf)} bytes, the length word alone is 4")
    length = frame_length(buf[:4])
    if len(buf) - 4 != length:
        raise ProtocolError(f"frame length says {length} bytes follow, buffer holds {len(buf) - 4}")
    return decode_body(buf[4:])
