"""A hostile stream never writes outside the replicated directory and never crashes the applier."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.replication import messages as m
from agent.replication.applier import Applier
from agent.replication.beneath import PathEscape
from agent.replication.receiver import AckMode
from agent.replication.wire import Frame, ProtocolError, decode, encode
from tests.conftest import ExpectedLogs
from tests.integration.replication.links import open_link

HOSTILE_PATHS = [b"../x", b"/etc/passwd", b"a/../../b", b"..", b".", b"", b"a//b", b"a/\0b", b"../outside/secret"]
names = st.sampled_from([b"a", b"b", b"l", b"a/l", b"l/x", b"l/secret", b"a/b", b"b/l/secret", b"l/l"])
paths = st.one_of(names, st.sampled_from(HOSTILE_PATHS))
targets = st.sampled_from([b"..", b"../..", b"../outside", b"../outside/secret", b"/", b"/etc", b"a", b".", b"l"])
modes = st.sampled_from([0o755, 0o600, 0o4777])
small = st.integers(0, 70000)

ops = st.one_of(
    st.builds(m.Write, paths, small, st.binary(max_size=64)),
    st.builds(m.Truncate, paths, small),
    st.builds(m.Fallocate, paths, st.sampled_from([0, 1, 3]), small, st.integers(1, 70000)),
    st.builds(m.Create, paths, modes, st.just(0), st.just(0), st.just(0)),
    st.builds(m.Mkdir, paths, modes, st.just(0), st.just(0)),
    st.builds(
        m.Mknod,
        paths,
        st.sampled_from([stat.S_IFIFO | 0o644, stat.S_IFCHR | 0o666]),
        st.just(os.makedev(1, 3)),
        st.just(0),
        st.just(0),
    ),
    st.builds(m.Symlink, paths, targets, st.just(0), st.just(0)),
    st.builds(m.Link, paths, paths),
    st.builds(m.Rename, paths, paths, st.sampled_from([0, 1, 2])),
    st.builds(m.Unlink, paths),
    st.builds(m.Rmdir, paths),
    st.builds(
        m.Setattr,
        paths,
        mode=st.none() | modes,
        uid=st.none() | st.just(1234),
        size=st.none() | small,
        mtime_ns=st.none() | st.just(5),
    ),
    st.builds(m.Setxattr, paths, st.just(b"user.evil"), st.just(0), st.just(b"1")),
    st.builds(m.Removexattr, paths, st.just(b"user.evil")),
    st.builds(m.Fsync, paths, st.booleans()),
    st.builds(m.SyncDirSums, paths),
    st.builds(m.SyncFile, paths, modes, st.just(0), st.just(0), st.just(1), st.just(2), st.binary(max_size=64)),
)
with_times = st.tuples(ops, st.lists(st.builds(m.TimeFix, paths, st.just(1), st.just(2)), max_size=2))
planted = st.sampled_from([b"l", b"a/l"])
evil = st.sampled_from([b"..", b"../..", b"../outside", b"../../outside", b"/", b"/etc"])
through = st.sampled_from([b"/secret", b"/outside/secret", b"/passwd", b"/x", b""])


@st.composite
def attacks(draw: st.DrawFn) -> list[tuple[m.Message, list[m.TimeFix]]]:
    """Plant a symlink that points out of the tree, then operate through it."""
    link, target = draw(planted), draw(evil)
    victim = link + draw(through)
    use = draw(ops.map(lambda op: _retarget(op, victim)))
    steps = [(m.Mkdir(b"a", 0o755, 0, 0), []), (m.Symlink(link, target, 0, 0), []), (use, [])]
    if draw(st.booleans()):
        steps.append((m.Setattr(b"a", mode=0o700), [m.TimeFix(victim, 1, 2)]))
    return steps


def _retarget(op: m.Message, victim: bytes) -> m.Message:
    first = op.__dataclass_fields__.keys() & {"path", "old", "target"}
    return dataclasses.replace(op, **dict.fromkeys(first - {"target"} or first, victim))


sequences = st.lists(st.one_of(with_times.map(lambda x: [x]), attacks()), min_size=1, max_size=12).map(
    lambda chunks: [step for chunk in chunks for step in chunk]
)


def snapshot(top: Path, skip: Path) -> dict[str, tuple[object, ...]]:
    """Everything observable about a tree except the replicated directory itself."""
    seen: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in [*dirnames, *filenames, "."]:
            p = Path(dirpath, name)
            st_ = os.lstat(p)
            body = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st_.st_mode) else None
            xattrs = tuple(sorted(os.listxattr(p, follow_symlinks=False)))
            seen[str(p)] = (st_.st_mode, st_.st_uid, st_.st_size, st_.st_mtime_ns, st_.st_nlink, body, xattrs)
    return seen


@contextlib.contextmanager
def untouched_outside(prefix: str) -> Iterator[Path]:
    """An empty replicated directory beside an outside tree and a sibling file; after the body,
    everything but the directory (and /etc/passwd) is asserted unchanged."""
    top = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        outside = top / "outside"
        outside.mkdir()
        (outside / "secret").write_bytes(b"do not touch")
        (top / "sibling").write_bytes(b"nor this")
        repl = top / "repl"
        repl.mkdir()
        before = snapshot(top, repl)
        passwd = Path("/etc/passwd").read_bytes()
        yield repl
        assert snapshot(top, repl) == before
        assert Path("/etc/passwd").read_bytes() == passwd
    finally:
        shutil.rmtree(top)


def apply_all(app: Applier, msgs: list[tuple[m.Message, list[m.TimeFix]]], through_codec: bool) -> None:
    for msg, fixes in msgs:
        if hasattr(msg, "times"):
            msg = dataclasses.replace(msg, times=tuple(fixes))
        frame = Frame(app.applied_seq + 1, msg)
        try:
            if through_codec:
                frame = decode(encode(frame))
            app.apply(frame)
        except (ProtocolError, PathEscape):
            continue  # the receiver would disconnect here; keep going to try more


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sequences, st.booleans(), st.booleans())
def test_nothing_is_ever_written_outside(
    msgs: list[tuple[m.Message, list[m.TimeFix]]], through_codec: bool, use_openat2: bool
) -> None:
    with untouched_outside("hostile-") as repl:
        fd = os.open(repl, os.O_PATH | os.O_DIRECTORY)
        try:
            app = Applier(fd, use_openat2=use_openat2)
            app.begin(b"h" * 16)
            apply_all(app, msgs, through_codec)
        finally:
            os.close(fd)


def _primary_shaped(op: m.Message) -> tuple[m.Message, list[m.TimeFix]]:
    """An operation with the time fixes the primary sends with it, which the native data path reads."""
    own, parent = m.TimeFix(op.path, 1, 2), m.TimeFix(op.path.rpartition(b"/")[0], 3, 4)
    fixes = {m.Create: [own, parent], m.Write: [own], m.Unlink: [parent]}.get(type(op), [])
    return op, fixes


# Mostly plain names, so that a sequence goes on past its first frames and the native data path
# applies many of them; then the hostile paths and symlinks of the attacks above.
PLAIN = [b"a", b"b", b"d/a", b"d/b", b"d"]
native_paths = st.sampled_from(PLAIN * 8 + HOSTILE_PATHS + [b"l", b"a/l", b"l/x", b"l/secret", b"b/l/secret"])
native_ops = st.one_of(
    st.builds(m.Create, native_paths, modes, st.just(0), st.just(0), st.just(0)),
    st.builds(m.Write, native_paths, small, st.binary(max_size=64)),
    st.builds(m.Unlink, native_paths),
    st.builds(m.Fsync, native_paths, st.booleans()),
)


@st.composite
def native_attacks(draw: st.DrawFn) -> list[tuple[m.Message, list[m.TimeFix]]]:
    """Plant a symlink that points out of the tree, then create, write or unlink through it."""
    link, target = draw(planted), draw(evil)
    victim = link + draw(through)
    use = draw(native_ops.map(lambda op: _retarget(op, victim)))
    return [(m.Mkdir(b"a", 0o755, 0, 0), []), (m.Symlink(link, target, 0, 0), []), _primary_shaped(use)]


native_sequences = st.tuples(
    st.lists(native_ops.map(_primary_shaped), max_size=24),
    st.lists(st.one_of(native_attacks(), sequences), max_size=2),
).map(lambda parts: [(m.Mkdir(b"d", 0o755, 0, 0), []), *parts[0], *(step for chunk in parts[1] for step in chunk)])


async def _send_through_native(repl: Path, msgs: list[tuple[m.Message, list[m.TimeFix]]]) -> None:
    """Each frame once the one before is answered, as a primary sends them, until the secondary ends
    the stream (it refuses a hostile frame): the native data path sees each first."""
    async with open_link(repl, AckMode.RECEIVED, native=True) as link:
        # The session's first frame is always Python's: the test's come after it.
        for seq, (msg, fixes) in enumerate([(m.Mkdir(b"first", 0o755, 0, 0), []), *msgs], 1):
            if hasattr(msg, "times"):
                msg = dataclasses.replace(msg, times=tuple(fixes))
            try:
                link.conn.send_nowait(Frame(seq, msg))
            except ConnectionError:
                return
            while True:
                frame = await asyncio.wait_for(link.conn.read(), 10)
                if frame is None:
                    return
                if frame.seq == seq:
                    break
            # A frame passed to Python is acknowledged on receipt: once Python applied it (in this
            # event loop), the native data path may apply the next.
            await asyncio.sleep(0.001)


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(msgs=native_sequences)
def test_nothing_is_ever_written_outside_through_the_native_path(
    msgs: list[tuple[m.Message, list[m.TimeFix]]], expected_logs: ExpectedLogs
) -> None:
    # tandem_receiver.c parses Write, Fsync, Create and Unlink frames itself and applies those it
    # reads in full; everything else, and anything it is not sure of, goes to Python.
    expected_logs.expect("Disconnecting replication peer")
    expected_logs.expect("Replication error applying")
    with untouched_outside("hostile-native-") as repl:
        asyncio.run(_send_through_native(repl, msgs))
