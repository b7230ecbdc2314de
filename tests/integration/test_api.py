"""The daemon's REST API on a real aiohttp server over loopback, backed by the embedded store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from controller.api.server import Api
from controller.resources.manifests import load
from controller.store.embedded import EmbeddedStore

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient]:
    store = await EmbeddedStore.open(tmp_path, node="node1")
    app = Api(store=store, node="node1", state_dir=str(tmp_path)).app()
    async with TestClient(TestServer(app, host="127.0.0.1")) as test_client:
        yield test_client
    await store.close()


def examples() -> list[dict[str, Any]]:
    return [r.to_dict() for r in load([ROOT / "manifests"])]


async def apply(client: TestClient, items: list[dict[str, Any]], **query: str) -> Any:
    response = await client.post("/api/v1/apply", json={"items": items}, params=query)
    return response.status, await response.json()


async def test_healthz_and_discovery(client: TestClient) -> None:
    response = await client.get("/healthz")
    assert response.status == 200 and (await response.json())["node"] == "node1"
    kinds = (await (await client.get("/api/v1")).json())["kinds"]
    assert [k["plural"] for k in kinds] == ["clusters", "modules", "replicateddirs", "virtualips", "checkers"]


async def test_apply_reports_created_then_unchanged_then_configured(client: TestClient) -> None:
    items = examples()
    status, body = await apply(client, items)
    assert status == 200 and {r["action"] for r in body["results"]} == {"created"}
    status, body = await apply(client, items)
    assert {r["action"] for r in body["results"]} == {"unchanged"}
    module = next(i for i in items if i["kind"] == "Module" and i["metadata"]["name"] == "notes")
    module["spec"]["autoSwap"] = True
    status, body = await apply(client, [module])
    assert body["results"] == [
        {
            "kind": "Module",
            "name": "notes",
            "action": "configured",
            "resourceVersion": body["results"][0]["resourceVersion"],
        }
    ]
    got = await (await client.get("/api/v1/modules/notes")).json()
    assert got["spec"]["autoSwap"] is True and got["metadata"]["generation"] == 2


async def test_a_dry_run_writes_nothing(client: TestClient) -> None:
    status, body = await apply(client, examples(), dryRun="true")
    assert status == 200 and body["dryRun"] is True
    assert (await (await client.get("/api/v1/modules")).json())["items"] == []


async def test_an_inconsistent_apply_is_refused_whole(client: TestClient) -> None:
    await apply(client, examples())
    orphan = {
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "VirtualIP",
        "metadata": {"name": "orphan"},
        "spec": {"module": "nope", "address": "192.0.2.200/24"},
    }
    fine = {
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "VirtualIP",
        "metadata": {"name": "fine"},
        "spec": {"module": "notes", "address": "192.0.2.201/24"},
    }
    status, body = await apply(client, [fine, orphan])
    assert status == 422
    assert body["error"]["problems"] == [
        {"object": "VirtualIP/orphan", "field": "spec.module", "message": "Module 'nope' does not exist"}
    ]
    assert (await client.get("/api/v1/virtualips/fine")).status == 404


async def test_nested_replicated_dirs_against_the_stored_ones_are_refused(client: TestClient) -> None:
    await apply(client, examples())
    outer = {
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "ReplicatedDir",
        "metadata": {"name": "outer"},
        "spec": {"module": "notes", "path": "/var/lib"},
    }
    status, body = await apply(client, [outer])
    assert status == 422
    assert {p["object"] for p in body["error"]["problems"]} == {
        "ReplicatedDir/notes-data",
        "ReplicatedDir/postgresql-data",
    }


async def test_invalid_bodies_get_a_reason(client: TestClient) -> None:
    response = await client.post("/api/v1/apply", data=b"{not json")
    assert response.status == 400 and "not JSON" in (await response.json())["error"]["message"]
    bad = {
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "Module",
        "metadata": {"name": "m"},
        "spec": {"nodes": ["a", "b"], "colour": "red"},
    }
    status, body = await apply(client, [bad])
    assert status == 422 and body["error"]["problems"] == [
        {"field": "spec.colour", "message": "Extra inputs are not permitted"}
    ]
    response = await client.get("/api/v1/pods")
    assert response.status == 404 and "unknown resource type 'pods'" in (await response.json())["error"]["message"]


async def test_crud_with_optimistic_concurrency(client: TestClient) -> None:
    await apply(client, examples())
    current = await (await client.get("/api/v1/virtualips/notes-vip")).json()
    stale_version = current["metadata"]["resourceVersion"]
    current["spec"]["address"] = "192.0.2.150/24"
    response = await client.put("/api/v1/virtualips/notes-vip", json=current)
    assert response.status == 200
    current["spec"]["address"] = "192.0.2.151/24"
    current["metadata"]["resourceVersion"] = stale_version
    response = await client.put("/api/v1/virtualips/notes-vip", json=current)
    assert response.status == 409 and (await response.json())["error"]["reason"] == "Conflict"
    response = await client.post("/api/v1/virtualips", json=current)
    assert response.status == 409 and (await response.json())["error"]["reason"] == "AlreadyExists"


async def test_status_is_written_separately_and_keeps_generation(client: TestClient) -> None:
    await apply(client, examples())
    status = {"observedGeneration": 1, "conditions": [{"type": "Ready", "status": "False", "reason": "Starting"}]}
    response = await client.put("/api/v1/modules/notes/status", json={"status": status})
    body = await response.json()
    assert response.status == 200 and body["status"]["conditions"][0]["reason"] == "Starting"
    assert body["metadata"]["generation"] == 1


async def test_delete_refuses_while_others_depend_and_then_succeeds(client: TestClient) -> None:
    await apply(client, examples())
    response = await client.delete("/api/v1/modules/web")
    body = await response.json()
    assert response.status == 422
    assert body["error"]["message"].startswith(
        "cannot delete Module/web: Checker/web-http, Checker/web-needs-postgresql, VirtualIP/web-vip still depend"
    )
    dependents = (("checkers", "web-http"), ("checkers", "web-needs-postgresql"), ("virtualips", "web-vip"))
    for plural, name in (*dependents, ("modules", "web")):
        assert (await client.delete(f"/api/v1/{plural}/{name}")).status == 200
    assert (await client.get("/api/v1/modules/web")).status == 404
