"""Block checksums both ends of a resync compute: 64 KiB blocks, xxh3-64 over data and allocation."""

from __future__ import annotations

import errno
import os
import struct

import xxhash

BLOCK = 64 * 1024
HOLE = 0
_DIGEST = struct.Struct("!Q")
_SEGMENT = struct.Struct("!II")

Ranges = list[tuple[int, int]]


def data_ranges(fd: int, size: int, start: int = 0) -> Ranges:
    """The allocated (non-hole) byte ranges of an open file in [start, size), from SEEK_DATA/SEEK_HOLE."""
    ranges: Ranges = []
    pos = start
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            raise
        if start >= size:
            break
        pos = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        ranges.append((start, pos))
    return ranges


def segments(ranges: Ranges, start: int, end: int) -> Ranges:
    """The parts of [start, end) that hold data, as absolute ranges."""
    out = []
    for a, b in ranges:
        if b <= start:
            continue
        if a >= end:
            break
        out.append((max(a, start), min(b, end)))
    return out


def digest(data: bytes, segs: Ranges, start: int) -> int:
    """The checksum of one block: HOLE if nothing is allocated, else xxh3-64 of layout + zero-padded data."""
    if not segs:
        return HOLE
    h = xxhash.xxh3_64()
    for a, b in segs:
        h.update(_SEGMENT.pack(a - start, b - start))
    h.update(data)
    if len(data) < BLOCK:
        h.update(bytes(BLOCK - len(data)))
    return h.intdigest() or 1


def file_digests(fd: int) -> tuple[int, list[int]]:
    """The size of an open regular file and the checksum of each of its blocks."""
    size = os.fstat(fd).st_size
    ranges = data_ranges(fd, size)
    out = []
    for start in range(0, size, BLOCK):
        end = min(start + BLOCK, size)
        segs = segments(ranges, start, end)
        out.append(digest(os.pread(fd, end - start, start) if segs else b"", segs, start))
    return size, out


def pack(digests: list[int]) -> bytes:
    """Digests as the data of a Sums frame."""
    return b"".join(_DIGEST.pack(d) for d in digests)


def unpack(data: bytes) -> list[int]:
    """The digests of a Sums frame; ValueError if the length is not a multiple of 8."""
    if len(data) % _DIGEST.size:
        raise ValueError(f"{len(data)} bytes of digests is not a multiple of {_DIGEST.size}")
    return [d for (d,) in _DIGEST.iter_unpack(data)]
