"""A mount holds one fd per inode the kernel knows: the replicator raises its open-files limit, and
says so clearly when requests fail for want of descriptors."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
from collections.abc import Iterator
from pathlib import Path

from tests.integration.replication.pairs import Pair

FILES = 3000


@contextlib.contextmanager
def _soft_open_files_limit(n: int) -> Iterator[None]:
    """Lower this process's soft limit while it starts a replicator, which inherits it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _files(top: Path) -> None:
    for i in range(FILES):
        (top / f"f{i}").touch()


def _stat_all(top: Path) -> list[OSError]:
    failures = []
    for i in range(FILES):
        try:
            os.stat(top / f"f{i}")
        except OSError as exc:
            failures.append(exc)
    return failures


def test_the_replicator_raises_a_low_open_files_limit(pair: Pair) -> None:
    # systemd's default soft limit is 1,024: a tree the kernel has cached more inodes of than that
    # would fail every lookup past it.
    _files(pair.primary_dir)
    with _soft_open_files_limit(256):
        pair.start_primary()
    assert _stat_all(pair.primary_dir) == []
    # Up to the hard limit (and past it as root with CAP_SYS_RESOURCE).
    raised = re.search(r"Open files limit (\d+) \(hard (\d+)\)", pair.log("primary"))
    assert raised and int(raised[1]) == int(raised[2]) >= resource.getrlimit(resource.RLIMIT_NOFILE)[1], pair.log(
        "primary"
    )


def test_out_of_descriptors_is_logged_with_what_to_do(pair: Pair) -> None:
    _files(pair.primary_dir)
    pair.extra = ["--open-files-limit", "300"]
    with _soft_open_files_limit(300):
        pair.start_primary()
    failures = _stat_all(pair.primary_dir)
    assert failures and all(exc.errno == errno.EMFILE for exc in failures), failures[:3]
    log = pair.log("primary")
    assert "Out of file descriptors (Too many open files)" in log and "its limit is 300" in log, log
    assert log.count("Out of file descriptors") == 1, log  # once, not once per request
    # The mount goes on serving what it knows, and stops cleanly.
    os.stat(pair.primary_dir / "f0")
    assert pair.stop("primary") == 0
