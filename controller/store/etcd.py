"""The etcd store: each resource a JSON document under a key prefix, its mod revision the resourceVersion."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import aetcd
import aetcd.exceptions

from controller.resources import Resource, Status
from controller.store.base import (
    AlreadyExists,
    NotFound,
    Op,
    StoreError,
    StoreUnavailable,
    WatchEvent,
    body_of,
    check_batch,
    check_kind,
    check_version,
    now_rfc3339,
    parse_resource,
    prepared_create,
    prepared_status,
    prepared_update,
    with_version,
)

DEFAULT_PREFIX = "/tandem"
URL_FORM = "etcd://HOST:PORT[/PREFIX]"
# Retrying these cannot help: the request itself is wrong (too many operations, a bad token, ...).
_REFUSALS = (
    aetcd.InvalidArgumentError,
    aetcd.PreconditionFailedError,
    aetcd.exceptions.UnauthenticatedError,
)
_TIMEOUTS = (TimeoutError, aetcd.ConnectionTimeoutError, aetcd.WatchTimeoutError)
_SETTLE_S = 0.05


@dataclass(frozen=True)
class _Stored:
    """An object as etcd holds it, with the mod revision a compare-and-set must find unchanged."""

    resource: Resource
    revision: int


# Given what is stored, the object to put (None: delete the key); raises the error the write deserves.
_Plan = Callable[[_Stored | None], Resource | None]


class EtcdStore:
    """Resources under ``<prefix>/resources/<Kind>/<name>``; every write one etcd transaction."""

    def __init__(self, client: aetcd.Client, *, url: str, prefix: str, timeout: float) -> None:
        self._client, self.url, self.prefix, self.timeout = client, url, prefix, timeout
        self._closed = False

    @classmethod
    async def connect(cls, url: str, *, timeout: float = 5.0) -> EtcdStore:
        """A store for ``etcd://host:port[/prefix]``; etcd is first reached by the first call."""
        host, port, prefix = parse_url(url)
        options = {
            # Notice a silent etcd (frozen, partitioned) under a long-lived watch instead of waiting forever.
            "grpc.keepalive_time_ms": 10_000,
            "grpc.keepalive_timeout_ms": max(1, int(timeout * 1000)),
            "grpc.http2.max_pings_without_data": 0,
            # grpcio 1.85 waits for the ping's ack by this one, not by keepalive_timeout_ms alone.
            "grpc.http2.ping_timeout_ms": max(1, int(timeout * 1000)),
            # gRPC otherwise backs off up to two minutes before it tries an etcd that came back.
            "grpc.max_reconnect_backoff_ms": 5_000,
        }
        client = aetcd.Client(host, port, timeout=timeout, options=options)
        await client.connect()
        return cls(client, url=url, prefix=prefix, timeout=timeout)

    async def get(self, kind: str, name: str) -> Resource:
        """The stored object; ``NotFound`` if absent."""
        key = self._key(kind, name)
        async with self._calling(f"get {kind}/{name}"):
            found = await self._client.get(key)
        if found is None:
            raise NotFound(kind, name)
        return self._decode(found)

    async def list(self, kind: str | None = None) -> list[Resource]:
        """Every object of ``kind`` (all kinds if None), sorted by kind then name."""
        async with self._calling(f"list {kind or 'all kinds'}"):
            found = await self._client.get_prefix(self._prefix_of(kind))
        return sorted((self._decode(kv) for kv in found), key=lambda r: r.key)

    async def create(self, resource: Resource) -> Resource:
        """Store a new object (generation 1, no status); ``AlreadyExists`` if present."""
        return (await self.commit([Op("create", resource)]))[0]

    async def update(self, resource: Resource) -> Resource:
        """Replace metadata and spec (compare-and-set when resourceVersion is given); status is kept."""
        return (await self.commit([Op("update", resource)]))[0]

    async def update_status(
        self, kind: str, name: str, status: Status, *, resource_version: str | None = None
    ) -> Resource:
        """Replace status only (compare-and-set when resource_version is given)."""
        plan = partial(_plan_status, kind, name, status, resource_version)
        return (await self._transact(f"update status of {kind}/{name}", [(kind, name)], [plan]))[0]

    async def delete(self, kind: str, name: str, *, resource_version: str | None = None) -> Resource:
        """Remove the object and return it as it was; ``NotFound`` if absent."""
        plan = partial(_plan_delete, kind, name, resource_version)
        return (await self._transact(f"delete {kind}/{name}", [(kind, name)], [plan]))[0]

    async def commit(self, ops: Sequence[Op]) -> list[Resource]:
        """Apply every operation or none; return the written objects in order (deleted ones as they were)."""
        check_batch(ops)
        targets = [op.resource.key for op in ops]
        what = f"{ops[0].action} {ops[0].resource.kind}/{ops[0].resource.name}" if len(ops) == 1 else "commit"
        return await self._transact(what, targets, [_plan_of(op) for op in ops])

    async def watch(self, kind: str | None = None) -> AsyncIterator[WatchEvent]:
        """ADDED for every existing object, then each change in order, until the iterator is closed."""
        prefix, what = self._prefix_of(kind), f"watch {kind or 'all kinds'}"
        async with self._calling(what):
            found = await self._client.get_prefix(prefix)
            # From the revision just after the listing: no change is missed and none is seen twice.
            stream = await self._client.watch_prefix(prefix, start_revision=found.header.revision + 1)
        events: Any = aiter(stream)
        try:
            seen = {kv.key: self._decode(kv) for kv in found}
            for resource in sorted(seen.values(), key=lambda r: r.key):
                yield WatchEvent("ADDED", resource)
            async for event in events:
                yield self._change(event, seen)
        except aetcd.ClientError as e:
            raise self._failure(what, e) from e
        finally:
            await events.aclose()
            if not self._closed:
                await stream.cancel()

    async def close(self) -> None:
        """Release connections and files; the store is unusable afterwards."""
        if not self._closed:
            self._closed = True
            await self._client.close()
            # gRPC completes the calls close cancelled (the watch stream) on this loop a moment later; a loop
            # that ends before then leaves them to the next one, which logs "Event loop is closed".
            await asyncio.sleep(_SETTLE_S)

    # --- the transaction every write goes through ---------------------------------------------------------

    async def _transact(self, what: str, targets: Sequence[tuple[str, str]], plans: Sequence[_Plan]) -> list[Resource]:
        """Read the targets, plan each write on what is stored, commit if nothing changed meanwhile."""
        keys = [self._key(kind, name) for kind, name in targets]
        if not keys:
            return []
        async with self._calling(what):
            while True:
                stored = await self._read(keys)
                bodies = [plan(current) for plan, current in zip(plans, stored, strict=True)]
                revision = await self._write(keys, stored, bodies)
                if revision is not None:
                    return [_written(body, current, revision) for body, current in zip(bodies, stored, strict=True)]
                # Someone wrote one of the keys between our read and our write: the next read shows
                # what, and the plans raise Conflict or AlreadyExists, or retry an unconditional write.

    async def _read(self, keys: Sequence[bytes]) -> list[_Stored | None]:
        """The objects at ``keys`` (None where absent), read in one transaction so they are consistent."""
        ops = self._client.transactions
        _, ranges = await self._client.transaction(compare=[], success=[ops.get(key) for key in keys], failure=[])
        kvs = [found[0][1] if found else None for found in ranges]  # each range: [(value, kv)] or []
        return [None if kv is None else _Stored(self._decode(kv), kv.mod_revision) for kv in kvs]

    async def _write(
        self, keys: Sequence[bytes], stored: Sequence[_Stored | None], bodies: Sequence[Resource | None]
    ) -> int | None:
        """The revision of the transaction that wrote ``bodies`` if every key was still as read, else None."""
        ops = self._client.transactions
        compare = [
            ops.version(key) == 0 if current is None else ops.mod(key) == current.revision
            for key, current in zip(keys, stored, strict=True)
        ]
        writes = [
            ops.delete(key) if body is None else ops.put(key, json.dumps(body_of(body)).encode())
            for key, body in zip(keys, bodies, strict=True)
        ]
        succeeded, responses = await self._client.transaction(compare=compare, success=writes, failure=[])
        if not succeeded:
            return None
        first = responses[0]
        revision: int = getattr(first, first.WhichOneof("response")).header.revision
        return revision

    # --- keys, documents and errors ------------------------------------------------------------------------

    def _key(self, kind: str, name: str) -> bytes:
        return self._prefix_of(kind) + name.encode()

    def _prefix_of(self, kind: str | None) -> bytes:
        if kind is None:
            return f"{self.prefix}/resources/".encode()
        check_kind(kind)
        return f"{self.prefix}/resources/{kind}/".encode()

    def _decode(self, kv: aetcd.KeyValue) -> Resource:
        """The resource a key holds, its mod revision as resourceVersion."""
        try:
            resource = parse_resource(json.loads(kv.value))
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"{kv.key.decode(errors='replace')} in {self.url} is not a Tandem resource: {e}") from e
        return with_version(resource, str(kv.mod_revision))

    def _change(self, event: aetcd.Event, seen: dict[bytes, Resource]) -> WatchEvent:
        """The watch event for one etcd event; ``seen`` keeps the last object of each key for DELETED."""
        if event.kind == aetcd.EventKind.DELETE:
            return WatchEvent("DELETED", seen.pop(event.kv.key))
        resource = seen[event.kv.key] = self._decode(event.kv)
        return WatchEvent("ADDED" if event.kv.version == 1 else "MODIFIED", resource)

    @contextlib.asynccontextmanager
    async def _calling(self, what: str) -> AsyncIterator[None]:
        """Bound a call by the store's deadline and turn etcd client failures into store errors."""
        if self._closed:
            raise StoreError(f"the store for {self.url} is closed: cannot {what}")
        try:
            async with asyncio.timeout(self.timeout) as deadline:
                yield
        except (*_TIMEOUTS, aetcd.ClientError) as e:
            raise self._failure(what, e) from e
        if deadline.expired():
            # The cancelled gRPC call swallowed its cancellation and returned: its result cannot be trusted.
            raise self._failure(what, TimeoutError())

    def _failure(self, what: str, error: Exception) -> StoreError:
        if isinstance(error, _TIMEOUTS):
            return StoreUnavailable(
                f"etcd at {self.url} did not answer ({what}) within {self.timeout:g} s: retry later"
            )
        if isinstance(error, _REFUSALS):
            return StoreError(f"etcd at {self.url} refused {what}: {error}")
        return StoreUnavailable(
            f"etcd at {self.url} failed ({what}): {str(error) or type(error).__name__}: retry later"
        )


