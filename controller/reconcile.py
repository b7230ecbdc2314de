"""The reconcile loop: every tick, observe each module of this node, decide, act, report.

Level-triggered: a tick reads the whole world (resources from the store, the peer's heartbeats, the
module's own runtime state), so a missed event costs one tick, never correctness. The loop owns
each module's state on this node; transitions (scripts, addresses) run as one task per module,
observed by later ticks and never awaited by the loop itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from controller.actuators import Actuators, ModuleContext, StepFailed, replication_ports
from controller.api.health import Verdicts
from controller.decide import DataRelation, Decision, Observed, PeerView, State, decide
from controller.membership.heartbeat import ModuleBeat
from controller.module_status import report, rfc3339
from controller.resources import Cluster, Module, ReplicatedDir, VirtualIP
from controller.resources.durations import parse_duration
from controller.store import Store, StoreUnavailable
from controller.transitions import Step, plan, stages, undo

log = logging.getLogger("tandem.reconcile")
Command = Literal["start", "stop", "restart", "swap", "prim", "second", "failover-on", "failover-off"]


class Membership(Protocol):
    """What the loop needs of the heartbeat endpoint (controller.membership.endpoint.Endpoint)."""

    listening_since: float | None

    def now(self) -> float: ...
    def view(self, peer: str, module: str, *, timeout: float | None = None) -> PeerView | None: ...


@dataclass
class ModuleRuntime:
    """This node's live state of one module: owned by the loop, nobody else writes it."""

    name: str
    enabled: bool
    ctx: ModuleContext | None = None  # the module as of the last tick, to stop it if it is deleted
    state: State = State.STOP
    decision: Decision | None = None
    since: float = field(default_factory=time.time)
    task: asyncio.Task[None] | None = None
    target: State | None = None
    step: str = ""
    restarts: deque[float] = field(default_factory=deque)
    start_failures: int = 0
    last_error: str = ""
    swap: bool = False
    forced: Literal["prim", "second"] | None = None
    restart: bool = False
    failover: bool | None = None  # `tandem failover MODULE on|off`: overrides spec.failover on this node

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.done()


