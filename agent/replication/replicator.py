"""Entry point of one replicator process: the primary's FUSE mount or the secondary's applier server.

Events (control channel v1) go to stdout as JSON lines; logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import uvloop

from agent.replication import engine, syscalls
from agent.replication.applier import Applier
from agent.replication.awake import HOLD_SECONDS, Awake
from agent.replication.connection import PEER_TIMEOUT
from agent.replication.events import Events
from agent.replication.exclude import Exclude, pattern_error
from agent.replication.link import PeerLink
from agent.replication.passthrough import MountError, mount, open_root, use_asyncio
from agent.replication.primary import ReplicatedFS
from agent.replication.readonly import ReadOnlyFS
from agent.replication.receiver import Receiver
from agent.replication.sender import CONNECT_TIMEOUT, Sender
from agent.replication.wire import ACK_MODES

log = logging.getLogger("agent.replication")
PEER_DECLARED_LOST = "the agent declared the peer lost (SIGUSR1: its heartbeats stopped)"

# The event loop a replicator runs on. Every replicated call is a chain of wake-ups (the FUSE
# request, the frame, the ack, the reply), and uvloop's turn of the loop costs about a third of
# the standard library's: a loopback ping-pong between two loops took 28-43 µs against 103-131 µs.
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}


def _address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def _pattern(value: str) -> str:
    error = pattern_error(value)
    if error is not None:
        raise argparse.ArgumentTypeError(error)
    return value


def _loop_name() -> str:
    """The running event loop's module, for the start-up log line ('uvloop' or 'asyncio')."""
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(prog="python -m agent.replication.replicator", description=__doc__)
    p.add_argument("--role", choices=["primary", "secondary"], required=True)
    p.add_argument("--dir", type=Path, required=True, help="the replicated directory (same path on every node)")
    p.add_argument("--peer", type=_address, help="primary: the secondary's HOST:PORT")
    p.add_argument("--listen", type=_address, help="secondary: HOST:PORT to accept the primary on")
    p.add_argument("--ack", choices=ACK_MODES, default="received", help="primary: ack mode asked")
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        type=_pattern,
        metavar="GLOB",
        help="primary: a path pattern (ReplicatedDir.exclude) kept on this node and not replicated; repeatable",
    )
    p.add_argument("--node", default=socket.gethostname())
    p.add_argument("--secret-file", type=Path, help="shared secret; without it peers are unauthenticated")
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=CONNECT_TIMEOUT,
        metavar="SECONDS",
        help="primary: give up one connection attempt after this long (the next follows; it retries forever)",
    )
    p.add_argument(
        "--peer-timeout",
        type=float,
        default=PEER_TIMEOUT,
        metavar="SECONDS",
        help="a peer host silent this long ends the stream (TCP_USER_TIMEOUT, keepalive): the primary's "
        "writes then complete locally, the secondary takes the next connection; 0: the kernel's defaults",
    )
    p.add_argument(
        "--mount",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="secondary: mount the directory read-only for local processes (default: yes)",
    )
    p.add_argument(
        "--keep-cpus-awake",
        type=float,
        default=HOLD_SECONDS,
        metavar="SECONDS",
        help="while frames flow or the mount serves requests, and this long after, idle CPUs poll (PM QoS); 0: never",
    )
    p.add_argument(
        "--event-loop",
        choices=sorted(LOOPS),
        default="uvloop",
        help="uvloop (default: a replicated 4 KiB write took 10-20%% less here) or the standard library's asyncio loop",
    )
    p.add_argument(
        "--native-answers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="answer attribute, missing-name, read and release requests in pyfuse3 itself, from the mount's "
        "tables (default: yes; no: every request through Python, for comparisons)",
    )
    p.add_argument(
        "--native-writes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the primary serves and replicates writes, fsyncs and (ack fsync) the mtime the kernel writes back in "
        "the native data path's own thread, without Python, and the secondary applies Write, Fsync, Create, Unlink "
        "and times-only Setattr frames there (default: yes, with Tandem's pyfuse3; no: through Python, for "
        "comparisons)",
    )
    p.add_argument(
        "--native-creates",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --native-writes, the primary's native data path creates, unlinks and opens for reading files "
        "too (default: yes; no: through Python, for comparisons)",
    )
    p.add_argument(
        "--open-files-limit",
        type=int,
        default=syscalls.OPEN_FILES,
        metavar="N",
        help="raise the process's open-files limit to N where allowed (default %(default)s): the mount holds "
        "one fd per inode the kernel knows and one per open file",
    )
    p.add_argument("--debug-fuse", action="store_true")
    p.add_argument("--log-file", type=Path, help="append the logs (stderr) to this file")
    args = p.parse_args(argv)
    if args.role == "primary" and args.peer is None:
        p.error("--role primary needs --peer HOST:PORT")
    if args.role == "secondary" and args.listen is None:
        p.error("--role secondary needs --listen HOST:PORT")
    return args


def _secret(path: Path | None) -> bytes | None:
    if path is None:
        log.warning("No secret file given: the replication stream is unauthenticated")
        return None
    return path.read_bytes().strip()


