"""The Listing codec, with and without the block checksums that answer SyncDirSums."""

from __future__ import annotations

import msgpack
import pytest

from agent.replication import listing
from agent.replication.listing import Entry
from agent.replication.wire import ProtocolError

FILE = Entry(b"f", 0o100644, 0, 0, 5, 1, 2, 0, 7, 1, b"", 0)
FIFO = Entry(b"p", 0o010644, 0, 0, 0, 1, 2, 0, 8, 1, b"", 0)


def test_entries_round_trip_with_their_checksums() -> None:
    data = listing.encode([FILE, FIFO], {b"f": b"\0" * 8})
    got = listing.decode(data, with_sums=True)
    assert got[b"f"].sums == b"\0" * 8 and got[b"p"].sums is None
    assert got[b"f"].mode == FILE.mode and got[b"p"].kind == FIFO.kind


def test_a_plain_listing_has_no_checksums_and_refuses_a_thirteenth_field() -> None:
    assert listing.decode(listing.encode([FILE]))[b"f"].sums is None
    with pytest.raises(ProtocolError, match="12 fields"):
        listing.decode(listing.encode([FILE], {}))
    with pytest.raises(ProtocolError, match="13 fields"):
        listing.decode(listing.encode([FILE]), with_sums=True)


@pytest.mark.parametrize("sums", [b"\0" * 7, "text", 5, [b"\0" * 8]])
def test_malformed_checksums_are_a_protocol_error(sums: object) -> None:
    row = [b"f", 0o100644, 0, 0, 5, 1, 2, 0, 7, 1, b"", 0, sums]
    with pytest.raises(ProtocolError, match="checksums"):
        listing.decode(msgpack.packb([row], use_bin_type=True), with_sums=True)
