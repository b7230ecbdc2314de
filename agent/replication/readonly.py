"""The secondary's mount: local processes read the replicated tree, every change they try gets EROFS."""

from __future__ import annotations

import errno
import os
from typing import Any

import pyfuse3

from agent.replication.passthrough import Passthrough, passes_errors

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_CREAT | os.O_APPEND


async def _read_only(self: Passthrough, *args: Any, **kwargs: Any) -> Any:
    """Every mutating call: only the applier changes this tree."""
    raise pyfuse3.FUSEError(errno.EROFS)


async def _nothing_to_sync(self: Passthrough, *args: Any, **kwargs: Any) -> None:
    """fsync of a file opened for reading: nothing of ours is dirty."""


class ReadOnlyFS(Passthrough):
    """Reads pass through; the applier alone writes, beneath the directory fd it opened before mounting."""

    setattr = mknod = mkdir = symlink = link = unlink = rmdir = rename = _read_only  # type: ignore[assignment]
    create = write = setxattr = removexattr = fallocate = _read_only  # type: ignore[assignment]
    fsync = fsyncdir = _nothing_to_sync  # type: ignore[assignment]

    def __init__(self, root_fd: int) -> None:
        # The applier changes the tree behind the kernel's back, so nothing may be cached as fresh.
        super().__init__(root_fd, timeout=0.0)

    @passes_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        # The kernel mount is "ro" too; this refusal holds even if someone remounts it read-write.
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        # keep_cache off (pyfuse3's default is on): each open drops the file's cached pages. The
        # applier gives a file the primary's mtime, so its change may keep the size and the mtime the
        # kernel compares before it trusts cached pages.
        fh = self._handle(self._files, (self._open_fd(inode, flags), inode))
        return pyfuse3.FileInfo(fh=fh, keep_cache=False)
