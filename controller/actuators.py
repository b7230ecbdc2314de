"""The agent's actuators as the reconcile loop uses them: one step of a transition at a time.

The loop knows resources; the agent knows only plain values. This adapter is where a module's spec
becomes the command, timeout and address that agent/scripts.py and agent/vip.py take.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from agent import vip
from agent.replication.supervisor import Replicator, ReplicatorError, Spares
from agent.scripts import ScriptRunner
from controller.resources import Module, ReplicatedDir, VirtualIP
from controller.resources.durations import parse_duration
from controller.transitions import Step

log = logging.getLogger("tandem.actuators")
START_TIMEOUT = 300.0


REPLICATION_PORT_BASE = 9100


class StepFailed(Exception):
    """A step did not do what it must; the message says which and why."""


@dataclass(frozen=True)
class ModuleContext:
    """One module as the actuators need it this tick: its spec, addresses, directories and peer."""

    module: Module
    vips: list[VirtualIP]
    dirs: list[tuple[ReplicatedDir, int]]  # each directory with its replication port
    address: str | None = None  # this node's address for the replication stream
    peer_address: str | None = None


def replication_ports(dirs: list[ReplicatedDir]) -> dict[str, int]:
    """The same port for each directory on every node: its rank among all directories, by name."""
    return {d.name: REPLICATION_PORT_BASE + i for i, d in enumerate(sorted(dirs, key=lambda d: d.name))}


@dataclass
class Actuators:
    """Scripts and addresses for the modules of one node."""

    node: str
    state_dir: Path
    ledger: vip.Ledger = field(init=False)
    arp: vip.ArpSocket = field(default_factory=vip.ArpSocket)
    netlink: vip.Netlink = field(default_factory=vip.Netlink)  # where the addresses go, read ahead of a takeover
    spares: Spares = field(default_factory=Spares)  # a replicator process started ahead of the next role change
    _runners: dict[str, ScriptRunner] = field(default_factory=dict)
    replicators: dict[str, list[Replicator]] = field(default_factory=dict)  # by module
    _background: set[asyncio.Task[None]] = field(default_factory=set)
    _preparing: dict[str, asyncio.Task[None]] = field(default_factory=dict)  # by module

    def __post_init__(self) -> None:
        self.ledger = vip.Ledger(self.state_dir / "addresses.json")

    def app_log(self, module: str) -> Path:
        return self.state_dir / "logs" / f"{module}.app.log"

    def _runner(self, module: str) -> ScriptRunner:
        if module not in self._runners:
            self.app_log(module).parent.mkdir(parents=True, exist_ok=True)
            self._runners[module] = ScriptRunner(module=module, node=self.node, app_log=self.app_log(module))
        return self._runners[module]

    async def run(self, step: Step, ctx: ModuleContext, *, role: str) -> None:
        """Carry out one step; raise ``StepFailed`` if a start script fails or an address cannot be set."""
        module = ctx.module
        if step == Step.VIP_UP:
            for address in ctx.vips:
                await self._vip_up(address)
        elif step == Step.VIP_DOWN:
            for address in ctx.vips:
                await vip.ensure_absent(address.spec.address, address.spec.interface, ledger=self.ledger)
        elif step == Step.REPLICATION:
            await self.replicate(ctx, role)
        elif step == Step.RESTART_PRIM:
            await self._stop(module, "stopPrim", role)
            await self._start(module, "startPrim", role)
        elif step in (Step.STOP_PRIM, Step.STOP_BOTH, Step.POSTSTOP):
            await self._stop(module, str(step), role)
        else:
            await self._start(module, str(step), role)

    async def replicate(self, ctx: ModuleContext, role: str) -> None:
        """Stop the module's replicators, then start them in ``role`` (primary, secondary or none).

        The directories are independent of each other: they stop together and start together, so a
        module's takeover costs one replicator start, not one per directory.
        """
        await asyncio.gather(*(r.stop() for r in self.replicators.pop(ctx.module.name, [])))
        if role == "none" or not ctx.dirs:
            return
        if ctx.address is None or ctx.peer_address is None:
            raise StepFailed(
                f"module {ctx.module.name} replicates but no Cluster gives this node and its peer addresses"
            )
        secret = self.state_dir / "cluster.key"
        started: list[Replicator] = []
        self.replicators[ctx.module.name] = started
        replicators = [
            (
                rdir,
                Replicator(
                    directory=Path(rdir.spec.path),
                    role="primary" if role == "prim" else "secondary",
                    node=self.node,
                    peer=(ctx.peer_address, port) if role == "prim" else None,
                    listen=(ctx.address, port) if role != "prim" else None,
                    ack=rdir.spec.ack,
                    exclude=tuple(rdir.spec.exclude),
                    keep_cpus_awake=rdir.spec.keep_cpus_awake,
                    secret_file=secret if secret.exists() else None,
                    log_path=self.state_dir / "logs" / f"{rdir.name}.replicator.log",
                    spares=self.spares,
                ),
            )
            for rdir, port in ctx.dirs
        ]
        results = await asyncio.gather(*(r.start() for _, r in replicators), return_exceptions=True)
        failed: list[str] = []
        bugs: list[BaseException] = []
        for (rdir, replicator), result in zip(replicators, results, strict=True):
            if isinstance(result, ReplicatorError):
                failed.append(f"ReplicatedDir {rdir.name}: {result}")
            elif isinstance(result, BaseException):
                bugs.append(result)
            else:
                started.append(replicator)
        if bugs or failed:
            # All the directories take the role or none does: a half-promoted module must not look replicated.
            await asyncio.gather(*(r.stop() for r in started))
            started.clear()
        if bugs:
            raise bugs[0]
        if failed:
            raise StepFailed("; ".join(failed))

    def peer_lost(self, module: str) -> None:
        """The module's peer is declared lost: its primary replicators stop waiting for it now."""
        for replicator in self.replicators.get(module, []):
            replicator.peer_lost()

    def replication_state(self, module: str, *, replicated: bool) -> tuple[str, int, bool | None]:
        """(state for decide, bytes left to sync, whether the secondary was in sync when it lost its peer)."""
        replicators = self.replicators.get(module, [])
        if not replicators:
            return ("disconnected" if replicated else "none"), 0, None
        states = [r.status.state for r in replicators]
        remaining = sum(r.status.remaining_bytes for r in replicators)
        was = [r.status.was_in_sync for r in replicators if r.status.was_in_sync is not None]
        was_in_sync = all(was) if was else None
        if all(s == "in-sync" for s in states):
            return "in-sync", 0, was_in_sync
        if any(s in ("syncing", "connected") for s in states):
            return "syncing", remaining, was_in_sync
        return "disconnected", remaining, was_in_sync

    async def _vip_up(self, address: VirtualIP) -> None:
        spec = address.spec
        garp = spec.gratuitous_arp
        try:
            # The first announcement goes out with the add: clients move when it arrives, and startPrim
            # follows at once; the repeats (for lost frames) run in the background.
            held = await vip.ensure_present(
                spec.address,
                spec.interface,
                ledger=self.ledger,
                announce=garp.count > 0,
                arp=self.arp,
                netlink=self.netlink,
            )
        except vip.VipError as exc:
            raise StepFailed(f"VirtualIP {address.name}: {exc}") from None
        if garp.count > 1:
            repeats = asyncio.create_task(self._announce_repeats(address, held.interface), name=f"garp-{address.name}")
            self._background.add(repeats)
            repeats.add_done_callback(self._background.discard)

    def prepare(self, ctx: ModuleContext) -> None:
        """While a module stands by: read where its addresses would go, in the background, one reading at a time
        per module (``vip.Netlink`` reads again only when its reading gets old).

        The takeover then adds each address with one netlink request.
        """
        running = self._preparing.get(ctx.module.name)
        if not ctx.vips or (running is not None and not running.done()):
            return
        task = asyncio.create_task(self._prepare(ctx.vips), name=f"prepare-{ctx.module.name}")
        self._preparing[ctx.module.name] = task
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _prepare(self, addresses: list[VirtualIP]) -> None:
        for address in addresses:
            try:
                await self.netlink.prepare(address.spec.address, address.spec.interface)
            except (vip.VipError, OSError) as exc:  # the takeover reads again and reports what is wrong
                log.debug("Could not read ahead where a virtual IP goes. vip=%s reason=%s", address.name, exc)

    async def _announce_repeats(self, address: VirtualIP, interface: str) -> None:
        garp = address.spec.gratuitous_arp
        await asyncio.sleep(parse_duration(garp.interval))
        await self.announce(address, count=garp.count - 1, interface=interface)

    async def announce(self, address: VirtualIP, *, count: int | None = None, interface: str | None = None) -> None:
        """Gratuitous ARP (or neighbour advertisement) for an address this node holds."""
        garp = address.spec.gratuitous_arp
        try:
            await vip.announce(
                address.spec.address,
                interface or address.spec.interface,
                count=garp.count if count is None else count,
                interval=parse_duration(garp.interval),
                arp=self.arp,
            )
        except (vip.VipError, OSError) as exc:
            log.warning("Could not announce the virtual IP. vip=%s reason=%s", address.name, exc)

    async def _start(self, module: Module, script: str, role: str) -> None:
        command = getattr(module.spec.scripts, _attr(script))
        if not command:
            return
        result = await self._runner(module.name).run(script, command, role=role, timeout=START_TIMEOUT)
        if not result.ok:
            raise StepFailed(f"{script}: {result.message}")

    async def _stop(self, module: Module, script: str, role: str) -> None:
        command = getattr(module.spec.scripts, _attr(script))
        if not command:
            return
        timeouts = module.spec.stop_timeouts
        result = await self._runner(module.name).stop(
            script,
            command,
            role=role,
            graceful_timeout=parse_duration(timeouts.graceful),
            force_timeout=parse_duration(timeouts.force),
        )
        if not result.ok:
            log.warning(
                "A stop script did not stop cleanly; going on. module=%s script=%s result=%s",
                module.name,
                script,
                result.message,
            )

    async def cleanup_stale(self) -> None:
        """At start, before joining: remove every address this agent added before a crash."""
        await vip.cleanup_stale(self.ledger, set())

    async def aclose(self) -> None:
        """At daemon stop: the replicators unmount; the scripts' output copiers end."""
        for task in self._background:
            task.cancel()
        for replicators in self.replicators.values():
            for replicator in replicators:
                await replicator.stop()
        self.replicators.clear()
        await self.spares.aclose()
        for runner in self._runners.values():
            await runner.aclose()
        self.arp.close()
        self.netlink.close()


def _attr(script: str) -> str:
    return {
        "prestart": "prestart",
        "startBoth": "start_both",
        "startPrim": "start_prim",
        "stopPrim": "stop_prim",
        "stopBoth": "stop_both",
        "poststop": "poststop",
    }[script]
