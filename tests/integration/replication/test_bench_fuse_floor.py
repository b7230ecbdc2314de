"""bench.fuse_floor's C passthrough builds, mounts and really does what the benchmark times."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from bench import fuse_floor
from tests.integration.replication.pairs import mounted


def test_the_c_floor_serves_the_benchmarked_calls_beneath_its_directory(tmp_path: Path) -> None:
    if shutil.which("cc") is None:
        pytest.fail("cc is missing: apt-get install -y build-essential")
    binary = fuse_floor.build(tmp_path)
    top = tmp_path / "top"
    (top / "d").mkdir(parents=True)
    (top / "d" / "old").write_bytes(b"before the mount")
    with fuse_floor.serving([str(binary), str(top)], top, tmp_path / "floor.log"):
        assert mounted(top)
        assert (top / "d" / "old").read_bytes() == b"before the mount"
        fd = os.open(top / "d" / "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.pwrite(fd, b"x" * 4096, 8192)
        os.fsync(fd)
        os.close(fd)
        st = os.stat(top / "d" / "new")
        assert (st.st_size, st.st_mode & 0o777) == (12288, 0o640)
        with pytest.raises(FileNotFoundError):
            os.stat(top / "d" / "missing")
        os.unlink(top / "d" / "old")
        with pytest.raises(OSError) as info:
            os.getxattr(top / "d" / "new", "security.capability")
        assert info.value.errno == errno.ENODATA
    assert not mounted(top)
    # Everything happened beneath the directory itself.
    assert (top / "d" / "new").read_bytes() == b"\0" * 8192 + b"x" * 4096
    assert not (top / "d" / "old").exists()


def test_the_shipped_c_floor_hands_every_change_to_its_peer(tmp_path: Path) -> None:
    binary = fuse_floor.build(tmp_path)
    top, mirror = tmp_path / "top", tmp_path / "mirror"
    top.mkdir()
    mirror.mkdir()
    with (
        fuse_floor.acker(binary, mirror, tmp_path / "acker.log") as port,
        fuse_floor.serving([str(binary), str(top), "--peer", str(port)], top, tmp_path / "floor.log"),
    ):
        fd = os.open(top / "kept", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"a" * 10_000)
        os.ftruncate(fd, 6_000)
        os.pwrite(fd, b"b" * 100, 5_000)
        os.fsync(fd)
        os.close(fd)
        (top / "gone").write_bytes(b"soon removed")
        os.unlink(top / "gone")
        # Acknowledged on receipt: the peer has applied it once a later fsync is answered.
        fd = os.open(top / "kept", os.O_WRONLY)
        os.fsync(fd)
        os.close(fd)
        copies = list(mirror.iterdir())
        assert len(copies) == 1, copies
        assert copies[0].read_bytes() == b"a" * 5_000 + b"b" * 100 + b"a" * 900


def test_the_c_floor_speaks_protocol_v3_to_a_tandem_secondary(tmp_path: Path) -> None:
    binary = fuse_floor.build(tmp_path)
    top, mirror = tmp_path / "top", tmp_path / "mirror"
    top.mkdir()
    mirror.mkdir()
    with (
        fuse_floor.tandem_secondary(mirror, tmp_path / "secondary.log") as port,
        fuse_floor.serving([str(binary), str(top), "--tandem", str(port)], top, tmp_path / "floor.log"),
    ):
        (top / "d").mkdir()
        fd = os.open(top / "d" / "kept", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"a" * 300_000)
        os.ftruncate(fd, 200_000)
        os.pwrite(fd, b"b" * 100, 100_000)
        # Past 127 frames a sequence number takes more than one byte of msgpack.
        for i in range(300):
            os.pwrite(fd, b"c", 150_000 + i)
        os.fsync(fd)
        os.close(fd)
        (top / "gone").write_bytes(b"soon removed")
        os.unlink(top / "gone")
        fd = os.open(top / "d" / "kept", os.O_WRONLY)
        os.fsync(fd)  # answered once the secondary applied everything before it
        os.close(fd)
    expected = b"a" * 100_000 + b"b" * 100 + b"a" * 49_900 + b"c" * 300 + b"a" * 49_700
    assert (mirror / "d" / "kept").read_bytes() == expected
    assert not (mirror / "gone").exists()


def test_the_null_floor_answers_from_memory_and_never_touches_its_directory(tmp_path: Path) -> None:
    binary = fuse_floor.build(tmp_path)
    top, mirror = tmp_path / "top", tmp_path / "mirror"
    top.mkdir()
    mirror.mkdir()
    (top / "before").write_bytes(b"under the mount")
    with (
        fuse_floor.acker(binary, mirror, tmp_path / "acker.log") as port,
        fuse_floor.serving([str(binary), str(top), "--null", "--peer", str(port)], top, tmp_path / "floor.log"),
    ):
        assert not (top / "before").exists()  # the made-up tree starts empty
        (top / "small").mkdir()
        for name in ("a", "b"):
            fd = os.open(top / "small" / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            assert os.write(fd, b"x" * 4096) == 4096
            os.close(fd)
        assert os.stat(top / "small" / "a").st_mode & 0o7777 == 0o640
        with pytest.raises(FileExistsError):
            os.open(top / "small" / "a", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        os.unlink(top / "small" / "a")
        with pytest.raises(FileNotFoundError):
            os.stat(top / "small" / "a")
        # Shipped on receipt: the acker has applied them once a later fsync is answered.
        fd = os.open(top / "small" / "b", os.O_WRONLY)
        os.fsync(fd)
        os.close(fd)
        copies = list(mirror.iterdir())
        assert [c.read_bytes() for c in copies] == [b"x" * 4096], copies  # b's copy; a's went with its unlink
        os.unlink(top / "small" / "b")
        (top / "small").rmdir()
    assert not mounted(top)
    assert [p.name for p in top.iterdir()] == ["before"]
    assert (top / "before").read_bytes() == b"under the mount"
