"""The embedded store: SQLite in the node's state dir, kept in step with the other nodes by the peer link.

resourceVersion is a Lamport clock: every local write takes one more than the highest version this
node has seen from anyone, so a write is always newer than everything its author knew about. Sync
between nodes merges records by (version, origin node): the highest wins on every node, and a
deletion is a tombstone so that it wins too. One exception keeps a spec change from being lost: a
status write made on a copy that had not yet seen the latest spec (a node that just came back, or
one that wrote its status while a peer applied a change) is newer by version but carries an older
spec. Then the merge keeps the spec of the higher generation, takes the status of the later write,
and writes the result as a new version of its own, which every node then takes.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sqlite3
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.resources import KINDS, ObjectMeta, Resource, Status
from controller.store.base import (
    AlreadyExists,
    NotFound,
    Op,
    StoreError,
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

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    origin TEXT NOT NULL,
    body TEXT,              -- NULL: a tombstone, the object was deleted
    created INTEGER,        -- the version that created this incarnation; NULL: not known (older stores)
    PRIMARY KEY (kind, name)
);
CREATE TABLE IF NOT EXISTS clock (id INTEGER PRIMARY KEY CHECK (id = 0), version INTEGER NOT NULL);
INSERT OR IGNORE INTO clock VALUES (0, 0);
"""


@dataclass(frozen=True)
class Record:
    """One object's latest write as the sync protocol carries it; ``body`` None is a deletion."""

    kind: str
    name: str
    version: int
    origin: str
    body: dict[str, Any] | None
    # The version of the write that created this incarnation of the object (None: not known). A
    # re-created object has a new one, so the merge never mixes two incarnations.
    created: int | None = None

    def beats(self, other: Record | None) -> bool:
        return other is None or (self.version, self.origin) > (other.version, other.origin)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "version": self.version,
            "origin": self.origin,
            "body": self.body,
            "created": self.created,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        try:
            created = data.get("created")
            record = cls(
                str(data["kind"]),
                str(data["name"]),
                int(data["version"]),
                str(data["origin"]),
                data["body"],
                None if created is None else int(created),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"malformed sync record {data!r}: {exc}") from None
        check_kind(record.kind)
        if record.body is not None:
            parse_resource(record.body)  # refuse what would not load back
        return record


