"""What only the etcd store has to get right: its URL, its key layout, prefixes, and an etcd that stops answering.

The behaviour both stores share is held by test_store_contract.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import aetcd
import pytest

from controller.resources import Module, Status
from controller.store.base import NotFound, Op, StoreError, StoreUnavailable, body_of
from controller.store.etcd import EtcdStore, parse_url
from tests.integration.etcd_server import LOOPBACK, EtcdServer, free_port

pytestmark = pytest.mark.etcd

TIMEOUT = 1.0


def module(name: str, nodes: tuple[str, str] = ("a", "b"), labels: dict[str, str] | None = None) -> Module:
    return Module.model_validate(
        {"kind": "Module", "metadata": {"name": name, "labels": labels or {}}, "spec": {"nodes": list(nodes)}}
    )


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


@pytest.fixture
async def store(etcd: EtcdServer, request: pytest.FixtureRequest) -> AsyncIterator[EtcdStore]:
    """A store under a prefix of its own, so tests sharing the server never see each other's objects."""
    opened = await EtcdStore.connect(f"{etcd.url}/{request.node.name}", timeout=TIMEOUT)
    yield opened
    await opened.close()


# --- URL ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "etcd://nohost-without-port",
        "http://127.0.0.1:2379",
        "etcd://:2379",
        "etcd://127.0.0.1:port",
        "etcd://127.0.0.1:99999",
        "127.0.0.1:2379",
    ],
)
async def test_a_malformed_url_is_refused_naming_it(url: str) -> None:
    with pytest.raises(StoreError, match="is not an etcd store URL") as caught:
        await EtcdStore.connect(url, timeout=TIMEOUT)
    assert repr(url) in str(caught.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("etcd://127.0.0.1:2379", ("127.0.0.1", 2379, "/tandem")),
        ("etcd://127.0.0.1:2379/", ("127.0.0.1", 2379, "/tandem")),
        ("etcd://localhost:23790/site-a/", ("localhost", 23790, "/site-a")),
        ("etcd://[::1]:2379/x/y", ("[::1]", 2379, "/x/y")),
    ],
)
def test_url_gives_host_port_and_prefix(url: str, expected: tuple[str, int, str]) -> None:
    assert parse_url(url) == expected


# --- layout and prefixes ----------------------------------------------------------------------------------


async def test_a_resource_is_its_json_document_at_its_key_and_the_mod_revision_its_version(etcd: EtcdServer) -> None:
    store = await EtcdStore.connect(f"{etcd.url}/layout", timeout=TIMEOUT)
    client = aetcd.Client(LOOPBACK, etcd.client_port, timeout=TIMEOUT)
    try:
        created = await store.create(module("web"))
        raw = await client.get(b"/layout/resources/Module/web")
        assert raw is not None
        assert created.metadata.resource_version == str(raw.mod_revision)
        document = json.loads(raw.value)
        assert document == body_of(created)
        assert "resourceVersion" not in document["metadata"]
    finally:
        await client.close()
        await store.close()


async def test_two_prefixes_on_one_server_do_not_see_each_other(etcd: EtcdServer) -> None:
    # "/team" is a string prefix of "/team2": the key layout must still keep them apart.
    one = await EtcdStore.connect(f"{etcd.url}/team", timeout=TIMEOUT)
    two = await EtcdStore.connect(f"{etcd.url}/team2", timeout=TIMEOUT)
    watching = two.watch()
    try:
        await one.create(module("web"))
        await one.create(module("db"))
        await two.create(module("web", nodes=("c", "d")))
        assert [r.name for r in await one.list()] == ["db", "web"]
        assert [r.name for r in await two.list()] == ["web"]
        assert (await two.get("Module", "web")).spec.nodes == ["c", "d"]
        with pytest.raises(NotFound):
            await two.get("Module", "db")
        assert (await anext(watching)).resource.name == "web"
        await one.delete("Module", "db")
        await two.create(module("cache"))
        # The next event two sees is its own create, not one's delete.
        event = await asyncio.wait_for(anext(watching), TIMEOUT)
        assert (event.type, event.resource.name) == ("ADDED", "cache")
    finally:
        await watching.aclose()
        await one.close()
        await two.close()


@pytest.fixture
def own_etcd() -> Iterator[EtcdServer]:
    """A server of the test's own, so pausing it cannot disturb other tests."""
    with EtcdServer() as server:
        yield server


async def test_a_paused_etcd_makes_every_call_raise_store_unavailable_then_recovers(own_etcd: EtcdServer) -> None:
    store = await EtcdStore.connect(own_etcd.url, timeout=TIMEOUT)
    try:
        created = await store.create(module("web"))
        own_etcd.pause()
        try:
            # Built one at a time: a call that fails the test must not leave the others never awaited.
            calls: list[tuple[str, Callable[[], Awaitable[object]]]] = [
                ("get", lambda: store.get("Module", "web")),
                ("list", lambda: store.list()),
                ("create", lambda: store.create(module("db"))),
                ("update", lambda: store.update(module("web", nodes=("c", "d")))),
                ("update_status", lambda: store.update_status("Module", "web", Status(observed_generation=1))),
                ("delete", lambda: store.delete("Module", "web")),
                ("commit", lambda: store.commit([Op("create", module("db"))])),
                ("watch", lambda: anext(store.watch())),
            ]
            for name, call in calls:
                try:
                    await asyncio.wait_for(call(), 5 * TIMEOUT)
                except StoreUnavailable as exc:
                    assert own_etcd.url in str(exc), (name, exc)
                else:
                    pytest.fail(f"{name} on a paused etcd returned instead of raising StoreUnavailable")
        finally:
            own_etcd.resume()
        assert await store.get("Module", "web") == created
    finally:
        await store.close()


async def test_an_etcd_nobody_listens_on_raises_store_unavailable() -> None:
    url = f"etcd://{LOOPBACK}:{free_port()}"
    store = await EtcdStore.connect(url, timeout=TIMEOUT)
    try:
        with pytest.raises(StoreUnavailable, match=url):
            await store.list()
    finally:
        await store.close()


@pytest.mark.slow
async def test_a_watch_on_an_etcd_that_froze_raises_store_unavailable(own_etcd: EtcdServer) -> None:
    store = await EtcdStore.connect(own_etcd.url, timeout=TIMEOUT)
    watching = store.watch()
    try:
        await store.create(module("web"))
        assert (await anext(watching)).type == "ADDED"
        own_etcd.pause()
        # gRPC keepalive pings an idle watch every 10 s and gives up one timeout after.
        with pytest.raises(StoreUnavailable, match=own_etcd.url):
            await asyncio.wait_for(anext(watching), 20 + 5 * TIMEOUT)
    finally:
        own_etcd.resume()
        await watching.aclose()
        await store.close()
