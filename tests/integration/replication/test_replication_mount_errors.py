"""A replicator that cannot open or mount its directory says which path and why, and exits 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.replication.pairs import REPO, Pair, mounted


def _replicator(directory: Path, *, prefix: tuple[str, ...] = (), role: str = "primary") -> tuple[int, str, str]:
    """Run one replicator to its end; (exit code, its last event's message, stderr)."""
    where = ("--peer", "127.0.0.1:1") if role == "primary" else ("--listen", "127.0.0.1:0")
    argv = [sys.executable, "-m", "agent.replication.replicator", "--role", role, "--dir", str(directory), *where]
    # A bounded run: a replicator that did mount would serve until stopped.
    done = subprocess.run([*prefix, *argv], cwd=REPO, capture_output=True, text=True, timeout=30, check=False)
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert events and events[-1]["event"] == "error", (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, events[-1]["message"], done.stderr


@pytest.mark.parametrize("role", ["primary", "secondary"])
def test_a_missing_directory_is_named(tmp_path: Path, role: str) -> None:
    code, message, stderr = _replicator(tmp_path / "nope", role=role)
    assert code == 2
    assert message == f"cannot open {tmp_path / 'nope'}: No such file or directory"
    assert message in stderr  # logged too, at ERROR


def test_a_file_in_place_of_the_directory_is_named(tmp_path: Path) -> None:
    (tmp_path / "f").touch()
    code, message, _ = _replicator(tmp_path / "f")
    assert code == 2 and message == f"cannot open {tmp_path / 'f'}: Not a directory"


def test_without_root_it_says_so(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    tmp_path.chmod(0o755)
    setpriv = ("setpriv", "--reuid=1000", "--regid=1000", "--clear-groups")
    code, message, _ = _replicator(tmp_path / "d", prefix=setpriv)
    assert code == 2 and "must run as root" in message and str(tmp_path / "d") in message


@pytest.mark.parametrize(
    ("hide", "cause"),
    [
        ("mount -t tmpfs none /dev", "/dev/fuse is missing"),
        ("mount --bind /dev/null /dev/fuse", "/dev/fuse is not the FUSE device"),
    ],
)
def test_no_fuse_device_is_named(tmp_path: Path, hide: str, cause: str) -> None:
    (tmp_path / "d").mkdir()
    # In a mount namespace of its own, so that /dev stays as it is for everything else.
    script = f'{hide} && exec "$@"'
    code, message, _ = _replicator(tmp_path / "d", prefix=("unshare", "--mount", "sh", "-c", script, "sh"))
    assert code == 2 and message.startswith(f"cannot mount {tmp_path / 'd'}: {cause}")


def test_a_directory_already_served_is_named_and_left_alone(pair: Pair) -> None:
    pair.start_primary()
    (pair.primary_dir / "kept").write_text("served")
    code, message, _ = _replicator(pair.primary_dir)
    assert code == 2 and "already mounted there" in message
    assert mounted(pair.primary_dir) and (pair.primary_dir / "kept").read_text() == "served"


def test_a_dead_replicators_mount_is_named(pair: Pair) -> None:
    pair.start_primary()
    os.kill(pair.pid("primary"), signal.SIGKILL)
    pair.procs["primary"].wait(10)
    assert mounted(pair.primary_dir)  # the kernel keeps a mount whose daemon died
    code, message, _ = _replicator(pair.primary_dir)
    assert code == 2 and f"fusermount3 -uz {pair.primary_dir}" in message
