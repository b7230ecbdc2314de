"""The messages of replication protocol version 2: handshake, acks, every mutating operation and resync."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple


class TimeFix(NamedTuple):
    """The primary's atime and mtime (ns) of one inode an operation touched, to copy onto the secondary."""

    path: bytes
    atime_ns: int
    mtime_ns: int


Times = tuple[TimeFix, ...]


@dataclass(frozen=True, slots=True)
class Message:
    """Base of every message: FIELDS in wire order, DATA the raw-bytes field, OPERATION if primary-sent."""

    OP: ClassVar[int] = 0
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = ()
    DATA: ClassVar[str | None] = None
    OPERATION: ClassVar[bool] = False
    # Answered by the apply loop once applied (never acked on receipt); BLOCKING ones run in a thread.
    AFTER_APPLY: ClassVar[bool] = False
    BLOCKING: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """First frame, client to server: who I am, which protocol, a nonce, the stream I continue, its ack mode."""

    magic: bytes
    version: int
    node: str
    nonce: bytes
    stream: bytes
    ack: str
    OP = 1
    FIELDS = (
        ("magic", "bytes"),
        ("version", "u32"),
        ("node", "str"),
        ("nonce", "nonce"),
        ("stream", "stream"),
        ("ack", "ackmode"),
    )


@dataclass(frozen=True, slots=True)
class Challenge(Message):
    """Server's answer to Hello: its own nonce, proof it holds the secret, and the last seq it applied."""

    magic: bytes
    version: int
    node: str
    nonce: bytes
    proof: bytes
    applied_seq: int
    OP = 2
    FIELDS = (
        ("magic", "bytes"),
        ("version", "u32"),
        ("node", "str"),
        ("nonce", "nonce"),
        ("proof", "proof"),
        ("applied_seq", "u64"),
    )


@dataclass(frozen=True, slots=True)
class Auth(Message):
    """Client's proof that it holds the secret; the server answers with an Ack of seq 0."""

    proof: bytes
    OP = 3
    FIELDS = (("proof", "proof"),)


@dataclass(frozen=True, slots=True)
class Ack(Message):
    """Acknowledges the frame whose seq it carries: status 0 is success, otherwise an errno."""

    status: int = 0
    message: str = ""
    OP = 4
    FIELDS = (("status", "errno"), ("message", "str"))


@dataclass(frozen=True, slots=True)
class Fault(Message):
    """In `received` mode: applying an already acknowledged frame failed; the secondary has diverged."""

    status: int
    message: str
    OP = 5
    FIELDS = (("status", "errno"), ("message", "str"))


@dataclass(frozen=True, slots=True)
class Write(Message):
    """pwrite(data) at offset into a regular file."""

    path: bytes
    offset: int
    data: bytes
    times: Times = ()
    OP = 16
    FIELDS = (("path", "entry"), ("offset", "off"), ("times", "times"))
    DATA = "data"
    OPERATION = True


@dataclass(frozen=True, slots=True)
class Truncate(Message):
    """ftruncate a regular file to size."""

    path: bytes
    size: int
    times: Times = ()
    OP = 17
    FIELDS = (("path", "entry"), ("size", "off"), ("times", "times"))
    OPERATION = True


@dataclass(frozen=True, slots=True)
class Fallocate(Message):
    """fallocate(mode, offset, length), including FALLOC_FL_PUNCH_HOLE."""

    path: bytes
    mode: int
    offset: int
    length: int
    times: Times = ()
    OP = 18
    FIELDS = (("path", "entry"), ("mode", "u32"), ("offset", "off"), ("length", "off"), ("times", "times"))
    OPERATION = True


@dataclass(frozen=True, slots=True)
class Create(Message):
    """Create a new regular file owned by uid:gid with exactly mode."""

    path: bytes
    mode: int
    uid: int
    gid: int
    flags: int
    times: Times = ()
    OP = 19
    FIELDS = (
        ("path", "entry"),
        ("mode", "perm"),
        ("uid", "u32"),
        ("gid", "u32"),
        ("flags", "u32"),
        ("times", "times"),
    )
    OPERATION = True