class EmbeddedStore:
    """SQLite-backed Store for one node; all SQLite work runs on one worker thread, off the event loop."""

    def __init__(self, path: Path, *, node: str) -> None:
        self.path = path
        self.node = node
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._db: sqlite3.Connection | None = None
        self._watchers: set[tuple[str | None, asyncio.Queue[WatchEvent]]] = set()
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, state_dir: Path, *, node: str) -> EmbeddedStore:
        """Open (creating if needed) ``<state_dir>/store.sqlite``."""
        store = cls(state_dir / "store.sqlite", node=node)
        await store._run(store._connect)
        return store

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        if "created" not in {row[1] for row in db.execute("PRAGMA table_info(records)")}:
            db.execute("ALTER TABLE records ADD COLUMN created INTEGER")  # a store from before the column
        self._db = db

    async def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    # --- reads ---------------------------------------------------------------------------------------

    def _record(self, kind: str, name: str) -> Record | None:
        assert self._db is not None
        row = self._db.execute(
            "SELECT kind, name, version, origin, body, created FROM records WHERE kind = ? AND name = ?", (kind, name)
        ).fetchone()
        return _row_record(row) if row else None

    def _records(self, kind: str | None, *, tombstones: bool = False) -> list[Record]:
        assert self._db is not None
        query = "SELECT kind, name, version, origin, body, created FROM records"
        where = [] if tombstones else ["body IS NOT NULL"]
        args: tuple[str, ...] = ()
        if kind is not None:
            where.append("kind = ?")
            args = (kind,)
        if where:
            query += " WHERE " + " AND ".join(where)
        return [_row_record(r) for r in self._db.execute(query + " ORDER BY kind, name", args)]

    async def get(self, kind: str, name: str) -> Resource:
        check_kind(kind)
        record = await self._run(self._record, kind, name)
        if record is None or record.body is None:
            raise NotFound(kind, name)
        return _resource(record)

    async def list(self, kind: str | None = None) -> list[Resource]:
        if kind is not None:
            check_kind(kind)
        return [_resource(r) for r in await self._run(self._records, kind)]

    # --- writes --------------------------------------------------------------------------------------

    def _plan(self, op: Op, created: str) -> tuple[Record, WatchEvent]:
        """The record one operation writes, checked against what is stored (raises on any conflict)."""
        kind, name = op.resource.kind, op.resource.name
        check_kind(kind)
        stored = self._record(kind, name)
        current = _resource(stored) if stored and stored.body is not None else None
        sent = op.resource.metadata.resource_version
        if op.action == "create":
            if current is not None:
                raise AlreadyExists(kind, name)
            new, event = prepared_create(op.resource, created=created), "ADDED"
        else:
            if current is None:
                raise NotFound(kind, name)
            check_version(kind, name, sent, current.metadata.resource_version)
            if op.action == "delete":
                return Record(kind, name, 0, self.node, None), WatchEvent("DELETED", current)
            new, event = prepared_update(current, op.resource), "MODIFIED"
        # The stored incarnation (a create's own version is assigned by _commit).
        incarnation = stored.created if stored is not None else None
        return Record(kind, name, 0, self.node, body_of(new), incarnation), WatchEvent(event, new)  # type: ignore[arg-type]

    def _commit(self, planned: Sequence[tuple[Op, Resource | None]]) -> list[tuple[Record, WatchEvent]]:
        """Check and write a batch in one SQLite transaction, each write taking the next clock value."""
        assert self._db is not None
        created = now_rfc3339()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            clock = self._db.execute("SELECT version FROM clock").fetchone()[0]
            written = []
            for op, status in planned:
                if status is not None:
                    record, event = self._plan_status(op.resource, status)
                else:
                    record, event = self._plan(op, created)
                clock += 1
                incarnation = clock if op.action == "create" else record.created
                record = Record(record.kind, record.name, clock, self.node, record.body, incarnation)
                self._write(record)
                if event.type != "DELETED":
                    event = WatchEvent(event.type, with_version(event.resource, str(clock)))
                written.append((record, event))
            self._db.execute("UPDATE clock SET version = ?", (clock,))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return written

    def _plan_status(self, ref: Resource, status: Status) -> tuple[Record, WatchEvent]:
        stored = self._record(ref.kind, ref.name)
        if stored is None or stored.body is None:
            raise NotFound(ref.kind, ref.name)
        current = _resource(stored)
        check_version(ref.kind, ref.name, ref.metadata.resource_version, current.metadata.resource_version)
        new = prepared_status(current, status)
        return Record(ref.kind, ref.name, 0, self.node, body_of(new), stored.created), WatchEvent("MODIFIED", new)

    def _write(self, record: Record) -> None:
        assert self._db is not None
        self._db.execute(
            "INSERT OR REPLACE INTO records (kind, name, version, origin, body, created) VALUES (?, ?, ?, ?, ?, ?)",
            (
                record.kind,
                record.name,
                record.version,
                record.origin,
                None if record.body is None else json.dumps(record.body, sort_keys=True),
                record.created,
            ),
        )

    async def _apply(self, planned: Sequence[tuple[Op, Resource | None]]) -> list[Resource]:
        async with self._lock:
            written = await self._run(self._commit, planned)
            for _, event in written:
                self._publish(event)
        return [event.resource for _, event in written]

    async def commit(self, ops: Sequence[Op]) -> list[Resource]:
        check_batch(ops)
        return await self._apply([(op, None) for op in ops])

    async def create(self, resource: Resource) -> Resource:
        return (await self.commit([Op("create", resource)]))[0]

    async def update(self, resource: Resource) -> Resource:
        return (await self.commit([Op("update", resource)]))[0]

    async def delete(self, kind: str, name: str, *, resource_version: str | None = None) -> Resource:
        check_kind(kind)
        return (await self.commit([Op("delete", _reference(kind, name, resource_version))]))[0]

    async def update_status(
        self, kind: str, name: str, status: Status, *, resource_version: str | None = None
    ) -> Resource:
        check_kind(kind)
        ref = _reference(kind, name, resource_version)
        return (await self._apply([(Op("update", ref), status)]))[0]

    # --- watch ---------------------------------------------------------------------------------------

    def _publish(self, event: WatchEvent) -> None:
        for kind, queue in list(self._watchers):
            if kind is None or kind == event.resource.kind:
                queue.put_nowait(event)

    async def watch(self, kind: str | None = None) -> AsyncIterator[WatchEvent]:
        if kind is not None:
            check_kind(kind)
        queue: asyncio.Queue[WatchEvent] = asyncio.Queue()
        entry = (kind, queue)
        async with self._lock:  # no write can land between the listing and the subscription
            existing = await self._run(self._records, kind)
            self._watchers.add(entry)
        try:
            for record in existing:
                yield WatchEvent("ADDED", _resource(record))
            while True:
                yield await queue.get()
        finally:
            self._watchers.discard(entry)

    # --- sync with the other nodes (not part of the Store protocol) -------------------------------------

    async def export(self) -> list[Record]:
        """Every record, tombstones included, for a peer to merge."""
        return await self._run(self._records, None, tombstones=True)

    def _merge(self, records: Sequence[Record]) -> list[WatchEvent]:
        assert self._db is not None
        events = []
        self._db.execute("BEGIN IMMEDIATE")
        try:
            clock = self._db.execute("SELECT version FROM clock").fetchone()[0]
            for record in records:
                stored = self._record(record.kind, record.name)
                clock = max(clock, record.version)
                later, earlier = (record, stored) if record.beats(stored) else (stored, record)
                body = _newer_spec_with_later_status(later, earlier)
                if body is not None:
                    clock += 1
                    merged = Record(record.kind, record.name, clock, self.node, body, record.created)
                    self._write(merged)
                    events.append(_merge_event(stored, merged))
                elif later is record:
                    self._write(record)
                    events.append(_merge_event(stored, record))
            self._db.execute("UPDATE clock SET version = ?", (clock,))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return [e for e in events if e is not None]

    async def merge(self, records: Sequence[Record]) -> int:
        """Take every record newer than ours; return how many changed this store."""
        async with self._lock:
            events = await self._run(self._merge, records)
            for event in events:
                self._publish(event)
        return len(events)

    async def close(self) -> None:
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._executor.shutdown(wait=False)