async def run_primary(args: argparse.Namespace, events: Events) -> None:
    """Mount over the directory at once, (re)connect and resync in the background, serve until SIGTERM."""
    # Opened before mounting: afterwards the path leads into our own mount, the fd to the real tree.
    root_fd = open_root(str(args.dir))
    awake = Awake(args.keep_cpus_awake)
    sender = Sender(
        node=args.node,
        secret=_secret(args.secret_file),
        ack=args.ack,
        traffic=awake.touch,
        peer_timeout=args.peer_timeout,
        connect_timeout=args.connect_timeout,
    )
    exclude = Exclude(args.exclude)
    fs = ReplicatedFS(
        root_fd,
        sender,
        writeback=args.ack == "fsync",
        engine=args.native_writes,
        creates=args.native_creates,
        exclude=exclude,
    )
    loop = asyncio.get_running_loop()
    # Before the mount (the supervisor signals only a mounted primary): the agent's membership
    # declared the peer lost, so the writes waiting for it complete locally now.
    loop.add_signal_handler(signal.SIGUSR1, lambda: sender.drop(PEER_DECLARED_LOST, abort=True))
    mount(fs, str(args.dir), debug=args.debug_fuse, on_request=awake.touch, native=args.native_answers)
    awake.open()
    if engine.available():
        log.info(
            "The native data path serves writes and fsyncs%s (ack=%s)",
            ", creates and unlinks, opens for reading" if fs.native_creates else "",
            args.ack,
        )
        if awake.requested:
            pyfuse3.engine_awake(awake.hold)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, pyfuse3.terminate)
    log.info(
        "Primary serving dir=%s peer=%s:%d ack=%s loop=%s%s",
        args.dir,
        *args.peer,
        args.ack,
        _loop_name(),
        f" exclude={list(exclude.patterns)}" if exclude else "",
    )
    events.emit("mounted", dir=str(args.dir))
    link = asyncio.create_task(PeerLink(sender, root_fd, events, args.peer, exclude).run())
    try:
        await pyfuse3.main()
    finally:
        link.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await link
        pyfuse3.close(unmount=True)
        await sender.close()
        awake.close()
        os.close(root_fd)
    log.info(
        "Primary stopped and unmounted dir=%s; %d operations on the last stream; answered natively: %s",
        args.dir,
        sender.seq,
        _native_counts(),
    )


async def run_secondary(args: argparse.Namespace, events: Events) -> None:
    """Mount the directory read-only, accept the primary's stream and apply it beneath the directory fd."""
    # Opened before mounting: the applier writes the real tree, local processes see it through the mount.
    root_fd = open_root(str(args.dir))
    # Before the mount: a stop that comes at any moment after it unmounts cleanly.
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    awake = Awake(args.keep_cpus_awake)
    if args.mount:
        mount(
            ReadOnlyFS(root_fd),
            str(args.dir),
            read_only=True,
            debug=args.debug_fuse,
            on_request=awake.touch,
            native=args.native_answers,
        )
        events.emit("mounted", dir=str(args.dir), readOnly=True)
    try:
        with awake:
            await _serve_secondary(args, root_fd, events, stop, awake)
    finally:
        if args.mount:
            pyfuse3.close(unmount=True)
        with contextlib.suppress(OSError):
            os.close(root_fd)
    log.info("Secondary stopped dir=%s; answered natively: %s", args.dir, _native_counts())


async def _serve_secondary(
    args: argparse.Namespace, root_fd: int, events: Events, stop: asyncio.Event, awake: Awake
) -> None:
    receiver = Receiver(
        Applier(root_fd),
        node=args.node,
        secret=_secret(args.secret_file),
        events=events,
        traffic=awake.touch,
        peer_timeout=args.peer_timeout,
        native=args.native_writes,
    )
    if receiver.native and awake.requested:
        pyfuse3.engine_awake(awake.hold)
    server = await asyncio.get_running_loop().create_server(receiver.connection, *args.listen)
    fuse = asyncio.create_task(pyfuse3.main()) if args.mount else None
    log.info("Secondary listening on %s:%d dir=%s mounted=%s loop=%s", *args.listen, args.dir, args.mount, _loop_name())
    events.emit("listening", address=f"{args.listen[0]}:{args.listen[1]}")
    async with server:
        await stop.wait()
        server.close()
        await receiver.close()
    if fuse is not None:
        pyfuse3.terminate()
        await fuse


def _native_counts() -> str:
    """The requests answered without Python (native_answers, and the native data path's writes and
    fsyncs), for the log: 'getattr=12 lookup=3 ...'."""
    counts = {
        **pyfuse3.native_counts(),
        **getattr(pyfuse3, "engine_counts", dict)(),
        **getattr(pyfuse3, "receiver_counts", dict)(),
    }
    return " ".join(f"{kind}={n}" for kind, n in counts.items())


SPARE = "--spare"


def _spare_argv() -> list[str] | None:
    """A spare: everything is imported; wait for the real command line, one JSON list on stdin."""
    line = sys.stdin.readline()
    if not line:
        return None  # the agent let its spare go
    argv = json.loads(line)
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise SystemExit(f"a spare replicator expects a JSON list of arguments on stdin, got {line[:200]!r}")
    return argv


def main(argv: list[str] | None = None) -> None:
    """Run one replicator (with --spare: started ahead of time, its arguments come on stdin)."""
    if argv is None and sys.argv[1:] == [SPARE]:
        argv = _spare_argv()
        if argv is None:
            return
    args = parse_args(argv)
    if args.log_file is not None:
        log_fd = os.open(args.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        os.dup2(log_fd, 2)
        os.close(log_fd)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    syscalls.keep_large_buffers()
    soft, hard = syscalls.raise_open_files_limit(args.open_files_limit)
    log.info("Open files limit %d (hard %d)", soft, hard)
    use_asyncio()
    events = Events(sys.stdout)
    try:
        with asyncio.Runner(loop_factory=LOOPS[args.event_loop]) as runner:
            runner.run(run_primary(args, events) if args.role == "primary" else run_secondary(args, events))
    except MountError as exc:
        log.error("%s", exc)
        events.emit("error", message=str(exc))
        raise SystemExit(2) from None
    events.emit("stopped")


if __name__ == "__main__":
    main()
