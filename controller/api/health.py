"""The load-balancer health URL: 200 only where the module is served, from a verdict that expires.

The reconcile loop renews each module's verdict every tick; the URL reads memory only. A verdict is
valid for a bounded time after the tick that made it, so a hung loop drains the load balancer
within that bound instead of answering 200 forever (Patroni's leader expiry).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

Clock = Callable[[], float]


@dataclass
class Verdicts:
    """What the last ticks decided about serving, per module, each with an expiry."""

    clock: Clock = time.monotonic
    _serving_until: dict[str, float] = field(default_factory=dict)
    _last_tick: float | None = None

    def record(self, module: str, *, serving: bool, valid_for: float) -> None:
        """Called by the loop each tick for each module."""
        now = self.clock()
        self._last_tick = now
        if serving:
            self._serving_until[module] = now + valid_for
        else:
            self._serving_until.pop(module, None)

    def forget(self, module: str) -> None:
        self._serving_until.pop(module, None)

    def serving(self, module: str) -> bool:
        return self._serving_until.get(module, float("-inf")) > self.clock()

    def loop_age(self) -> float | None:
        """Seconds since the loop last recorded anything, None before its first tick."""
        return None if self._last_tick is None else self.clock() - self._last_tick


def health_routes(verdicts: Verdicts, *, liveness_bound: float) -> list[web.RouteDef]:
    """GET and HEAD for /health/<module>, SafeKit's /var/modules/<module>/ready.txt, and /liveness."""

    async def health(request: web.Request) -> web.Response:
        if verdicts.serving(request.match_info["module"]):
            return web.Response(text="OK\n")
        return web.Response(status=404, text="NOT FOUND\n")

    async def liveness(request: web.Request) -> web.Response:
        age = verdicts.loop_age()
        if age is not None and age <= liveness_bound:
            return web.Response(text=f"OK loop {age:.1f}s ago\n")
        said = "never ran" if age is None else f"last ran {age:.1f}s ago"
        return web.Response(status=503, text=f"NOT LIVE: the reconcile loop {said}\n")

    # aiohttp answers HEAD from the GET handler and sends no body, as HAProxy's checks want.
    return [
        web.get("/health/{module}", health),
        web.get("/var/modules/{module}/ready.txt", health),
        web.get("/liveness", liveness),
    ]
