"""The Module's status: each node's entry, and Ready from all of them."""

from typing import Any

from controller.module_status import desired_status, ready_condition
from controller.resources import Module


def module(mode: str = "mirror", status: dict[str, Any] | None = None) -> Module:
    body: dict[str, Any] = {
        "kind": "Module",
        "metadata": {"name": "app", "generation": 2},
        "spec": {"mode": mode, "nodes": ["node1", "node2"]},
    }
    if status is not None:
        body["status"] = status
    return Module.model_validate(body)


def entry(state: str, serving: bool) -> dict[str, Any]:
    return {"state": state, "serving": serving, "reason": "R", "since": "2026-12-01T00:00:00Z", "replication": "none"}


def ready(nodes: dict[str, dict[str, Any]], mode: str = "mirror") -> tuple[str, str]:
    c = ready_condition(module(mode), nodes)
    return c.status, c.reason


def test_ready_is_true_only_with_a_primary_and_an_in_sync_secondary() -> None:
    assert ready({"node1": entry("PRIM", True), "node2": entry("SECOND", False)}) == ("True", "InSync")
    assert ready({"node1": entry("ALONE", True), "node2": entry("SECOND", False)}) == ("False", "PeerNotInSync")
    assert ready({"node1": entry("ALONE", True), "node2": entry("ALONE", True)}) == ("False", "BothServing")
    assert ready({"node1": entry("STOP", False), "node2": entry("STOP", False)}) == ("False", "Stopped")
    assert ready({"node1": entry("WAIT", False), "node2": entry("SECOND", False)}) == ("False", "NotServing")
    assert ready({"node1": entry("UP", True)}, mode="farm") == ("True", "Serving")


def test_a_lost_peers_stale_entry_is_marked_unreachable_and_does_not_count() -> None:
    stored = module(status={"nodes": {"node1": entry("PRIM", True), "node2": entry("SECOND", False)}})
    status, changed = desired_status(stored, "node2", entry("ALONE", True), lost=frozenset({"node1"}))
    nodes = status.model_extra["nodes"]
    assert changed and nodes["node1"]["reachable"] is False and nodes["node2"]["state"] == "ALONE"
    ready_now = next(c for c in status.conditions if c.type == "Ready")
    assert (ready_now.status, ready_now.reason) == ("False", "PeerNotInSync")
    assert status.observed_generation == 2


def test_nothing_to_write_when_nothing_changed() -> None:
    first, _ = desired_status(module(), "node1", entry("PRIM", True))
    stored = module(status=first.model_dump(by_alias=True))
    _, changed = desired_status(stored, "node1", entry("PRIM", True))
    assert not changed
