"""The messages of replication protocol version 3: handshake, acks, every mutating operation and resync."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Annotated, ClassVar, NamedTuple, TypeVar, dataclass_transform, get_args, get_origin, get_type_hints


class TimeFix(NamedTuple):
    """The primary's atime and mtime (ns) of one inode an operation touched, to copy onto the secondary."""

    path: bytes
    atime_ns: int
    mtime_ns: int


# A field's wire kind names the validator in wire._KINDS that checks it on decode; `Kind | None` adds "?".
Magic = Annotated[bytes, "bytes"]
U32 = Annotated[int, "u32"]
U64 = Annotated[int, "u64"]
Off = Annotated[int, "off"]
Errno = Annotated[int, "errno"]
Perm = Annotated[int, "perm"]
Mode = Annotated[int, "mode"]
RenameFlags = Annotated[int, "renameflags"]
Text = Annotated[str, "str"]
Bool = Annotated[bool, "bool"]
Ns = Annotated[int, "ns"]
Nonce = Annotated[bytes, "nonce"]
Proof = Annotated[bytes, "proof"]
StreamId = Annotated[bytes, "stream"]
XattrName = Annotated[bytes, "xattr"]
AckName = Annotated[str, "ackmode"]
Target = Annotated[bytes, "target"]
Node = Annotated[bytes, "path"]  # a path beneath the root, or the root itself (b"")
Entry = Annotated[bytes, "entry"]  # a path beneath the root, never the root
Times = Annotated[tuple[TimeFix, ...], "times"]
# The raw bytes after the header, not a header field; at most one per message.
_DATA = "data"
Data = Annotated[bytes, _DATA]


@dataclass(frozen=True, slots=True)
class Message:
    """Base of every message: FIELDS in wire order, DATA the raw-bytes field, OPERATION if primary-sent."""

    OP: ClassVar[int] = 0
    # Derived by @message from the field annotations; never written by hand.
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = ()
    DATA: ClassVar[str | None] = None
    OPERATION: ClassVar[bool] = False
    # Answered by the apply loop once applied (never acked on receipt); BLOCKING ones run in a thread.
    AFTER_APPLY: ClassVar[bool] = False
    BLOCKING: ClassVar[bool] = False


M = TypeVar("M", bound=Message)


@dataclass_transform(frozen_default=True)
def message(cls: type[M]) -> type[M]:
    """Make cls a frozen slotted dataclass whose FIELDS and DATA follow its annotations in declaration order."""
    cls = dataclass(frozen=True, slots=True)(cls)
    hints = get_type_hints(cls, include_extras=True)
    kinds = [(f.name, _kind(cls, f.name, hints[f.name])) for f in fields(cls)]
    data = [name for name, kind in kinds if kind == _DATA]
    if len(data) > 1:
        raise TypeError(f"{cls.__name__}: at most one Data field, got {', '.join(data)}")
    cls.FIELDS = tuple((name, kind) for name, kind in kinds if kind != _DATA)
    cls.DATA = data[0] if data else None
    return cls


def _kind(cls: type, name: str, hint: object) -> str:
    args = get_args(hint)
    if get_origin(hint) is Annotated and isinstance(args[1], str):
        return args[1]
    if len(args) == 2 and args[1] is type(None):
        return _kind(cls, name, args[0]) + "?"
    raise TypeError(f"{cls.__name__}.{name}: annotate with a wire kind such as Entry or U32, not {hint!r}")


@message
class Hello(Message):
    """First frame, client to server: who I am, which protocol, a nonce, the stream I continue, its ack mode."""

    magic: Magic
    version: U32
    node: Text
    nonce: Nonce
    stream: StreamId
    ack: AckName
    OP = 1


@message
class Challenge(Message):
    """Server's answer to Hello: its own nonce, proof it holds the secret, and the last seq it applied."""

    magic: Magic
    version: U32
    node: Text
    nonce: Nonce
    proof: Proof
    applied_seq: U64
    OP = 2


@message
class Auth(Message):
    """Client's proof that it holds the secret; the server answers with an Ack of seq 0."""

    proof: Proof
    OP = 3


@message
class Ack(Message):
    """Acknowledges the frame whose seq it carries: status 0 is success, otherwise an errno."""

    status: Errno = 0
    message: Text = ""
    OP = 4


@message
class Fault(Message):
    """In `received` mode: applying an already acknowledged frame failed; the secondary has diverged."""

    status: Errno
    message: Text
    OP = 5


@message
class Ping(Message):
    """Primary to secondary, outside the sequence (seq 0): answered by Pong n on receipt, in every mode.

    The secondary answers it in the event-loop turn that reads it, ahead of every frame still
    waiting to be applied, so a primary that hears nothing at all for its peer timeout knows that
    the secondary's replicator is not reading its stream (it hangs, or cannot take more).
    """

    n: U32
    OP = 8


@message
class Pong(Message):
    """The secondary's answer to Ping n (seq 0)."""

    n: U32
    OP = 9


@message
class Write(Message):
    """pwrite(data) at offset into a regular file."""

    path: Entry
    offset: Off
    data: Data
    times: Times = ()
    OP = 16
    OPERATION = True


@message
class Truncate(Message):
    """ftruncate a regular file to size."""

    path: Entry
    size: Off
    times: Times = ()
    OP = 17
    OPERATION = True


