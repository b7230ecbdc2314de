"""Applying a set of resources to a store the way kubectl does: created, configured or unchanged.

The whole set is checked against what is stored before anything is written, and written in one
atomic batch, so an apply either lands whole or not at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from controller.resources import Resource
from controller.resources.consistency import Finding, check_consistency
from controller.store import AlreadyExists, Op, Store

Action = Literal["created", "configured", "unchanged"]


@dataclass(frozen=True)
class Applied:
    resource: Resource
    action: Action


class Rejected(Exception):
    """The change would leave the cluster description inconsistent; nothing was written."""

    def __init__(self, summary: str, findings: Sequence[Finding]) -> None:
        self.findings = list(findings)
        super().__init__(summary)


def new_findings(stored: Sequence[Resource], result: Sequence[Resource], *, state_dir: str | None) -> list[Finding]:
    """Findings the change introduces: those of the resulting set that the stored set did not have."""
    before = set(check_consistency(stored, state_dir=state_dir))
    return [f for f in check_consistency(result, state_dir=state_dir) if f not in before]


def _same(a: Resource, b: Resource) -> bool:
    def fields(r: Resource) -> tuple[object, ...]:
        meta = r.metadata
        return (r.spec.model_dump(mode="json"), meta.labels, meta.annotations)

    return fields(a) == fields(b)


async def apply(
    store: Store,
    incoming: Sequence[Resource],
    *,
    state_dir: str | None = None,
    dry_run: bool = False,
    create_only: bool = False,
) -> list[Applied]:
    """Create or update every resource of ``incoming``, atomically; raise ``Rejected`` if inconsistent.

    With ``create_only`` an object that already exists is an ``AlreadyExists`` error, as for a POST.
    """
    stored = {r.key: r for r in await store.list()}
    result = dict(stored)
    plan: list[tuple[Action, Resource]] = []
    for resource in incoming:
        current = stored.get(resource.key)
        if current is not None and create_only:
            raise AlreadyExists(*resource.key)
        if current is None:
            plan.append(("created", resource))
        elif _same(current, resource):
            plan.append(("unchanged", current))
        else:
            sent = resource.metadata.resource_version or current.metadata.resource_version
            meta = resource.metadata.model_copy(update={"resource_version": sent})
            plan.append(("configured", resource.model_copy(update={"metadata": meta})))
        result[resource.key] = resource
    findings = new_findings(list(stored.values()), list(result.values()), state_dir=state_dir)
    if findings:
        raise Rejected(
            f"{len(findings)} problem(s) with these resources and the stored ones; nothing was applied", findings
        )
    ops = [Op("create" if action == "created" else "update", r) for action, r in plan if action != "unchanged"]
    if dry_run or not ops:
        return [Applied(r, action) for action, r in plan]
    written = iter(await store.commit(ops))
    return [Applied(r if action == "unchanged" else next(written), action) for action, r in plan]


async def delete(store: Store, kind: str, name: str, *, resource_version: str | None = None) -> Resource:
    """Delete one resource unless others still depend on it; raise ``Rejected`` naming them."""
    stored = await store.list()
    target = await store.get(kind, name)
    rest = [r for r in stored if r.key != target.key]
    findings = new_findings(stored, rest, state_dir=None)
    if findings:
        users = sorted({"/".join(f.key) for f in findings})
        raise Rejected(
            f"cannot delete {kind}/{name}: {', '.join(users)} still depend on it; nothing was deleted", findings
        )
    return await store.delete(kind, name, resource_version=resource_version)