class Reconciler:
    """One loop per daemon over every module that names this node."""

    def __init__(
        self,
        *,
        node: str,
        store: Store,
        actuators: Actuators,
        verdicts: Verdicts,
        membership: Membership | None = None,
        tick: float = 0.2,
    ) -> None:
        self.node = node
        self.store = store
        self.actuators = actuators
        self.verdicts = verdicts
        self.membership = membership
        self.tick_interval = tick
        self.modules: dict[str, ModuleRuntime] = {}
        self._wake = asyncio.Event()
        self._announce = False  # membership changed: serving modules announce their addresses again
        self._deferred = False  # the last tick started a transition and left the status writes to this one
        self._background: set[asyncio.Task[None]] = set()

    # --- what the rest of the daemon reads ------------------------------------------------------------

    def beats(self) -> Mapping[str, ModuleBeat]:
        """This node's module states and handshake flags, for the heartbeats (memory only)."""
        out = {}
        for name, rt in self.modules.items():
            d = rt.decision
            out[name] = ModuleBeat(
                state=rt.state,
                claiming=bool(d and d.claim),
                grants=bool(d and d.grant),
                handover=bool(d and d.handover),
            )
        return out

    def snapshot(self) -> list[dict[str, Any]]:
        """Every module's live state here, for /api/v1/status."""
        return [
            {
                "module": rt.name,
                "node": self.node,
                "state": rt.state.value,
                "serving": rt.state.serving,
                "enabled": rt.enabled,
                "reason": rt.decision.reason if rt.decision else "",
                "message": rt.decision.message if rt.decision else "",
                "transition": {"to": rt.target.value, "step": rt.step} if rt.busy and rt.target else None,
                "lastError": rt.last_error,
                "since": rt.since,
                "replication": self._replication(rt),
            }
            for rt in sorted(self.modules.values(), key=lambda r: r.name)
        ]

    def _lost(self, module: Module) -> frozenset[str]:
        """The module's other nodes this node hears no heartbeat from."""
        if self.membership is None:
            return frozenset()
        timeout = parse_duration(module.spec.heartbeat.timeout)
        others = (n for n in module.spec.nodes if n != self.node)
        return frozenset(n for n in others if self.membership.view(n, module.name, timeout=timeout) is None)

    def _entry(self, rt: ModuleRuntime) -> dict[str, Any]:
        """This node's entry in the Module's status (only what changes with the state, not every tick)."""
        return {
            "state": rt.state.value,
            "serving": rt.state.serving,
            "reason": rt.decision.reason if rt.decision else "",
            "since": rfc3339(rt.since),
            "replication": self._replication(rt)["state"],
        }

    def _replication(self, rt: ModuleRuntime) -> dict[str, Any]:
        state, remaining, _ = self.actuators.replication_state(rt.name, replicated=bool(rt.ctx and rt.ctx.dirs))
        return {"state": state, "remainingBytes": remaining}

    def command(self, module: str, command: Command) -> str:
        """An operator's command for this node; the next tick acts on it."""
        rt = self.modules.get(module)
        if rt is None:
            raise KeyError(f"module {module!r} does not run on node {self.node}")
        if command in ("start", "stop"):
            rt.enabled = command == "start"
            rt.start_failures = 0
            rt.forced = None
        elif command == "restart":
            rt.restart = True
        elif command == "swap":
            rt.swap = True
        elif command in ("failover-on", "failover-off"):
            rt.failover = command == "failover-on"
        else:
            rt.forced = command
        self._wake.set()
        return f"{command} {module} on {self.node}: accepted"

    def membership_changed(self) -> None:
        """A peer or a network came or went: decide now, and announce held addresses again."""
        self._announce = True
        self._wake.set()

    # --- the loop ----------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Tick until cancelled; then stop every module's transition task."""
        try:
            while True:
                self._wake.clear()
                await self.tick()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.tick_interval)
        finally:
            for rt in self.modules.values():
                if rt.task is not None:
                    rt.task.cancel()

    async def tick(self) -> None:
        """Observe, decide and act once for every module of this node."""
        try:
            resources = await self.store.list()
        except StoreUnavailable as exc:
            log.warning("Store unavailable; modules keep their state this tick. reason=%s", exc)
            return
        modules = {r.name: r for r in resources if isinstance(r, Module) and self.node in r.spec.nodes}
        started = False
        for name, module in modules.items():
            rt = self.modules.setdefault(name, ModuleRuntime(name, enabled=module.spec.boot_start))
            rt.ctx = self._context(module, resources)
            try:
                started |= self._reconcile(rt.ctx, rt)
            except Exception:  # a bug in one module's tick must not stop the others
                log.exception("Reconciling a module failed; it keeps its state. module=%s node=%s", name, self.node)
        if started and not self._deferred:
            # A transition started this tick (a takeover): the status writes wait for the next tick (at most
            # tick_interval, or when the transition ends). Written now, their store work would compete with the
            # takeover's first steps for this process (5-15 ms): the status can wait, the clients cannot.
            # Never twice in a row, so transitions started tick after tick cannot hold the status back.
            self._deferred = True
            await asyncio.sleep(0)
        else:
            self._deferred = False
            for name, module in modules.items():
                await report(self.store, module, self.node, self._entry(self.modules[name]), lost=self._lost(module))
        for name in set(self.modules) - set(modules):
            self._retire(self.modules[name])
        if self._announce:
            self._announce = False
            self._announce_held()

    def _context(self, module: Module, resources: list[Any]) -> ModuleContext:
        dirs = [r for r in resources if isinstance(r, ReplicatedDir)]
        ports = replication_ports(dirs)
        cluster = next((r for r in resources if isinstance(r, Cluster)), None)
        address = peer_address = None
        peer = next((n for n in module.spec.nodes if n != self.node), None)
        if cluster is not None:
            network = cluster.spec.networks[0]
            by_name = {n.name: n.addresses for n in cluster.spec.nodes}
            address = by_name.get(self.node, {}).get(network)
            peer_address = by_name.get(peer, {}).get(network) if peer else None
        return ModuleContext(
            module=module,
            vips=[r for r in resources if isinstance(r, VirtualIP) and r.spec.module == module.name],
            dirs=[(d, ports[d.name]) for d in dirs if d.spec.module == module.name],
            address=address,
            peer_address=peer_address,
        )

    def _announce_held(self) -> None:
        """Gratuitous ARP for every address of a serving module: clients may hold the other node's MAC."""
        for rt in self.modules.values():
            if rt.state.serving and not rt.busy:
                for address in rt.ctx.vips if rt.ctx else []:
                    task = asyncio.create_task(self.actuators.announce(address), name=f"announce-{address.name}")
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)

    def _reconcile(self, ctx: ModuleContext, rt: ModuleRuntime) -> bool:
        """Decide for one module and start its transition if it needs one; True when one was started."""
        module = ctx.module
        if rt.busy:
            self._record(module, rt)
            return False
        observed = self._observe(module, rt)
        decision = decide(observed)
        self._log(module, rt, decision)
        if rt.state == State.PRIM and decision.state == State.ALONE and decision.reason == "PeerLost":
            # Writes waiting for the lost peer's acks complete locally now, not after the peer timeout.
            self.actuators.peer_lost(module.name)
        rt.decision = decision
        steps = plan(rt.state, decision.state, restart=decision.restart, replicated=bool(ctx.dirs))
        if decision.restart:
            rt.restarts.append(observed.now)
        rt.swap = rt.restart = False
        started = decision.state != rt.state or bool(steps)
        if started:
            rt.target = decision.state
            rt.task = asyncio.create_task(self._transition(ctx, rt, steps), name=f"{module.name}-transition")
        elif not rt.state.serving:
            self.actuators.prepare(ctx)  # a standby reads ahead where its addresses would go
        self._record(module, rt)
        return started

    def _observe(self, module: Module, rt: ModuleRuntime) -> Observed:
        spec = module.spec
        timeout = parse_duration(spec.heartbeat.timeout)
        now = self.membership.now() if self.membership else asyncio.get_running_loop().time()
        window = parse_duration(spec.restart.loop_interval)
        while rt.restarts and rt.restarts[0] < now - window:
            rt.restarts.popleft()
        peer_name = next((n for n in spec.nodes if n != self.node), None) if spec.mode == "mirror" else None
        peer = None
        if peer_name is not None and self.membership is not None:
            peer = self.membership.view(peer_name, module.name, timeout=timeout)
        listening = self.membership.listening_since if self.membership and self.membership.listening_since else now
        replicated = bool(rt.ctx and rt.ctx.dirs)
        replication, _, was_in_sync = self.actuators.replication_state(module.name, replicated=replicated)
        data: DataRelation = "unknown"
        if rt.state == State.SECOND and was_in_sync is not None:
            data = "same" if was_in_sync else "older"
        waiting = ()
        if rt.start_failures > spec.restart.max_loop:
            waiting = (
                f"startPrim failed {rt.start_failures} times in a row ({rt.last_error}); `tandem start` retries",
            )
        last = rt.decision
        return Observed(
            node=self.node,
            nodes=tuple(spec.nodes),
            state=rt.state,
            enabled=rt.enabled,
            now=now,
            mode=spec.mode,
            preferred=spec.preferred_primary,
            auto_swap=spec.auto_swap,
            failover=spec.failover if rt.failover is None else rt.failover,
            peer=peer,
            listening_since=listening,
            replication=replication,
            data=data,
            timeout=timeout,
            waiting_on=waiting,
            failure="restart" if rt.restart else None,
            failure_cause="an operator's restart",
            restarts=0,
            max_loop=spec.restart.max_loop,
            forced=rt.forced,
            swap=rt.swap,
            claiming=bool(last and last.claim),
            handing_over=bool(last and last.handover and rt.state == State.SECOND),
        )

    async def _transition(self, ctx: ModuleContext, rt: ModuleRuntime, steps: list[Step]) -> None:
        module = ctx.module
        target = rt.target or rt.state
        role = "prim" if target.serving else ("second" if target == State.SECOND else "none")
        done: list[Step] = []
        attempted: set[Step] = set()
        try:
            for stage in stages(steps):
                rt.step = "+".join(stage)
                attempted.update(stage)
                results = await asyncio.gather(
                    *(self.actuators.run(step, ctx, role=role) for step in stage), return_exceptions=True
                )
                done += [step for step, result in zip(stage, results, strict=True) if result is None]
                failure = next((r for r in results if isinstance(r, BaseException)), None)
                if failure is not None:
                    raise failure
        except Exception as exc:  # StepFailed, or a bug: either way the module must not be left half-started
            if not isinstance(exc, StepFailed):
                log.exception(
                    "A transition step raised; treating it as failed. module=%s node=%s step=%s",
                    module.name,
                    self.node,
                    rt.step,
                )
            rt.last_error = str(exc) or type(exc).__name__
            rt.start_failures += 1
            log.error(
                "A transition failed; the module does not serve. module=%s node=%s to=%s error=%s",
                module.name,
                self.node,
                target,
                exc,
            )
            for step in undo(target, done=done, attempted=attempted, replicated=bool(ctx.dirs)):
                with contextlib.suppress(StepFailed):
                    await self.actuators.run(step, ctx, role="none")
            self._set_state(module, rt, State.WAIT if rt.state != State.SECOND else State.SECOND)
            return
        finally:
            rt.step = ""
        if target.serving:
            rt.start_failures = 0
        self._set_state(module, rt, target)
        self._wake.set()

    def _set_state(self, module: Module, rt: ModuleRuntime, state: State) -> None:
        if state != rt.state:
            reason = rt.decision.reason if rt.decision else ""
            log.info(
                "Module state changed. module=%s node=%s from=%s to=%s reason=%s",
                module.name,
                self.node,
                rt.state,
                state,
                reason,
            )
            rt.state, rt.since = state, time.time()
        self._record(module, rt)

    def _record(self, module: Module, rt: ModuleRuntime) -> None:
        valid_for = max(3 * self.tick_interval, 1.0)
        self.verdicts.record(module.name, serving=rt.state.serving, valid_for=valid_for)

    def _log(self, module: Module, rt: ModuleRuntime, decision: Decision) -> None:
        last = rt.decision
        if last is None or (last.state, last.reason) != (decision.state, decision.reason):
            log.info(
                "%s. module=%s node=%s state=%s reason=%s",
                decision.message,
                module.name,
                self.node,
                decision.state,
                decision.reason,
            )

    def _retire(self, rt: ModuleRuntime) -> None:
        """A module deleted, or no longer naming this node: stop it here, then forget it."""
        if rt.busy:
            return
        if rt.state == State.STOP or rt.ctx is None:
            del self.modules[rt.name]
            self.verdicts.forget(rt.name)
            log.info("Module no longer runs on this node. module=%s node=%s", rt.name, self.node)
            return
        rt.enabled, rt.target = False, State.STOP
        steps = plan(rt.state, State.STOP, replicated=bool(rt.ctx.dirs))
        rt.task = asyncio.create_task(self._transition(rt.ctx, rt, steps), name=f"{rt.name}-retire")
