"""The agent's actuators as the reconcile loop uses them: one step of a transition at a time.

The loop knows resources; the agent knows only plain values. This adapter is where a module's spec
becomes the command, timeout and address that agent/scripts.py and agent/vip.py take.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from agent import vip
from agent.scripts import ScriptRunner
from controller.resources import Module, VirtualIP
from controller.resources.durations import parse_duration
from controller.transitions import Step

log = logging.getLogger("tandem.actuators")
START_TIMEOUT = 300.0


class StepFailed(Exception):
    """A step did not do what it must; the message says which and why."""


@dataclass
class Actuators:
    """Scripts and addresses for the modules of one node."""

    node: str
    state_dir: Path
    ledger: vip.Ledger = field(init=False)
    _runners: dict[str, ScriptRunner] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ledger = vip.Ledger(self.state_dir / "addresses.json")

    def app_log(self, module: str) -> Path:
        return self.state_dir / "logs" / f"{module}.app.log"

    def _runner(self, module: str) -> ScriptRunner:
        if module not in self._runners:
            self.app_log(module).parent.mkdir(parents=True, exist_ok=True)
            self._runners[module] = ScriptRunner(module=module, node=self.node, app_log=self.app_log(module))
        return self._runners[module]

    async def run(self, step: Step, module: Module, vips: list[VirtualIP], *, role: str) -> None:
        """Carry out one step; raise ``StepFailed`` if a start script fails or an address cannot be set."""
        if step == Step.VIP_UP:
            for address in vips:
                await self._vip_up(address)
        elif step == Step.VIP_DOWN:
            for address in vips:
                await vip.ensure_absent(address.spec.address, address.spec.interface, ledger=self.ledger)
        elif step == Step.RESTART_PRIM:
            await self._stop(module, "stopPrim", role)
            await self._start(module, "startPrim", role)
        elif step in (Step.STOP_PRIM, Step.STOP_BOTH, Step.POSTSTOP):
            await self._stop(module, str(step), role)
        else:
            await self._start(module, str(step), role)

    async def _vip_up(self, address: VirtualIP) -> None:
        spec = address.spec
        try:
            await vip.ensure_present(spec.address, spec.interface, ledger=self.ledger)
        except vip.VipError as exc:
            raise StepFailed(f"VirtualIP {address.name}: {exc}") from None
        await self.announce(address)

    async def announce(self, address: VirtualIP) -> None:
        """Gratuitous ARP (or neighbour advertisement) for an address this node holds."""
        garp = address.spec.gratuitous_arp
        try:
            await vip.announce(
                address.spec.address, address.spec.interface, count=garp.count, interval=parse_duration(garp.interval)
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
        for runner in self._runners.values():
            await runner.aclose()


def _attr(script: str) -> str:
    return {
        "prestart": "prestart",
        "startBoth": "start_both",
        "startPrim": "start_prim",
        "stopPrim": "stop_prim",
        "stopBoth": "stop_both",
        "poststop": "poststop",
    }[script]