def _row_record(row: tuple[Any, ...]) -> Record:
    kind, name, version, origin, body, created = row
    return Record(kind, name, version, origin, None if body is None else json.loads(body), created)


def _resource(record: Record) -> Resource:
    assert record.body is not None
    return with_version(parse_resource(record.body), str(record.version))


def _reference(kind: str, name: str, resource_version: str | None) -> Resource:
    """A stand-in carrying only kind, name and resourceVersion, for deletes and status writes."""
    meta = ObjectMeta.model_construct(name=name, resource_version=resource_version, labels={}, annotations={})
    return KINDS[kind].model_construct(kind=kind, metadata=meta, spec=None, status=None)


def _newer_spec_with_later_status(later: Record, earlier: Record | None) -> dict[str, Any] | None:
    """The merged body when the later write of one object carries an older spec; else None.

    Only within one incarnation of the object (the same `created`): a re-created object starts again
    at generation 1, and the later write then wins whole, as any other.
    """
    if earlier is None or later.body is None or earlier.body is None:
        return None
    if later.created is None or later.created != earlier.created:
        return None
    new_meta, old_meta = later.body.get("metadata") or {}, earlier.body.get("metadata") or {}
    if (old_meta.get("generation") or 1) <= (new_meta.get("generation") or 1):
        return None
    body = dict(earlier.body)
    if "status" in later.body:
        body["status"] = later.body["status"]
    else:
        body.pop("status", None)
    return body


def _merge_event(stored: Record | None, record: Record) -> WatchEvent | None:
    if record.body is None:
        if stored is None or stored.body is None:
            return None
        return WatchEvent("DELETED", _resource(stored))
    kind = "ADDED" if stored is None or stored.body is None else "MODIFIED"
    return WatchEvent(kind, _resource(record))  # type: ignore[arg-type]
