"""The Store protocol every backend honours, its errors, and the pure rules they share.

Contracts (one suite, ``tests/integration/test_store_contract.py``, holds every backend to them):

- ``resourceVersion`` is an opaque string set by the store on every write; clients only compare it
  for equality and send it back.
- Writes are compare-and-set: ``update``/``delete``/``update_status`` given a ``resourceVersion``
  succeed only if it is still the stored one, else raise ``Conflict``; without one they are
  unconditional. ``create`` succeeds only if the object is absent, else ``AlreadyExists``.
- ``metadata.generation`` starts at 1 and grows by one on every write that changes ``spec``; writes
  that change only metadata or status keep it. ``update`` never changes status; ``update_status``
  never changes spec, metadata or generation.
- Without a ``resourceVersion`` a write is unconditional, yet never loses a concurrent write: an
  ``update`` keeps the status, and an ``update_status`` the spec, that are stored when it lands.
- ``commit`` applies a batch atomically: every operation or none. A batch names each object at
  most once and holds at most ``MAX_BATCH`` operations (etcd's default transaction limit).
- An unknown kind is a ``StoreError`` in every method.
- ``watch`` first yields an ``ADDED`` event per existing object, then every later change, in order,
  with no gap between the two. The listing is taken when the iterator is first advanced.
- Every method finishes or raises within the store's deadline; a backend that cannot be reached
  raises ``StoreUnavailable``, the one error the loop treats as "retry later".
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from controller.resources import KINDS, Resource, Status

MAX_BATCH = 128


class StoreError(Exception):
    """Base of every store error; the message says what failed on which object."""


class NotFound(StoreError):
    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"{kind}/{name} not found")
        self.kind, self.name = kind, name


class AlreadyExists(StoreError):
    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"{kind}/{name} already exists")
        self.kind, self.name = kind, name


class Conflict(StoreError):
    """A compare-and-set write carried a resourceVersion that is no longer the stored one."""

    def __init__(self, kind: str, name: str, sent: str | None, stored: str | None) -> None:
        super().__init__(
            f"{kind}/{name} was changed by someone else (you sent resourceVersion {sent}, the store has "
            f"{stored or 'none: it was deleted'}): read it again and retry"
        )
        self.kind, self.name, self.sent, self.stored = kind, name, sent, stored


class StoreUnavailable(StoreError):
    """The backend could not be reached within its deadline: retry later."""


@dataclass(frozen=True)
class WatchEvent:
    type: Literal["ADDED", "MODIFIED", "DELETED"]
    resource: Resource


@dataclass(frozen=True)
class Op:
    """One write of an atomic batch. For ``delete`` only kind, name and resourceVersion are read."""

    action: Literal["create", "update", "delete"]
    resource: Resource


class Store(Protocol):
    async def get(self, kind: str, name: str) -> Resource:
        """The stored object; ``NotFound`` if absent."""

    async def list(self, kind: str | None = None) -> list[Resource]:
        """Every object of ``kind`` (all kinds if None), sorted by kind then name."""

    async def create(self, resource: Resource) -> Resource:
        """Store a new object (generation 1, no status); ``AlreadyExists`` if present."""

    async def update(self, resource: Resource) -> Resource:
        """Replace metadata and spec (compare-and-set when resourceVersion is given); status is kept."""

    async def update_status(
        self, kind: str, name: str, status: Status, *, resource_version: str | None = None
    ) -> Resource:
        """Replace status only (compare-and-set when resource_version is given)."""

    async def delete(self, kind: str, name: str, *, resource_version: str | None = None) -> Resource:
        """Remove the object and return it as it was; ``NotFound`` if absent."""

    async def commit(self, ops: Sequence[Op]) -> list[Resource]:
        """Apply every operation or none; return the written objects in order (deleted ones as they were)."""

    def watch(self, kind: str | None = None) -> AsyncIterator[WatchEvent]:
        """ADDED for every existing object, then each change in order, until the iterator is closed."""

    async def close(self) -> None:
        """Release connections and files; the store is unusable afterwards."""


# --- pure rules shared by the backends -----------------------------------------------------------------


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_resource(body: dict) -> Resource:
    """Turn a stored JSON document back into its typed resource."""
    return KINDS[body["kind"]].model_validate(body)


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise StoreError(f"unknown kind {kind!r}: expected one of {', '.join(KINDS)}")


def prepared_create(resource: Resource, *, created: str) -> Resource:
    """The object as first stored: generation 1, a creation time, no status, no resourceVersion yet."""
    check_kind(resource.kind)
    meta = resource.metadata.model_copy(
        update={"generation": 1, "creation_timestamp": created, "resource_version": None}
    )
    return resource.model_copy(update={"metadata": meta, "status": None})


def prepared_update(stored: Resource, incoming: Resource) -> Resource:
    """Incoming metadata and spec over the stored object; generation grows only if spec changed."""
    generation = stored.metadata.generation or 1
    if incoming.spec.model_dump(mode="json") != stored.spec.model_dump(mode="json"):
        generation += 1
    meta = incoming.metadata.model_copy(
        update={
            "generation": generation,
            "creation_timestamp": stored.metadata.creation_timestamp,
            "resource_version": None,
        }
    )
    return incoming.model_copy(update={"metadata": meta, "status": stored.status})


def prepared_status(stored: Resource, status: Status) -> Resource:
    meta = stored.metadata.model_copy(update={"resource_version": None})
    return stored.model_copy(update={"metadata": meta, "status": status})


def with_version(resource: Resource, version: str) -> Resource:
    return resource.model_copy(update={"metadata": resource.metadata.model_copy(update={"resource_version": version})})


def check_batch(ops: Sequence[Op]) -> None:
    """Refuse a batch that names one object twice or is larger than every backend takes."""
    if len(ops) > MAX_BATCH:
        raise StoreError(f"a commit holds {len(ops)} operations; at most {MAX_BATCH}: apply fewer at a time")
    targets = [op.resource.key for op in ops]
    for kind, name in dict.fromkeys(targets):
        if targets.count((kind, name)) > 1:
            raise StoreError(f"a commit names {kind}/{name} more than once: send one operation per object")


def check_version(kind: str, name: str, sent: str | None, stored: str | None) -> None:
    """Raise ``Conflict`` if a compare-and-set write carries a version other than the stored one."""
    if sent is not None and sent != stored:
        raise Conflict(kind, name, sent, stored)


def body_of(resource: Resource) -> dict:
    """The JSON document a backend stores (resourceVersion is the backend's own, not stored inside)."""
    body = resource.to_dict()
    body["metadata"].pop("resourceVersion", None)
    return body
