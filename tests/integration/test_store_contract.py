"""One contract, every backend: the embedded store and a real etcd server pass the same tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.resources import Condition, Module, Resource, Status, VirtualIP
from controller.store import AlreadyExists, Conflict, NotFound, Op, Store, StoreError, WatchEvent
from controller.store.embedded import EmbeddedStore


def module(name: str = "web", **spec: Any) -> Module:
    return Module.model_validate({"kind": "Module", "metadata": {"name": name}, "spec": {"nodes": ["a", "b"], **spec}})


def vip(name: str = "web-vip", address: str = "192.0.2.10/24") -> VirtualIP:
    return VirtualIP.model_validate(
        {"kind": "VirtualIP", "metadata": {"name": name}, "spec": {"module": "web", "address": address}}
    )


def changed(resource: Resource, **meta: Any) -> Any:
    return resource.model_copy(update={"metadata": resource.metadata.model_copy(update=meta)})


@pytest.fixture(scope="module")
def etcd_url() -> Iterator[str]:
    from tests.integration.etcd_server import EtcdServer

    with EtcdServer() as server:
        yield server.url


@pytest.fixture(params=["embedded", pytest.param("etcd", marks=pytest.mark.etcd)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "embedded":
        backend: Store = await EmbeddedStore.open(tmp_path, node="node1")
    else:
        from controller.store.etcd import EtcdStore

        url = request.getfixturevalue("etcd_url")
        backend = await EtcdStore.connect(f"{url}/test-{request.node.name.split('[')[0][-40:]}-{id(tmp_path)}")
    try:
        yield backend
    finally:
        await backend.close()


async def test_create_then_get_and_list(store: Store) -> None:
    created = await store.create(module())
    assert created.metadata.generation == 1
    assert created.metadata.resource_version
    assert created.metadata.creation_timestamp
    got = await store.get("Module", "web")
    assert got.to_dict() == created.to_dict()
    await store.create(vip())
    assert [r.key for r in await store.list()] == [("Module", "web"), ("VirtualIP", "web-vip")]
    assert [r.key for r in await store.list("VirtualIP")] == [("VirtualIP", "web-vip")]


async def test_create_refuses_an_existing_object(store: Store) -> None:
    await store.create(module())
    with pytest.raises(AlreadyExists, match="Module/web already exists"):
        await store.create(module())


async def test_missing_objects_are_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match="Module/nope not found"):
        await store.get("Module", "nope")
    with pytest.raises(NotFound):
        await store.update(module("nope"))
    with pytest.raises(NotFound):
        await store.delete("Module", "nope")
    with pytest.raises(NotFound):
        await store.update_status("Module", "nope", Status())


async def test_every_write_gets_a_new_resource_version(store: Store) -> None:
    first = await store.create(module())
    second = await store.update(changed(module(), labels={"tier": "db"}))
    assert second.metadata.resource_version != first.metadata.resource_version
    assert second.metadata.creation_timestamp == first.metadata.creation_timestamp


async def test_a_stale_write_is_refused_with_a_clear_error(store: Store) -> None:
    first = await store.create(module())
    await store.update(changed(module(autoSwap=True), resource_version=first.metadata.resource_version))
    stale = changed(module(bootStart=True), resource_version=first.metadata.resource_version)
    with pytest.raises(Conflict, match=r"Module/web was changed by someone else .* read it again and retry"):
        await store.update(stale)
    with pytest.raises(Conflict):
        await store.delete("Module", "web", resource_version=first.metadata.resource_version)
    with pytest.raises(Conflict):
        await store.update_status("Module", "web", Status(), resource_version=first.metadata.resource_version)
    assert (await store.get("Module", "web")).spec.auto_swap is True  # the stale writes changed nothing


async def test_generation_grows_on_spec_changes_only(store: Store) -> None:
    await store.create(module())
    relabelled = await store.update(changed(module(), labels={"a": "b"}, annotations={"c": "d"}))
    assert relabelled.metadata.generation == 1
    respecced = await store.update(module(bootStart=True))
    assert respecced.metadata.generation == 2
    same = await store.update(module(bootStart=True))
    assert same.metadata.generation == 2


async def test_status_updates_keep_spec_and_generation_and_updates_keep_status(store: Store) -> None:
    await store.create(module())
    await store.update(module(bootStart=True))
    ready = Condition(
        type="Ready", status="True", reason="InSync", message="ok", lastTransitionTime="2026-01-01T00:00:00Z"
    )
    written = await store.update_status("Module", "web", Status(observedGeneration=2, conditions=[ready]))
    assert written.metadata.generation == 2
    assert written.spec.boot_start is True
    assert written.status is not None and written.status.conditions[0].reason == "InSync"
    after = await store.update(module(bootStart=True, autoSwap=True))
    assert after.metadata.generation == 3
    assert after.status is not None and after.status.observed_generation == 2
    created = await store.create(changed(vip(), labels={}).model_copy(update={"status": Status(observedGeneration=9)}))
    assert created.status is None  # a create never takes status from the client


async def test_delete_returns_the_object_and_it_is_gone(store: Store) -> None:
    created = await store.create(module())
    deleted = await store.delete("Module", "web", resource_version=created.metadata.resource_version)
    assert deleted.name == "web"
    with pytest.raises(NotFound):
        await store.get("Module", "web")
    again = await store.create(module())
    assert again.metadata.generation == 1


async def test_commit_is_all_or_nothing(store: Store) -> None:
    await store.create(vip("taken"))
    with pytest.raises(AlreadyExists):
        await store.commit([Op("create", module()), Op("create", vip("fresh")), Op("create", vip("taken"))])
    assert [r.key for r in await store.list()] == [("VirtualIP", "taken")]
    written = await store.commit([Op("create", module()), Op("update", vip("taken", "192.0.2.20/24"))])
    assert [r.key for r in written] == [("Module", "web"), ("VirtualIP", "taken")]
    assert (await store.get("VirtualIP", "taken")).spec.address == "192.0.2.20/24"


async def test_a_batch_names_each_object_once_and_is_bounded(store: Store) -> None:
    with pytest.raises(StoreError, match="Module/web more than once"):
        await store.commit([Op("create", module()), Op("update", module(bootStart=True))])
    with pytest.raises(StoreError, match="at most 128"):
        await store.commit([Op("create", vip(f"v{i}", f"192.0.2.{i % 250}/24")) for i in range(129)])
    assert await store.list() == []


async def test_unconditional_writes_never_lose_a_concurrent_write(store: Store) -> None:
    """update keeps the stored status and update_status the stored spec, even when they race."""
    await store.create(module())
    rounds = 40

    async def relabel() -> None:
        for i in range(rounds):
            await store.update(changed(module(), labels={"round": str(i)}))

    async def report() -> None:
        for i in range(rounds):
            await store.update_status("Module", "web", Status(observedGeneration=i))

    await asyncio.gather(relabel(), report())
    final = await store.get("Module", "web")
    assert final.metadata.labels == {"round": str(rounds - 1)}
    assert final.status is not None and final.status.observed_generation == rounds - 1


async def next_event(events: AsyncIterator[WatchEvent]) -> WatchEvent:
    return await asyncio.wait_for(anext(events), timeout=10)


async def test_watch_lists_existing_objects_then_follows_changes_in_order(store: Store) -> None:
    await store.create(module())
    events = store.watch()
    try:
        first = await next_event(events)
        assert (first.type, first.resource.key) == ("ADDED", ("Module", "web"))
        await store.create(vip())
        await store.update(module(bootStart=True))
        await store.update_status("Module", "web", Status(observedGeneration=2))
        await store.delete("VirtualIP", "web-vip")
        seen = [await next_event(events) for _ in range(4)]
        assert [(e.type, e.resource.key) for e in seen] == [
            ("ADDED", ("VirtualIP", "web-vip")),
            ("MODIFIED", ("Module", "web")),
            ("MODIFIED", ("Module", "web")),
            ("DELETED", ("VirtualIP", "web-vip")),
        ]
        assert seen[1].resource.spec.boot_start is True
        assert seen[2].resource.status is not None and seen[2].resource.status.observed_generation == 2
        assert (
            seen[2].resource.metadata.resource_version == (await store.get("Module", "web")).metadata.resource_version
        )
    finally:
        await events.aclose()


async def test_watch_of_one_kind_sees_only_that_kind(store: Store) -> None:
    events = store.watch("VirtualIP")
    try:
        task = asyncio.ensure_future(next_event(events))
        await asyncio.sleep(0.2)  # let the watch start before the writes
        await store.create(module())
        await store.create(vip())
        event = await task
        assert (event.type, event.resource.key) == ("ADDED", ("VirtualIP", "web-vip"))
    finally:
        await events.aclose()
