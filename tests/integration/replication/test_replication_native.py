"""Requests that Tandem's pyfuse3 patch answers without Python (native_answers, and on the primary the
native data path's thread from its copy of the node table): the same answers, counted.

One workload runs on a pair with native answers and the native data path's writes, and on a pair
without either (`--no-native-answers --no-native-writes`), and what it sees through both mounts must
be equal; the replicators' stop lines show which of them answered natively.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from tests.integration.replication.pairs import Pair

KINDS = ("getattr", "lookup", "getxattr", "read", "release")
# security.capability for "cap_net_bind_service=ep" (VFS_CAP_REVISION_2).
CAPS = bytes.fromhex("0100000200040000000000000000000000000000")


def _errno(action: Any) -> int:
    try:
        action()
    except OSError as exc:
        return exc.errno or -1
    return 0


def _stat(path: Path) -> tuple[int, ...]:
    st = os.stat(path, follow_symlinks=False)
    return (st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_size, st.st_blocks, st.st_atime_ns, st.st_mtime_ns)


def _read(path: Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def _workload(top: Path, mirror: Path) -> dict[str, Any]:
    """What the application sees through the primary's mount (`top`) and the secondary's (`mirror`)."""
    seen: dict[str, Any] = {}
    (top / "d").mkdir()
    big = bytes(range(256)) * 4096 * 3  # 3 MiB: more than one READ request
    (top / "d" / "big").write_bytes(big)
    for i in range(20):
        (top / "d" / f"f{i}").write_bytes(b"%d" % i * (i * 300))
    os.symlink("f1", top / "d" / "link")
    os.link(top / "d" / "f2", top / "d" / "hard")
    os.mkfifo(top / "d" / "fifo")
    os.chown(top / "d" / "f3", 1234, 5678)
    os.chmod(top / "d" / "f4", 0o4750)
    for name in ("big", "f0", "f3", "f4", "link", "hard", "fifo"):
        os.utime(top / "d" / name, ns=(1_600_000_000_123_456_789, 1_700_000_000_987_654_321), follow_symlinks=False)
    names = ["big", "f0", "f3", "f4", "link", "hard", "fifo", "f2"]
    seen["names"] = sorted(os.listdir(top / "d"))
    seen["stats"] = [_stat(top / "d" / name) for name in names]
    seen["dir links"] = os.stat(top / "d").st_nlink
    # Reads: whole, in the middle, across the end and past it.
    seen["whole"] = _read(top / "d" / "big", 0, len(big)) == big
    seen["middle"] = _read(top / "d" / "big", 1_000_003, 70_000) == big[1_000_003:1_070_003]
    seen["across the end"] = _read(top / "d" / "f5", 1_000, 10_000)
    seen["past the end"] = _read(top / "d" / "f5", 10_000, 100)
    # A missing name, then the same name created: the negative entry must not hide it.
    seen["missing"] = _errno(lambda: os.stat(top / "d" / "later"))
    seen["missing parent"] = _errno(lambda: os.stat(top / "nowhere" / "x"))
    seen["file as parent"] = _errno(lambda: os.stat(top / "d" / "f1" / "x"))
    (top / "d" / "later").write_bytes(b"here now")
    seen["created"] = (top / "d" / "later").read_bytes()
    # The capability of a new file is none; one set through the mount is seen.
    seen["no caps"] = _errno(lambda: os.getxattr(top / "d" / "f6", "security.capability"))
    os.setxattr(top / "d" / "f7", "security.capability", CAPS)
    seen["caps"] = os.getxattr(top / "d" / "f7", "security.capability")
    # The secondary's mount (durable: each write returned once applied there) caches nothing: a
    # name missing a moment ago shows as soon as the primary creates it.
    seen["mirror missing"] = _errno(lambda: os.stat(mirror / "d" / "soon"))
    (top / "d" / "soon").write_bytes(b"replicated")
    seen["mirror created"] = (mirror / "d" / "soon").read_bytes()
    seen["mirror stats"] = [_stat(mirror / "d" / name) for name in names]
    # A write makes the kernel ask for the file's attributes again (GETATTR): as the secondary's copy
    # has them, with the times the write frame carried.
    fd = os.open(top / "d" / "f8", os.O_WRONLY)
    os.pwrite(fd, b"more", 5000)
    os.close(fd)
    written, copy = _stat(top / "d" / "f8"), _stat(mirror / "d" / "f8")
    seen["written stat as the copy's"] = written[:5] + written[6:] == copy[:5] + copy[6:] and written[4] == 5004
    seen["mirror read"] = _read(mirror / "d" / "big", 2_000_000, 300_000) == big[2_000_000:2_300_000]
    return seen


def _answered(log: str, marker: str) -> dict[str, int]:
    line = [text for text in log.splitlines() if marker in text][-1]
    pairs = line.partition("answered natively: ")[2].split()
    return {kind: int(n) for kind, n in (p.split("=") for p in pairs)}


def _run(tmp_path: Path, native: bool) -> tuple[dict[str, Any], dict[str, int], dict[str, int]]:
    base = tmp_path / ("native" if native else "python")
    pair = Pair(base / "node1" / "data", base / "node2" / "data", base)
    pair.primary_dir.mkdir(parents=True)
    pair.secondary_dir.mkdir(parents=True)
    if not native:
        pair.extra = ["--no-native-answers", "--no-native-writes"]
    try:
        pair.start("durable")
        seen = _workload(pair.primary_dir, pair.secondary_dir)
    finally:
        pair.close()
    primary, secondary = pair.log("primary"), pair.log("secondary")
    return seen, _answered(primary, "Primary stopped"), _answered(secondary, "Secondary stopped")


@pytest.mark.slow
def test_requests_answered_natively_see_what_python_answers(tmp_path: Path) -> None:
    native, primary, secondary = _run(tmp_path, native=True)
    python, primary_off, secondary_off = _run(tmp_path, native=False)
    assert native == python
    # The workload's own expectations, so that both being wrong alike fails too.
    assert native["names"] == sorted(["big", "fifo", "hard", "link", *(f"f{i}" for i in range(20))])
    assert native["whole"] is native["middle"] is native["mirror read"] is True
    assert native["across the end"] == b"5" * 500 and native["past the end"] == b""
    assert (native["missing"], native["missing parent"], native["file as parent"]) == (
        errno.ENOENT,
        errno.ENOENT,
        errno.ENOTDIR,
    )
    assert native["created"] == b"here now" and native["mirror created"] == b"replicated"
    assert native["no caps"] == errno.ENODATA and native["caps"] == CAPS
    assert native["mirror missing"] == errno.ENOENT
    assert native["written stat as the copy's"] is True
    times = (1_600_000_000_123_456_789, 1_700_000_000_987_654_321)
    assert [st[6:] for st in native["stats"][:7]] == [times] * 7
    # The secondary's copy, as its mount shows it (allocated blocks may differ between two disks).
    assert [st[:5] + st[6:] for st in native["mirror stats"]] == [st[:5] + st[6:] for st in native["stats"]]
    # On the primary the native data path's thread answers most GETATTR, LOOKUP and GETXATTR
    # requests before they reach pyfuse3, and RELEASE (engine_*); the rest, READ, pyfuse3 answers.
    assert all(primary[kind] > 0 for kind in ("read", "write")), primary
    assert all(primary[f"engine_{kind}"] > 0 for kind in ("getattr", "lookup", "getxattr", "release")), primary
    assert all(secondary[kind] > 0 for kind in ("getattr", "lookup", "read", "release")), secondary
    assert set(primary_off.values()) == set(secondary_off.values()) == {0}
