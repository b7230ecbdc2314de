"""tandemd: one process per node, holding the store, the API and (embedded store) the peer sync."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from aiohttp import web

from controller.actuators import Actuators
from controller.api.health import Verdicts
from controller.api.server import Api
from controller.membership.supervisor import MembershipSupervisor
from controller.reconcile import Reconciler
from controller.resources import Cluster
from controller.secret import key_path, load_key
from controller.store import Store
from controller.store.embedded import EmbeddedStore
from controller.sync import PeerSync

log = logging.getLogger("tandem.daemon")
DEFAULT_PORT = 9010


def command_line(*, node: str, state_dir: Path, listen: str, store: str = "embedded") -> list[str]:
    """The argv that runs this node's daemon with the same Python (for the demo, the lab and tests)."""
    return [
        sys.executable,
        "-m",
        "controller.cli",
        "node",
        "run",
        "--node",
        node,
        "--state-dir",
        str(state_dir),
        "--listen",
        listen,
        "--store",
        store,
    ]


class DaemonError(Exception):
    """The daemon cannot start; the message says why and what to do."""


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Listen:
        """Accept ``HOST:PORT``, ``[V6]:PORT``, ``HOST`` or ``:PORT``."""
        host, port = text, str(DEFAULT_PORT)
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            port = rest.lstrip(":") or port
        elif text.count(":") == 1:
            host, port = text.split(":")
        try:
            number = int(port)
            if host:
                ipaddress.ip_address(host)
        except ValueError:
            raise DaemonError(f"--listen {text!r}: expected ADDRESS:PORT, e.g. 0.0.0.0:9010") from None
        if not 0 < number < 65536:
            raise DaemonError(f"--listen {text!r}: port {number} is out of range")
        return cls(host or "0.0.0.0", number)

    def binds(self) -> list[tuple[str, int]]:
        """Where to listen: the address asked for, plus 127.0.0.1 for the local CLI if not covered."""
        binds = [(self.host, self.port)]
        if self.host not in ("0.0.0.0", "127.0.0.1", "::"):
            binds.append(("127.0.0.1", self.port))
        return binds


def lock_state_dir(state_dir: Path) -> IO[str]:
    """Hold ``<state-dir>/tandemd.lock`` for the daemon's life: one daemon per state dir."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        handle = open(state_dir / "tandemd.lock", "a+")  # noqa: SIM115 - held until the process exits
    except OSError as exc:
        raise DaemonError(f"cannot use state dir {state_dir}: {exc.strerror}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        raise DaemonError(
            f"another tandemd already runs on state dir {state_dir} (pid {handle.read().strip() or '?'})"
        ) from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


async def open_store(url: str, *, state_dir: Path, node: str) -> Store:
    if url == "embedded":
        return await EmbeddedStore.open(state_dir, node=node)
    if url.startswith("etcd://"):
        from controller.store.etcd import EtcdStore

        return await EtcdStore.connect(url)
    raise DaemonError(f"--store {url!r}: expected 'embedded' or etcd://HOST:PORT[/PREFIX]")


async def _cluster_key(store: Store, state_dir: Path) -> tuple[bytes | None, Path]:
    clusters = await store.list("Cluster")
    secret_file = clusters[0].spec.secret_file if clusters and isinstance(clusters[0], Cluster) else None
    path = key_path(state_dir, secret_file)
    return load_key(path), path


async def run_node(*, node: str, state_dir: Path, listen: Listen, store_url: str) -> None:
    """Run until SIGTERM or SIGINT, then stop serving and close the store."""
    lock = lock_state_dir(state_dir)
    store = await open_store(store_url, state_dir=state_dir, node=node)
    actuators = Actuators(node=node, state_dir=state_dir)
    tasks: list[asyncio.Task[None]] = []
    runner: web.AppRunner | None = None
    try:
        key, path = await _cluster_key(store, state_dir)
        if key is None:
            log.warning(
                "No cluster key at %s: heartbeats and peer traffic are unauthenticated (run `tandem keygen` "
                "on one node and copy the file to every node). node=%s",
                path,
                node,
            )
        await actuators.cleanup_stale()
        verdicts = Verdicts()
        reconciler = Reconciler(node=node, store=store, actuators=actuators, verdicts=verdicts)
        membership = MembershipSupervisor(node=node, store=store, reconciler=reconciler, key=key)
        sync = PeerSync(store=store, node=node, key=key) if isinstance(store, EmbeddedStore) else None
        api = Api(store=store, node=node, state_dir=str(state_dir), sync=sync, verdicts=verdicts, reconciler=reconciler)
        runner = web.AppRunner(api.app(), access_log=None, handle_signals=False)
        await runner.setup()
        for host, port in listen.binds():
            try:
                await web.TCPSite(runner, host, port, reuse_address=True).start()
            except OSError as exc:
                raise DaemonError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        if sync is not None:
            tasks.append(asyncio.create_task(sync.run(), name="peer-sync"))
        tasks.append(asyncio.create_task(membership.run(), name="membership"))
        tasks.append(asyncio.create_task(reconciler.run(), name="reconcile"))
        log.info(
            "tandemd is serving. node=%s listen=%s store=%s state_dir=%s",
            node,
            ",".join(f"{h}:{p}" for h, p in listen.binds()),
            store_url,
            state_dir,
        )
        await _until_signalled()
        log.info("tandemd is stopping. node=%s", node)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if runner is not None:
            await runner.cleanup()
        await actuators.aclose()
        await store.close()
        lock.close()


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
