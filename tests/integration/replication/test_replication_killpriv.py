"""HANDLE_KILLPRIV_V2: the primary drops capabilities and set-ID bits itself, exactly as Linux does locally.

With it the kernel sends no GETXATTR before each write; in exchange the file system must drop a
file's security.capability on any write or truncate, and S_ISUID (S_ISGID with group execute) when
a caller without CAP_FSETID writes or truncates. Each case runs on a local directory and through the
mount, and the mount's result, and the secondary's copy of it, must equal the local one.
"""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.replication.pairs import Pair

# VFS_CAP_REVISION_2 with CAP_NET_BIND_SERVICE (bit 10) permitted, as `setcap cap_net_bind_service=p`.
CAPS = struct.pack("<IIIII", 0x02000000, 1 << 10, 0, 0, 0)
FILES = {"suid": 0o6777, "sgid-no-group-exec": 0o2666, "caps": 0o0777}
# What the caller does with fd {fd}, the file opened read-write by root beforehand.
OPS = {
    "write": "os.pwrite({fd}, b'x', 0)",
    "truncate": "os.ftruncate({fd}, 1)",
    "open O_TRUNC": "os.close(os.open('/proc/self/fd/{fd}', os.O_WRONLY | os.O_TRUNC))",
}
NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")


def _setup(top: Path) -> None:
    for name, mode in FILES.items():
        path = top / name
        path.write_bytes(b"data")
        os.chmod(path, mode)
    os.setxattr(top / "caps", "security.capability", CAPS)


def _run(top: Path, op: str, caller: tuple[str, ...]) -> None:
    for name in FILES:
        fd = os.open(top / name, os.O_RDWR)
        try:
            code = "import os; " + OPS[op].format(fd=fd)
            subprocess.run([*caller, sys.executable, "-c", code], pass_fds=(fd,), check=True)
        finally:
            os.close(fd)


def _state(top: Path) -> dict[str, tuple[str, bool]]:
    out = {}
    for name in FILES:
        try:
            has_caps = os.getxattr(top / name, "security.capability") == CAPS
        except OSError:
            has_caps = False
        out[name] = (stat.filemode(os.stat(top / name).st_mode), has_caps)
    return out


@pytest.mark.parametrize("ack", ["received", "fsync"])
@pytest.mark.parametrize("caller", [(), NOBODY], ids=["root", "nobody"])
@pytest.mark.parametrize("op", list(OPS))
def test_capabilities_and_set_id_bits_go_as_they_would_locally(
    pair: Pair, tmp_path: Path, op: str, caller: tuple[str, ...], ack: str
) -> None:
    pair.start(ack)  # fsync: the writeback cache, where the kernel writes through for such files
    local = tmp_path / "local"
    local.mkdir()
    for top in (local, pair.primary_dir):
        _setup(top)
        _run(top, op, caller)
    expected = _state(local)
    assert _state(pair.primary_dir) == expected
    assert pair.stop("primary") == 0
    assert pair.stop("secondary") == 0  # acknowledged on receipt: applied once it stopped
    assert _state(pair.secondary_dir) == expected
    assert "granted HANDLE_KILLPRIV_V2" in pair.log("primary")
    if caller:  # the check can fail: a caller without CAP_FSETID loses the set-user-ID bit
        assert expected["suid"][0] != "-rwsrwsrwx"
    else:
        assert expected["suid"][0] == "-rwsrwsrwx"


def test_a_tree_on_a_file_system_without_xattrs_is_written_through(pair: Pair) -> None:
    """ramfs has no xattrs: dropping a capability that cannot exist must not fail the write."""
    subprocess.run(["mount", "-t", "ramfs", "none", str(pair.primary_dir)], check=True)
    try:
        pair.start("received")
        (pair.primary_dir / "f").write_bytes(b"through")
        assert pair.stop("primary") == 0
        assert pair.stop("secondary") == 0
        assert (pair.secondary_dir / "f").read_bytes() == b"through"
    finally:
        pair.close()  # before the ramfs goes: the primary's mount sits on it
        subprocess.run(["umount", "-l", str(pair.primary_dir)], check=False)
