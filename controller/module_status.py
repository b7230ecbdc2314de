"""The Module resource's status: each node writes its own entry; Ready is computed from all of them.

Pure except ``report``: ``node_entry`` and ``desired_status`` are plain functions of data. Every node
rewrites only its own entry under ``status.nodes``, and only when it changed, so the writes of two
nodes converge even through the embedded store's highest-version-wins sync (a node whose entry was
overwritten by the other's concurrent write sees it stale on a later tick and writes it again).
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

from controller.conditions import status_with
from controller.resources import Condition, Module, Status
from controller.store import Store, StoreError

log = logging.getLogger("tandem.status")


def rfc3339(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def ready_condition(module: Module, nodes: dict[str, dict[str, Any]]) -> Condition:
    """Ready: the module is served, and (mirror) its secondary is in sync."""
    serving = sorted(n for n, e in nodes.items() if e.get("serving") and e.get("reachable", True))
    states = {n: e.get("state") for n, e in nodes.items()}
    if not serving:
        if all(s == "STOP" for s in states.values()) and states:
            return Condition(type="Ready", status="False", reason="Stopped", message="the module is stopped")
        return Condition(type="Ready", status="False", reason="NotServing", message="no node serves the module")
    if module.spec.mode == "farm":
        return Condition(type="Ready", status="True", reason="Serving", message=f"served by {', '.join(serving)}")
    if len(serving) > 1:
        return Condition(
            type="Ready",
            status="False",
            reason="BothServing",
            message=f"{' and '.join(serving)} both serve: the nodes cannot see each other",
        )
    if states.get(serving[0]) == "PRIM":
        return Condition(
            type="Ready",
            status="True",
            reason="InSync",
            message=f"{serving[0]} serves, its peer is an in-sync secondary",
        )
    return Condition(
        type="Ready",
        status="False",
        reason="PeerNotInSync",
        message=f"{serving[0]} serves alone: its peer is absent or not in sync yet",
    )


def desired_status(
    module: Module, node: str, entry: dict[str, Any], *, lost: frozenset[str] = frozenset()
) -> tuple[Status, bool]:
    """The module's status with this node's entry set, and whether that changes the stored one.

    A peer this node has lost keeps its last entry, marked unreachable: a dead node cannot say it
    stopped serving, and its stale PRIM must not make Ready look like two writers.
    """
    stored = module.status or Status()
    nodes = dict((stored.model_extra or {}).get("nodes") or {})
    before = dict(nodes)
    nodes[node] = entry
    for peer in lost & set(nodes) - {node}:
        nodes[peer] = {**nodes[peer], "reachable": False}
    changed = nodes != before
    status, cond_changed = status_with(
        stored, [ready_condition(module, nodes)], generation=module.metadata.generation, now=entry["since"]
    )
    return status.model_copy(update={"nodes": nodes}), changed or cond_changed


async def report(
    store: Store, module: Module, node: str, entry: dict[str, Any], *, lost: frozenset[str] = frozenset()
) -> None:
    """Write this node's entry if it changed; a conflict or an absent store waits for the next tick."""
    status, changed = desired_status(module, node, entry, lost=lost)
    if not changed:
        return
    try:
        await store.update_status("Module", module.name, status, resource_version=module.metadata.resource_version)
    except StoreError as exc:
        log.debug("Module status not written this tick. module=%s node=%s reason=%s", module.name, node, exc)
