"""Runs this node's heartbeat endpoint for the Cluster in the store, restarting it when the Cluster changes.

The Cluster may be applied after the daemon starts, and its networks or the modules' pulse may change:
the supervisor compares the wanted endpoint settings with the running ones once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from controller.membership.endpoint import Endpoint
from controller.membership.events import Event, NetworkRestored, PeerFound, PeerLost, PeerRestarted
from controller.membership.transport import UdpTransport
from controller.reconcile import Reconciler
from controller.resources import Cluster, Module
from controller.resources.durations import parse_duration
from controller.store import Store, StoreUnavailable

log = logging.getLogger("tandem.membership")
DEFAULT_PULSE, DEFAULT_TIMEOUT = 0.7, 30.0
CHECK_EVERY = 1.0


@dataclass(frozen=True)
class Settings:
    cluster: str  # the Cluster spec as JSON: any change restarts the endpoint
    pulse: float
    timeout: float


class MembershipSupervisor:
    def __init__(self, *, node: str, store: Store, reconciler: Reconciler, key: bytes | None) -> None:
        self.node, self.store, self.reconciler, self.key = node, store, reconciler, key
        self.endpoint: Endpoint | None = None
        self._task: asyncio.Task[None] | None = None
        self._settings: Settings | None = None
        self._cluster: Cluster | None = None

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self._converge()
                except StoreUnavailable as exc:
                    log.warning("Store unavailable; heartbeats keep their settings. reason=%s", exc)
                except OSError as exc:
                    log.error("Cannot start heartbeats; retrying. node=%s reason=%s", self.node, exc)
                await asyncio.sleep(CHECK_EVERY)
        finally:
            await self._stop()

    async def _wanted(self) -> Settings | None:
        clusters = [c for c in await self.store.list("Cluster") if isinstance(c, Cluster)]
        if not clusters or self.node not in {n.name for n in clusters[0].spec.nodes}:
            return None
        self._cluster = clusters[0]
        mine = [m for m in await self.store.list("Module") if isinstance(m, Module) and self.node in m.spec.nodes]
        pulse = min((parse_duration(m.spec.heartbeat.pulse) for m in mine), default=DEFAULT_PULSE)
        timeout = min((parse_duration(m.spec.heartbeat.timeout) for m in mine), default=DEFAULT_TIMEOUT)
        return Settings(clusters[0].spec.model_dump_json(), pulse, timeout)

    async def _converge(self) -> None:
        wanted = await self._wanted()
        if wanted == self._settings and (self._task is None or not self._task.done()):
            return
        await self._stop()
        self._settings = wanted
        if wanted is None or self._cluster is None:
            return
        endpoint = Endpoint.for_cluster(
            self._cluster.spec,
            self.node,
            transport=UdpTransport(),
            payload=self.reconciler.beats,
            key=self.key,
            pulse=wanted.pulse,
            timeout=wanted.timeout,
            on_event=self._on_event,
        )
        await endpoint.open()
        self.endpoint = endpoint
        self.reconciler.membership = endpoint
        self._task = asyncio.create_task(endpoint.run(), name="heartbeats")

    def _on_event(self, event: Event) -> None:
        if isinstance(event, PeerFound | PeerLost | PeerRestarted | NetworkRestored):
            self.reconciler.membership_changed()

    async def _stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None
            self.reconciler.membership = None
