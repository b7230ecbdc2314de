"""Keeping the embedded stores of all nodes in step over the peer link.

Every node exchanges its whole record set with each peer named in the Cluster: right after any
change to its store, and every ``interval`` otherwise. Both sides merge what the other sent, so one
round trip heals both directions and a node that was down catches up on its first exchange. The
installations this serves hold tens of objects, so a full exchange is cheaper than bookkeeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from controller.api.errors import error_response
from controller.resources import Cluster
from controller.secret import SecretError, sign, verify
from controller.store import StoreError
from controller.store.embedded import EmbeddedStore, Record

log = logging.getLogger("tandem.sync")
SYNC_PATH = "/peer/v1/sync"
AUTH_HEADER = "X-Tandem-Signature"


@dataclass
class PeerState:
    reachable: bool | None = None
    url: str | None = None
    last_error: str = ""


@dataclass
class PeerSync:
    store: EmbeddedStore
    node: str
    key: bytes | None
    interval: float = 2.0
    timeout: float = 3.0
    peers: dict[str, PeerState] = field(default_factory=dict)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        """Exchange with every peer on each change and every ``interval``, until cancelled."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as session:
            watcher = asyncio.create_task(self._watch())
            try:
                while True:
                    self._wake.clear()
                    await self.exchange_all(session)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.interval)
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher

    async def _watch(self) -> None:
        async for _ in self.store.watch():
            self._wake.set()

    async def _peer_urls(self) -> dict[str, list[str]]:
        clusters = await self.store.list("Cluster")
        if not clusters:
            return {}
        cluster = clusters[0]
        assert isinstance(cluster, Cluster)
        urls = {}
        for node in cluster.spec.nodes:
            if node.name == self.node:
                continue
            urls[node.name] = [
                f"http://{_host(node.addresses[net])}:{node.api_port}{SYNC_PATH}"
                for net in cluster.spec.networks
                if net in node.addresses
            ]
        return urls

    async def exchange_all(self, session: aiohttp.ClientSession) -> None:
        urls = await self._peer_urls()
        for gone in set(self.peers) - set(urls):
            del self.peers[gone]
        await asyncio.gather(*(self._exchange(session, name, peer_urls) for name, peer_urls in urls.items()))

    async def _exchange(self, session: aiohttp.ClientSession, name: str, urls: list[str]) -> None:
        state = self.peers.setdefault(name, PeerState())
        errors = []
        for url in urls:
            try:
                changed = await self._exchange_one(session, url)
            except (aiohttp.ClientError, TimeoutError, SyncError) as exc:
                errors.append(f"{url}: {_describe(exc)}")
                continue
            if state.reachable is not True:
                log.info("Store sync with peer is up. peer=%s url=%s", name, url)
            if changed:
                log.info("Took newer resources from peer. peer=%s changed=%d", name, changed)
            state.reachable, state.url, state.last_error = True, url, ""
            return
        if state.reachable is not False:
            log.warning(
                "Store sync with peer failed; retrying every %.0fs. peer=%s errors=%s",
                self.interval,
                name,
                "; ".join(errors),
            )
        state.reachable, state.last_error = False, "; ".join(errors)

    async def _exchange_one(self, session: aiohttp.ClientSession, url: str) -> int:
        body = self._payload(await self.store.export())
        async with session.post(url, data=body, headers=self._headers(body)) as response:
            data = await response.read()
            if response.status != 200:
                raise SyncError(f"HTTP {response.status}: {data[:200].decode(errors='replace')}")
        if self.key is not None:
            try:
                verify(self.key, data, response.headers.get(AUTH_HEADER))
            except SecretError as exc:
                raise SyncError(f"answer refused: {exc}") from None
        return await self.store.merge(_records(data))

    def _payload(self, records: list[Record]) -> bytes:
        return json.dumps({"node": self.node, "records": [r.to_json() for r in records]}).encode()

    def _headers(self, body: bytes) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.key is not None:
            headers[AUTH_HEADER] = sign(self.key, body)
        return headers

    async def handle(self, request: web.Request) -> web.Response:
        """The peer side of an exchange: merge what was sent, answer with everything we hold."""
        body = await request.read()
        if self.key is not None:
            try:
                verify(self.key, body, request.headers.get(AUTH_HEADER))
            except SecretError as exc:
                log.warning("Refused a store sync request. remote=%s reason=%s", request.remote, exc)
                return error_response(403, "Forbidden", str(exc))
        try:
            records = _records(body)
        except SyncError as exc:
            log.warning("Refused a malformed store sync request. remote=%s reason=%s", request.remote, exc)
            return error_response(400, "BadRequest", str(exc))
        changed = await self.store.merge(records)
        if changed:
            log.info("Took newer resources from a peer's push. remote=%s changed=%d", request.remote, changed)
        answer = self._payload(await self.store.export())
        return web.Response(body=answer, headers=self._headers(answer))


class SyncError(Exception):
    """A peer answered, but not with a usable record set."""


def _records(data: bytes) -> list[Record]:
    try:
        payload = json.loads(data)
        return [Record.from_json(item) for item in payload["records"]]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, StoreError) as exc:
        raise SyncError(f"not a record set: {exc}") from None
    except ValueError as exc:  # pydantic's ValidationError: a record that would not load back
        raise SyncError(f"a record is not a valid resource: {exc}") from None


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