@message
class Fallocate(Message):
    """fallocate(mode, offset, length), including FALLOC_FL_PUNCH_HOLE."""

    path: Entry
    mode: U32
    offset: Off
    length: Off
    times: Times = ()
    OP = 18
    OPERATION = True


@message
class Create(Message):
    """Create a new regular file owned by uid:gid with exactly mode."""

    path: Entry
    mode: Perm
    uid: U32
    gid: U32
    flags: U32
    times: Times = ()
    OP = 19
    OPERATION = True


@message
class Mkdir(Message):
    """Create a directory owned by uid:gid with exactly mode."""

    path: Entry
    mode: Perm
    uid: U32
    gid: U32
    times: Times = ()
    OP = 20
    OPERATION = True


@message
class Mknod(Message):
    """Create a FIFO, socket or device node; mode carries the file type bits."""

    path: Entry
    mode: Mode
    rdev: U64
    uid: U32
    gid: U32
    times: Times = ()
    OP = 21
    OPERATION = True


@message
class Unlink(Message):
    """Remove a non-directory entry."""

    path: Entry
    times: Times = ()
    OP = 22
    OPERATION = True


@message
class Rmdir(Message):
    """Remove an empty directory."""

    path: Entry
    times: Times = ()
    OP = 23
    OPERATION = True


@message
class Rename(Message):
    """renameat2(old, new, flags) with RENAME_NOREPLACE or RENAME_EXCHANGE."""

    old: Entry
    new: Entry
    flags: RenameFlags
    times: Times = ()
    OP = 24
    OPERATION = True


@message
class Link(Message):
    """Hard link: a new entry path for the existing inode at target (a symlink is not followed)."""

    target: Entry
    path: Entry
    times: Times = ()
    OP = 25
    OPERATION = True


@message
class Symlink(Message):
    """Create a symlink owned by uid:gid; the target is data and is never followed by the applier."""

    path: Entry
    target: Target
    uid: U32
    gid: U32
    times: Times = ()
    OP = 26
    OPERATION = True


@message
class Setattr(Message):
    """chmod, chown, truncate and utimens of one inode; None leaves an attribute unchanged."""

    path: Node
    mode: Perm | None = None
    uid: U32 | None = None
    gid: U32 | None = None
    size: Off | None = None
    atime_ns: Ns | None = None
    mtime_ns: Ns | None = None
    times: Times = ()
    OP = 27
    OPERATION = True


@message
class Setxattr(Message):
    """Set an extended attribute; flags are XATTR_CREATE / XATTR_REPLACE."""

    path: Node
    name: XattrName
    flags: U32
    value: Data
    times: Times = ()
    OP = 28
    OPERATION = True


@message
class Removexattr(Message):
    """Remove an extended attribute."""

    path: Node
    name: XattrName
    times: Times = ()
    OP = 29
    OPERATION = True


@message
class Fsync(Message):
    """Make an inode durable on the secondary; its ack always waits for the fsync, in every mode."""

    path: Node
    datasync: Bool
    OP = 30
    OPERATION = True
    AFTER_APPLY = True
    BLOCKING = True


@message
class SyncBegin(Message):
    """A resync starts: the secondary's tree is not a copy until the matching SyncEnd."""

    OP = 40
    OPERATION = True


@message
class SyncEnd(Message):
    """The resync is complete: every frame before it brought the tree equal to the primary's."""

    OP = 41
    OPERATION = True
    AFTER_APPLY = True


@message
class SyncMark(Message):
    """A barrier: its ack follows the acks and faults of every earlier frame."""

    OP = 42
    OPERATION = True
    AFTER_APPLY = True


@message
class SyncDir(Message):
    """Request: list a directory; answered by a Listing (or an error Ack) once earlier frames are applied."""

    path: Node
    OP = 43
    OPERATION = True
    AFTER_APPLY = True
    BLOCKING = True


@message
class SyncSums(Message):
    """Request: the block checksums of a regular file; answered by Sums (or an error Ack)."""

    path: Entry
    OP = 44
    OPERATION = True
    AFTER_APPLY = True
    BLOCKING = True


@message
class SyncRemove(Message):
    """Remove an entry and, for a directory, everything beneath it; an absent entry is not an error."""

    path: Entry
    OP = 45
    OPERATION = True
    BLOCKING = True


@message
class SyncXattrs(Message):
    """Replace the whole set of extended attributes of an inode (data: msgpack list of [name, value])."""

    path: Node
    pairs: Data
    OP = 46
    OPERATION = True


@message
class SyncFile(Message):
    """Create a new regular file with exactly this content (no holes), owner, mode and times, in one frame."""

    path: Entry
    mode: Perm
    uid: U32
    gid: U32
    atime_ns: Ns
    mtime_ns: Ns
    data: Data
    OP = 47
    OPERATION = True


@message
class SyncDirSums(Message):
    """Request: a SyncDir whose Listing also carries the block checksums of its small regular files."""

    path: Node
    OP = 48
    OPERATION = True
    AFTER_APPLY = True
    BLOCKING = True


@message
class Listing(Message):
    """Answer to SyncDir (data: msgpack list of entries, see resync docs)."""

    entries: Data
    OP = 6


@message
class Sums(Message):
    """Answer to SyncSums: the file's size and one 8-byte checksum per block (data)."""

    size: Off
    digests: Data
    OP = 7


MESSAGES: dict[int, type[Message]] = {
    cls.OP: cls
    for cls in (
        Hello,
        Challenge,
        Auth,
        Ack,
        Fault,
        Ping,
        Pong,
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
