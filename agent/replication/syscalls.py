"""What Python's os module lacks: ctypes bindings (openat2, renameat2, fallocate, syncfs) and /proc readings."""

from __future__ import annotations

import ctypes
import os
import platform
import resource
import struct

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08

RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2

# An fsync with less unsynced data than this runs on the event loop: handing it to a thread
# costs more (~0.2 ms measured) than the fsync itself; a larger one runs in a thread.
INLINE_SYNC_BYTES = 1 << 20

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20

# openat2 was added after the syscall tables were unified, so it is 437 on every mainstream arch.
_OPENAT2_NR = {"x86_64": 437, "aarch64": 437, "armv7l": 437, "riscv64": 437, "ppc64le": 437, "s390x": 437}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_libc.syncfs.argtypes = [ctypes.c_int]

SYNC_FILE_RANGE_WRITE = 2
# A write at least this large is streaming data: its writeback starts at once (see start_writeback).
STREAM_WRITE_BYTES = 256 * 1024


def proc(fd: int) -> str:
    """The /proc path of one of our own fds: reopening it reaches exactly that inode, never a path a peer chose."""
    return f"/proc/self/fd/{fd}"


def mount_type(directory: str) -> str | None:
    """The file system type of the mount at `directory` (e.g. "fuse.tandem"), None if nothing is mounted there."""
    # mountinfo writes a space, tab, newline or backslash in a path as an octal escape.
    target = "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in os.path.realpath(directory))
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == target:
                found = fields[fields.index("-") + 1]  # the last mount there is the one on top
    return found


def _raise_errno(what: str, path: bytes | None = None) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}", path)


def openat2(dir_fd: int, path: bytes, flags: int, resolve: int, mode: int = 0) -> int:
    """Open `path` relative to `dir_fd` with openat2(2) resolve restrictions; raise OSError."""
    nr = _OPENAT2_NR.get(platform.machine())
    if nr is None:
        raise OSError(38, "openat2 syscall number unknown on this architecture")  # ENOSYS
    how = struct.pack("=QQQ", flags | os.O_CLOEXEC, mode, resolve)
    fd = _libc.syscall(
        ctypes.c_long(nr), ctypes.c_int(dir_fd), ctypes.c_char_p(path), ctypes.c_char_p(how), ctypes.c_size_t(24)
    )
    if fd < 0:
        _raise_errno("openat2", path)
    return int(fd)


def renameat2(old_dir_fd: int, old: bytes, new_dir_fd: int, new: bytes, flags: int) -> None:
    """Rename with renameat2(2) flags (RENAME_NOREPLACE, RENAME_EXCHANGE)."""
    if _libc.renameat2(old_dir_fd, old, new_dir_fd, new, flags) != 0:
        _raise_errno("renameat2", old)


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range back to disk without waiting (sync_file_range WRITE); errors are ignored.

    Streaming writes then reach the disk while the stream still flows, instead of all at the next
    fsync: with both copies on the same kind of disk, the final fsyncs are what dominate otherwise.
    Not a durability promise (metadata is not written); fsync still makes data durable.
    """
    _libc.sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def syncfs(fd: int) -> None:
    """Write everything dirty of the file system holding `fd` to its disk; writeback errors raise OSError."""
    if _libc.syncfs(fd) != 0:
        _raise_errno("syncfs")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Allocate or deallocate (punch, zero, collapse) a byte range with fallocate(2)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        _raise_errno("fallocate")


# glibc's mallopt parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Frames and FUSE writes of up to this size come from the heap, not from a fresh mmap each.
KEEP_ALLOCATIONS_BELOW = 16 << 20
# Free heap memory beyond this goes back to the kernel.
HEAP_TRIM_BYTES = 32 << 20


def keep_large_buffers() -> bool:
    """Serve buffers of up to 16 MiB from the heap; False where the C library is not glibc.

    glibc mmaps every allocation above its threshold (128 KiB at first) and unmaps it when freed,
    so each 1 MiB write or frame the replicators copy met 256 fresh pages and their page faults:
    with these thresholds, dd through the mount went from 235 / 251 to 365 / 423 MB/s here
    (bench.replication --quick, alternating). The memory kept is bounded by HEAP_TRIM_BYTES.
    """
    mallopt = getattr(_libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, KEEP_ALLOCATIONS_BELOW) and mallopt(_M_TRIM_THRESHOLD, HEAP_TRIM_BYTES))


# The open-files limit a replicator asks for unless told otherwise: a mount holds one O_PATH fd per
# inode the kernel knows (as libfuse's passthrough_ll does) and one per open file, so a tree the
# kernel has cached 100,000 entries of needs as many.
OPEN_FILES = 1 << 20


def raise_open_files_limit(wanted: int = OPEN_FILES) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE towards `wanted` (never lower it): the soft limit up to the hard one, and
    the hard one too where the process may (root, up to fs.nr_open). The limits now (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with open("/proc/sys/fs/nr_open") as f:
            ceiling = int(f.read())
    except (OSError, ValueError):
        ceiling = hard
    target = max(soft, min(wanted, ceiling))
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(hard, target)))
        except (OSError, ValueError):
            # Not privileged: as far as the hard limit lets.
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(target, hard), hard))
    got = resource.getrlimit(resource.RLIMIT_NOFILE)
    return got[0], got[1]
