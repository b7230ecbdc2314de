"""Resolution beneath a directory fd on a real tree: symlinks, mounts and very long paths."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.replication.beneath import Beneath, PathEscape


@pytest.fixture(params=[True, False], ids=["openat2", "walk"])
def tree(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Beneath, Path]]:
    root = tmp_path / "repl"
    (root / "d").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "up").symlink_to("../outside")
    (root / "abs").symlink_to(tmp_path / "outside")
    (root / "inner").symlink_to("d")
    (root / "file").write_bytes(b"x")
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        yield Beneath(fd, use_openat2=request.param), root
    finally:
        os.close(fd)


@pytest.mark.parametrize("path", [b"up/x", b"abs/x", b"inner/x", b"d/../up/x"[5:]])
def test_any_symlink_in_the_parent_chain_is_refused(tree: tuple[Beneath, Path], path: bytes) -> None:
    beneath, _ = tree
    with pytest.raises(PathEscape, match="symlink"), beneath.entry(path):
        pass


def test_a_final_symlink_is_the_link_itself(tree: tuple[Beneath, Path]) -> None:
    beneath, root = tree
    with beneath.inode(b"up") as (_, st):
        assert st.st_ino == os.lstat(root / "up").st_ino


def test_a_regular_file_as_parent_is_enotdir(tree: tuple[Beneath, Path]) -> None:
    beneath, _ = tree
    with pytest.raises(NotADirectoryError), beneath.entry(b"file/x"):
        pass


def test_the_root_is_not_an_entry(tree: tuple[Beneath, Path]) -> None:
    beneath, _ = tree
    with pytest.raises(PathEscape, match="root"), beneath.entry(b""):
        pass
    with beneath.node(b"") as (fd, name):
        assert (fd, name) == (beneath.root_fd, b".")


def test_paths_longer_than_path_max_resolve(tree: tuple[Beneath, Path]) -> None:
    beneath, root = tree
    parts = [b"n" * 200 + b"%02d" % i for i in range(30)]  # ~6 KiB, beyond one openat2 call
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    for part in parts:
        os.mkdir(part, dir_fd=fd)
        nxt = os.open(part, os.O_PATH | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    ino = os.fstat(fd).st_ino
    os.close(fd)
    with beneath.node(b"/".join(parts)) as (dir_fd, name):
        assert os.stat(name, dir_fd=dir_fd).st_ino == ino


def test_a_mount_point_inside_is_not_crossed(tree: tuple[Beneath, Path]) -> None:
    beneath, root = tree
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(root / "d")], check=True)
    try:
        with pytest.raises(PathEscape, match="mount"), beneath.entry(b"d/x"):
            pass
        with pytest.raises(PathEscape, match="mount"), beneath.inode(b"d"):
            pass
    finally:
        subprocess.run(["umount", "-l", str(root / "d")], check=True)
