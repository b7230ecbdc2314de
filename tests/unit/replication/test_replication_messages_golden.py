"""Golden frames of replication protocol v3: every message encodes to exactly these bytes and decodes back."""

from __future__ import annotations

import pytest

from agent.replication import messages as m
from agent.replication import wire

NONCE = bytes(range(32))
STREAM = bytes(range(100, 116))
PROOF = bytes(range(200, 232))
TIMES = (m.TimeFix(b"dir", 1_000_000_001, 2_000_000_002), m.TimeFix(b"", -3, 4))


GOLDEN: list[tuple[wire.Frame, str]] = [
    (
        wire.Frame(1, m.Hello(magic=b"TNDM", version=3, node="node-a", nonce=NONCE, stream=STREAM, ack="durable")),
        (
            "000000510000004d980101c404544e444d03a66e6f64652d61c420000102030405060708090a0b0c0d0e0f1011121314"
            "15161718191a1b1c1d1e1fc4106465666768696a6b6c6d6e6f70717273a764757261626c65"
        ),
    ),
    (
        wire.Frame(
            0, m.Challenge(magic=b"TNDM", version=3, node="node-b", nonce=NONCE, proof=PROOF, applied_seq=2**40 + 7)
        ),
        (
            "000000620000005e980200c404544e444d03a66e6f64652d62c420000102030405060708090a0b0c0d0e0f1011121314"
            "15161718191a1b1c1d1e1fc420c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7cf0000"
            "010000000007"
        ),
    ),
    (
        wire.Frame(0, m.Auth(proof=PROOF)),
        "0000002900000025930300c420c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7",
    ),
    (
        wire.Frame(9, m.Ack(status=28, message="No space left on device")),
        "000000200000001c9404091cb74e6f207370616365206c656674206f6e20646576696365",
    ),
    (
        wire.Frame(10, m.Fault(status=5, message="Input/output error")),
        "0000001b0000001794050a05b2496e7075742f6f7574707574206572726f72",
    ),
    (
        wire.Frame(0, m.Ping(n=7)),
        "000000080000000493080007",
    ),
    (
        wire.Frame(0, m.Pong(n=2**32 - 1)),
        "0000000c00000008930900ceffffffff",
    ),
    (
        wire.Frame(11, m.Write(path=b"dir/file", offset=2**33 + 1, data=b"hello, world", times=TIMES)),
        (
            "0000003c0000002c95100bc4086469722f66696c65cf00000002000000019293c403646972ce3b9aca01ce7735940293"
            "c400fd0468656c6c6f2c20776f726c64"
        ),
    ),
    (
        wire.Frame(12, m.Truncate(path=b"dir/file", size=4096, times=TIMES)),
        "0000002a0000002695110cc4086469722f66696c65cd10009293c403646972ce3b9aca01ce7735940293c400fd04",
    ),
    (
        wire.Frame(13, m.Fallocate(path=b"dir/file", mode=3, offset=8192, length=65536, times=TIMES)),
        "000000300000002c97120dc4086469722f66696c6503cd2000ce000100009293c403646972ce3b9aca01ce7735940293c400fd04",
    ),
    (
        wire.Frame(14, m.Create(path=b"dir/new", mode=0o640, uid=1000, gid=100, flags=0o100101, times=TIMES)),
        "000000300000002c98130ec4076469722f6e6577cd01a0cd03e864cd80419293c403646972ce3b9aca01ce7735940293c400fd04",
    ),
    (
        wire.Frame(15, m.Mkdir(path=b"dir/sub", mode=0o2755, uid=1001, gid=101, times=TIMES)),
        "0000002d0000002997140fc4076469722f737562cd05edcd03e9659293c403646972ce3b9aca01ce7735940293c400fd04",
    ),
    (
        wire.Frame(16, m.Mknod(path=b"dir/fifo", mode=0o10644, rdev=2**32 + 3, uid=1002, gid=102, times=TIMES)),
        (
            "0000003700000033981510c4086469722f6669666fcd11a4cf0000000100000003cd03ea669293c403646972ce3b9aca"
            "01ce7735940293c400fd04"
        ),
    ),
    (
        wire.Frame(17, m.Unlink(path=b"dir/old", times=TIMES)),
        "0000002600000022941611c4076469722f6f6c649293c403646972ce3b9aca01ce7735940293c400fd04",
    ),
    (
        wire.Frame(18, m.Rmdir(path=b"dir/gone", times=TIMES)),
        "0000002700000023941712c4086469722f676f6e659293c403646972ce3b9aca01ce7735940293c400fd04",
    ),
    (
        wire.Frame(19, m.Rename(old=b"dir/a", new=b"other/b", flags=2, times=TIMES)),
        "0000002e0000002a961813c4056469722f61c4076f746865722f62029293c403646972ce3b9aca01ce7735940293c400fd04",
    ),
    (
        wire.Frame(20, m.Link(target=b"dir/file", path=b"dir/hard", times=TIMES)),
        "000000310000002d951914c4086469722f66696c65c4086469722f686172649293c403646972ce3b9aca01ce7735940293c400fd04",
    ),
    (
        wire.Frame(21, m.Symlink(path=b"dir/link", target=b"../elsewhere", uid=1003, gid=103, times=TIMES)),
        (
            "0000003900000035971a15c4086469722f6c696e6bc40c2e2e2f656c73657768657265cd03eb679293c403646972ce3b"
            "9aca01ce7735940293c400fd04"
        ),
    ),
    (
        wire.Frame(
            22,
            m.Setattr(
                path=b"dir/file",
                mode=0o600,
                uid=1004,
                gid=104,
                size=123456,
                atime_ns=-1_500_000_000,
                mtime_ns=1_700_000_000_123_456_789,
                times=TIMES,
            ),
        ),
        (
            "000000410000003d9a1b16c4086469722f66696c65cd0180cd03ec68ce0001e240d2a697d100cf17979cfe3d85cd1592"
            "93c403646972ce3b9aca01ce7735940293c400fd04"
        ),
    ),
    (
        wire.Frame(23, m.Setxattr(path=b"dir/file", name=b"user.tag", flags=1, value=b"\x00blue\xff", times=TIMES)),
        (
            "000000380000002e961c17c4086469722f66696c65c408757365722e746167019293c403646972ce3b9aca01ce773594"
            "0293c400fd0400626c7565ff"
        ),
    ),
    (
        wire.Frame(24, m.Removexattr(path=b"dir/file", name=b"user.tag", times=TIMES)),
        "000000310000002d951d18c4086469722f66696c65c408757365722e7461679293c403646972ce3b9aca01ce7735940293c400fd04",
    ),
    (
        wire.Frame(25, m.Fsync(path=b"dir/file", datasync=True)),
        "000000120000000e941e19c4086469722f66696c65c3",
    ),
    (
        wire.Frame(26, m.SyncBegin()),
        "000000070000000392281a",
    ),
    (
        wire.Frame(27, m.SyncEnd()),
        "000000070000000392291b",
    ),
    (
        wire.Frame(28, m.SyncMark()),
        "0000000700000003922a1c",
    ),
    (
        wire.Frame(29, m.SyncDir(path=b"dir")),
        "0000000c00000008932b1dc403646972",
    ),
    (
        wire.Frame(30, m.SyncSums(path=b"dir/file")),
        "000000110000000d932c1ec4086469722f66696c65",
    ),
    (
        wire.Frame(31, m.SyncRemove(path=b"dir/stale")),
        "000000120000000e932d1fc4096469722f7374616c65",
    ),
    (
        wire.Frame(32, m.SyncXattrs(path=b"dir/file", pairs=b"\x91\x92\xc4\x01a\xc4\x01b")),
        "000000190000000d932e20c4086469722f66696c659192c40161c40162",
    ),
    (
        wire.Frame(
            33,
            m.SyncFile(
                path=b"dir/copy",
                mode=0o644,
                uid=1005,
                gid=105,
                atime_ns=1_600_000_000_000_000_001,
                mtime_ns=1_650_000_000_000_000_002,
                data=b"file content",
            ),
        ),
        (
            "0000003600000026982f21c4086469722f636f7079cd01a4cd03ed69cf16345785d8a00001cf16e5fa42076500026669"
            "6c6520636f6e74656e74"
        ),
    ),
    (
        wire.Frame(34, m.SyncDirSums(path=b"dir/sub")),
        "000000100000000c933022c4076469722f737562",
    ),
    (
        wire.Frame(35, m.Listing(entries=b"\x91\x9c\xa1x")),
        "0000000b00000003920623919ca178",
    ),
    (
        wire.Frame(36, m.Sums(size=3 * 65536 + 5, digests=bytes(range(24)))),
        "0000002400000008930724ce00030005000102030405060708090a0b0c0d0e0f1011121314151617",
    ),
]


@pytest.mark.parametrize(("frame", "golden"), GOLDEN, ids=[type(f.msg).__name__ for f, _ in GOLDEN])
def test_message_encodes_to_its_golden_bytes(frame: wire.Frame, golden: str) -> None:
    assert wire.encode(frame).hex() == golden


@pytest.mark.parametrize(("frame", "golden"), GOLDEN, ids=[type(f.msg).__name__ for f, _ in GOLDEN])
def test_golden_bytes_decode_to_the_message(frame: wire.Frame, golden: str) -> None:
    assert wire.decode(bytes.fromhex(golden)) == frame


def test_every_message_has_a_golden_frame() -> None:
    assert sorted(type(f.msg).__name__ for f, _ in GOLDEN) == sorted(c.__name__ for c in m.MESSAGES.values())