@dataclass(frozen=True, slots=True)
class Mkdir(Message):
    """Create a directory owned by uid:gid with exactly mode."""

    path: bytes
    mode: int
    uid: int
    gid: int
    times: Times = ()
    OP = 20
    FIELDS = (("path", "entry"), ("mode", "perm"), ("uid", "u32"), ("gid", "u32"), ("times", "times"))
    OPERATION = True


@dataclass(frozen=True, slots=True)
class Mknod(Message):
    """Create a FIFO, socket or device node; mode carries the file type bits."""

    path: bytes
    mode: int
    rdev: int
    uid: int
    gid: int
    times: Times = ()
    OP = 21
    FIELDS = (
        ("path", "entry"),
        ("mode", "mode"),
        ("rdev", "u64"),
        ("uid", "u32"),
        ("gid", "u32"),
        ("times", "times"),
    )
    OPERATION = True


@dataclass(frozen=True, slots=True)
class Unlink(Message):
    """Remove a non-directory entry."""

    path: bytes
    times: Times = ()
    OP = 22
    FIELDS = (("path", "entry"), ("times", "times"))
    OPERATION = True


@dataclass(frozen=True, slots=True)
class Rmdir(Message):
    """Remove an empty directory."""

    path: bytes
    times: Times = ()
    OP = 23
    FIELDS = (("path", "entry"), ("times", "times"))
    OPERATION = True


@dataclass(frozen=True, slots=True)
class Rename(Message):
    """renameat2(old, new, flags) with RENAME_NOREPLACE or RENAME_EXCHANGE."""

    old: bytes
    new: bytes
    flags: int
    times: Times = ()
    OP = 24
    FIELDS = (("old", "entry"), ("new", "entry"), ("flags", "renameflags"), ("times", "times"))
    OPERATION = True


@dataclass(frozen=True, slots=True)
class Link(Message):
    """Hard link: a new entry path for the existing inode at target (a symlink is not followed)."""

    target: bytes
    path: bytes
    times: Times = ()
    OP = 25
    FIELDS = (("target", "entry"), ("path", "entry"), ("times", "times"))
    OPERATION = True


@dataclass(frozen=True, slots=True)
class Symlink(Message):
    """Create a symlink owned by uid:gid; the target is data and is never followed by the applier."""

    path: bytes
    target: bytes
    uid: int
    gid: int
    times: Times = ()
    OP = 26
    FIELDS = (("path", "entry"), ("target", "target"), ("uid", "u32"), ("gid", "u32"), ("times", "times"))
    OPERATION = True


@dataclass(frozen=True, slots=True)
class Setattr(Message):
    """chmod, chown, truncate and utimens of one inode; None leaves an attribute unchanged."""

    path: bytes
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    times: Times = ()
    OP = 27
    FIELDS = (
        ("path", "path"),
        ("mode", "perm?"),
        ("uid", "u32?"),
        ("gid", "u32?"),
        ("size", "off?"),
        ("atime_ns", "ns?"),
        ("mtime_ns", "ns?"),
        ("times", "times"),
    )
    OPERATION = True


@dataclass(frozen=True, slots=True)
class Setxattr(Message):
    """Set an extended attribute; flags are XATTR_CREATE / XATTR_REPLACE."""

    path: bytes
    name: bytes
    flags: int
    value: bytes
    times: Times = ()
    OP = 28
    FIELDS = (("path", "path"), ("name", "xattr"), ("flags", "u32"), ("times", "times"))
    DATA = "value"
    OPERATION = True


@dataclass(frozen=True, slots=True)
class Removexattr(Message):
    """Remove an extended attribute."""

    path: bytes
    name: bytes
    times: Times = ()
    OP = 29
    FIELDS = (("path", "path"), ("name", "xattr"), ("times", "times"))
    OPERATION = True


