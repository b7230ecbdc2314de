"""The primary's inode table: FUSE inode numbers, O_PATH fds, lookup counts and the names of each inode."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import pyfuse3

ROOT = pyfuse3.ROOT_INODE


@dataclass
class Node:
    """One inode the kernel knows: an O_PATH fd to it and the (parent, name) entries that reach it."""

    fd: int
    key: tuple[int, int]
    lookups: int = 0
    names: set[tuple[int, bytes]] = field(default_factory=set)


class Inodes:
    """Maps kernel-visible inode numbers to underlying inodes, and each inode to a root-relative path."""

    def __init__(self, root_fd: int) -> None:
        st = os.fstat(root_fd)
        self.root_fd = root_fd
        self._nodes: dict[int, Node] = {ROOT: Node(root_fd, (st.st_dev, st.st_ino), lookups=1)}
        self._by_key: dict[tuple[int, int], int] = {(st.st_dev, st.st_ino): ROOT}
        self._next = ROOT + 1
        self._number: Callable[[], int] | None = None
        self._mirror: Callable[[int, int], None] | None = None

    def share_numbers(self, start: Callable[[int], Callable[[], int]]) -> None:
        """Take inode numbers from another numberer from now on: `start` is given the next number this
        table would use and returns the call that gives each next one (the native data path creates
        inodes too: pyfuse3.engine_ino)."""
        self._number = start(self._next)

    def mirror(self, to: Callable[[int, int], None]) -> None:
        """Tell `to` every inode's fd, now and as they come (ino, fd), and each inode's end before its
        fd closes (ino, -1): the native data path answers GETATTR from its copy (pyfuse3.engine_node)."""
        self._mirror = to
        for ino, node in self._nodes.items():
            to(ino, node.fd)

    def __getitem__(self, ino: int) -> Node:
        return self._nodes[ino]

    @property
    def nodes(self) -> dict[int, Node]:
        """The live table, changed in place (Tandem's pyfuse3 patch answers GETATTR from it)."""
        return self._nodes

    def known(self, ino: int) -> bool:
        """Whether the kernel still holds a lookup of this inode number."""
        return ino in self._nodes

    def fd(self, ino: int) -> int:
        """The O_PATH fd of an inode."""
        return self._nodes[ino].fd

    def find(self, parent: int, name: bytes) -> int | None:
        """The inode number of an entry if the kernel already knows it, without counting a lookup."""
        try:
            st = os.stat(name, dir_fd=self.fd(parent), follow_symlinks=False)
        except OSError:
            return None
        return self._by_key.get((st.st_dev, st.st_ino))

    def learn(self, parent: int, name: bytes) -> tuple[int, os.stat_result]:
        """Count one kernel lookup of parent/name; open the inode if it is new."""
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd(parent))
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        ino = self._by_key.get(key)
        if ino is None:
            if self._number is not None:
                ino = self._number()
            else:
                ino, self._next = self._next, self._next + 1
            self._nodes[ino] = Node(fd, key)
            self._by_key[key] = ino
            if self._mirror is not None:
                self._mirror(ino, fd)
        else:
            os.close(fd)
        node = self._nodes[ino]
        node.lookups += 1
        node.names.add((parent, name))
        return ino, st

    def adopt(self, ino: int, fd: int, key: tuple[int, int], parent: int, name: bytes) -> None:
        """An inode made elsewhere (the native data path's CREATE), with one kernel lookup through
        parent/name: its number and O_PATH fd are this table's from now on (the mirror has it)."""
        self._nodes[ino] = Node(fd, key, lookups=1, names={(parent, name)})
        self._by_key[key] = ino

    def unnamed(self, parent: int, name: bytes, key: tuple[int, int]) -> None:
        """An entry of the inode `key` was removed elsewhere (the native data path's UNLINK)."""
        self.unname(parent, name, self._by_key.get(key))

    def forget(self, ino: int, count: int) -> None:
        """Drop `count` kernel lookups; the fd closes when none remain."""
        node = self._nodes.get(ino)
        if node is None or ino == ROOT:
            return
        node.lookups -= count
        if node.lookups <= 0:
            # Out of the tables before the fd closes: pyfuse3 answers GETATTR from them.
            del self._nodes[ino]
            del self._by_key[node.key]
            if self._mirror is not None:
                self._mirror(ino, -1)
            os.close(node.fd)

    def unname(self, parent: int, name: bytes, ino: int | None) -> None:
        """An entry was removed or renamed away."""
        if ino is not None and ino in self._nodes:
            self._nodes[ino].names.discard((parent, name))

    def rename(self, ino: int, old: tuple[int, bytes], new: tuple[int, bytes]) -> None:
        """An entry moved."""
        node = self._nodes.get(ino)
        if node is not None:
            node.names.discard(old)
            node.names.add(new)

    def path(self, ino: int) -> bytes | None:
        """A root-relative path that reaches the inode now, or None if it has no name (unlinked)."""
        parts: list[bytes] = []
        seen = 0
        while ino != ROOT:
            node = self._nodes.get(ino)
            if node is None or not node.names or seen > 4096:
                return None
            ino, name = min(node.names)
            parts.append(name)
            seen += 1
        return b"/".join(reversed(parts))

    def paths(self, ino: int) -> list[bytes]:
        """Every root-relative path of the inode's names the kernel knows (hard links), sorted."""
        node = self._nodes.get(ino)
        if node is None:
            return []
        found = (self.entry_path(parent, name) for parent, name in node.names)
        return sorted(p for p in found if p is not None)

    def entry_path(self, parent: int, name: bytes) -> bytes | None:
        """The root-relative path of an entry name in a known directory."""
        base = self.path(parent)
        if base is None:
            return None
        return name if base == b"" else base + b"/" + name