def parse_url(url: str) -> tuple[str, int, str]:
    """Host, port and key prefix of ``etcd://host:port[/prefix]``; StoreError naming the URL if malformed."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "etcd" or not parts.hostname or port is None or parts.query or parts.fragment:
        raise StoreError(f"{url!r} is not an etcd store URL: expected {URL_FORM}, e.g. etcd://127.0.0.1:2379")
    # gRPC reads an IPv6 address only in brackets.
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return host, port, parts.path.rstrip("/") or DEFAULT_PREFIX


def _plan_of(op: Op) -> _Plan:
    resource = op.resource
    if op.action == "create":
        return partial(_plan_create, resource)
    if op.action == "update":
        return partial(_plan_update, resource)
    if op.action == "delete":
        return partial(_plan_delete, resource.kind, resource.name, resource.metadata.resource_version)
    raise StoreError(f"cannot {op.action!r} {resource.kind}/{resource.name}: expected create, update or delete")


def _plan_create(resource: Resource, stored: _Stored | None) -> Resource:
    if stored is not None:
        raise AlreadyExists(resource.kind, resource.name)
    return prepared_create(resource, created=now_rfc3339())


def _plan_update(resource: Resource, stored: _Stored | None) -> Resource:
    current = _existing(resource.kind, resource.name, resource.metadata.resource_version, stored)
    return prepared_update(current, resource)


def _plan_status(kind: str, name: str, status: Status, version: str | None, stored: _Stored | None) -> Resource:
    return prepared_status(_existing(kind, name, version, stored), status)


def _plan_delete(kind: str, name: str, version: str | None, stored: _Stored | None) -> None:
    _existing(kind, name, version, stored)


def _written(body: Resource | None, stored: _Stored | None, revision: int) -> Resource:
    """What a write returns: the object as written, or for a delete the object as it was."""
    if body is not None:
        return with_version(body, str(revision))
    assert stored is not None, "a delete is planned only on an existing object"
    return stored.resource


def _existing(kind: str, name: str, version: str | None, stored: _Stored | None) -> Resource:
    """The stored object a write applies to; NotFound if absent, Conflict if ``version`` is not its own."""
    if stored is None:
        raise NotFound(kind, name)
    check_version(kind, name, version, stored.resource.metadata.resource_version)
    return stored.resource