@dataclass(frozen=True, slots=True)
class Fsync(Message):
    """Make an inode durable on the secondary; its ack always waits for the fsync, in every mode."""

    path: bytes
    datasync: bool
    OP = 30
    FIELDS = (("path", "path"), ("datasync", "bool"))
    OPERATION = True
    AFTER_APPLY = True
    BLOCKING = True


@dataclass(frozen=True, slots=True)
class SyncBegin(Message):
    """A resync starts: the secondary's tree is not a copy until the matching SyncEnd."""

    OP = 40
    OPERATION = True


@dataclass(frozen=True, slots=True)
class SyncEnd(Message):
    """The resync is complete: every frame before it brought the tree equal to the primary's."""

    OP = 41
    OPERATION = True
    AFTER_APPLY = True


@dataclass(frozen=True, slots=True)
class SyncMark(Message):
    """A barrier: its ack follows the acks and faults of every earlier frame."""

    OP = 42
    OPERATION = True
    AFTER_APPLY = True


@dataclass(frozen=True, slots=True)
class SyncDir(Message):
    """Request: list a directory; answered by a Listing (or an error Ack) once earlier frames are applied."""

    path: bytes
    OP = 43
    FIELDS = (("path", "path"),)
    OPERATION = True
    AFTER_APPLY = True
    BLOCKING = True


@dataclass(frozen=True, slots=True)
class SyncSums(Message):
    """Request: the block checksums of a regular file; answered by Sums (or an error Ack)."""

    path: bytes
    OP = 44
    FIELDS = (("path", "entry"),)
    OPERATION = True
    AFTER_APPLY = True
    BLOCKING = True


@dataclass(frozen=True, slots=True)
class SyncRemove(Message):
    """Remove an entry and, for a directory, everything beneath it; an absent entry is not an error."""

    path: bytes
    OP = 45
    FIELDS = (("path", "entry"),)
    OPERATION = True
    BLOCKING = True


@dataclass(frozen=True, slots=True)
class SyncXattrs(Message):
    """Replace the whole set of extended attributes of an inode (data: msgpack list of [name, value])."""

    path: bytes
    pairs: bytes
    OP = 46
    FIELDS = (("path", "path"),)
    DATA = "pairs"
    OPERATION = True


@dataclass(frozen=True, slots=True)
class SyncFile(Message):
    """Create a new regular file with exactly this content (no holes), owner, mode and times, in one frame."""

    path: bytes
    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    data: bytes
    OP = 47
    FIELDS = (
        ("path", "entry"),
        ("mode", "perm"),
        ("uid", "u32"),
        ("gid", "u32"),
        ("atime_ns", "ns"),
        ("mtime_ns", "ns"),
    )
    DATA = "data"
    OPERATION = True


@dataclass(frozen=True, slots=True)
class SyncDirSums(Message):
    """Request: a SyncDir whose Listing also carries the block checksums of its small regular files."""

    path: bytes
    OP = 48
    FIELDS = (("path", "path"),)
    OPERATION = True
    AFTER_APPLY = True
    BLOCKING = True


@dataclass(frozen=True, slots=True)
class Listing(Message):
    """Answer to SyncDir (data: msgpack list of entries, see resync docs)."""

    entries: bytes
    OP = 6
    DATA = "entries"


@dataclass(frozen=True, slots=True)
class Sums(Message):
    """Answer to SyncSums: the file's size and one 8-byte checksum per block (data)."""

    size: int
    digests: bytes
    OP = 7
    FIELDS = (("size", "off"),)
    DATA = "digests"


MESSAGES: dict[int, type[Message]] = {
    cls.OP: cls
    for cls in (
        Hello,
        Challenge,
        Auth,
        Ack,
        Fault,
        Write,
        Truncate,
        Fallocate,
        Create,
        Mkdir,
        Mknod,
        Unlink,
        Rmdir,
        Rename,
        Link,
        Symlink,
        Setattr,
        Setxattr,
        Removexattr,
        Fsync,
        SyncBegin,
        SyncEnd,
        SyncMark,
        SyncDir,
        SyncSums,
        SyncRemove,
        SyncXattrs,
        SyncFile,
        SyncDirSums,
        Listing,
        Sums,
    )
}
