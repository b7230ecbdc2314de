"""Two embedded stores merged by hand: a status write on a stale copy never loses a spec change."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from controller.resources import Module, Status
from controller.store.embedded import EmbeddedStore


def module(**spec: Any) -> Module:
    return Module.model_validate({"kind": "Module", "metadata": {"name": "web"}, "spec": {"nodes": ["a", "b"], **spec}})


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[tuple[EmbeddedStore, EmbeddedStore]]:
    one = await EmbeddedStore.open(tmp_path / "node1", node="node1")
    two = await EmbeddedStore.open(tmp_path / "node2", node="node2")
    try:
        yield one, two
    finally:
        await one.close()
        await two.close()


async def exchange(one: EmbeddedStore, two: EmbeddedStore) -> None:
    """One round of the peer link: two pushes to one, which answers with everything it holds."""
    await one.merge(await two.export())
    await two.merge(await one.export())


@pytest.mark.parametrize("first", ["node1", "node2"])
async def test_a_status_write_on_a_stale_copy_keeps_the_newer_spec(
    stores: tuple[EmbeddedStore, EmbeddedStore], first: str
) -> None:
    node1, node2 = stores
    await node1.create(module())
    await exchange(node2, node1)
    # node2 is cut off: node1 changes the spec once, node2 writes its status three times, so its
    # last status write is newer by version but was made on the old spec.
    await node1.update(module(autoSwap=True))
    for n in range(3):
        await node2.update_status("Module", "web", Status.model_validate({"nodes": {"node2": {"restarts": n}}}))
    assert int((await node2.get("Module", "web")).metadata.resource_version or 0) > int(
        (await node1.get("Module", "web")).metadata.resource_version or 0
    )
    await (exchange(node1, node2) if first == "node1" else exchange(node2, node1))
    await exchange(node1, node2)
    one, two = await node1.get("Module", "web"), await node2.get("Module", "web")
    assert one.to_dict() == two.to_dict()
    assert one.spec.auto_swap is True and one.metadata.generation == 2
    assert one.to_dict()["status"]["nodes"] == {"node2": {"restarts": 2}}


async def test_a_re_created_object_is_not_mixed_with_the_old_one(stores: tuple[EmbeddedStore, EmbeddedStore]) -> None:
    node1, node2 = stores
    await node1.create(module())
    await node1.update(module(autoSwap=True))  # generation 2
    await exchange(node2, node1)
    await node1.delete("Module", "web")
    await node1.create(module())  # generation 1 again: a new incarnation
    await exchange(node2, node1)
    one, two = await node1.get("Module", "web"), await node2.get("Module", "web")
    assert one.to_dict() == two.to_dict()
    assert one.metadata.generation == 1 and one.spec.auto_swap is False


async def test_a_store_from_before_the_created_column_opens_and_keeps_its_records(tmp_path: Path) -> None:
    old = sqlite3.connect(tmp_path / "store.sqlite")
    old.executescript(
        """
        CREATE TABLE records (kind TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL,
                              origin TEXT NOT NULL, body TEXT, PRIMARY KEY (kind, name));
        CREATE TABLE clock (id INTEGER PRIMARY KEY CHECK (id = 0), version INTEGER NOT NULL);
        INSERT INTO clock VALUES (0, 0);
        """
    )
    old.close()
    store = await EmbeddedStore.open(tmp_path, node="node1")
    try:
        await store.create(module())
        assert [r.created for r in await store.export()] == [1]
    finally:
        await store.close()
    again = await EmbeddedStore.open(tmp_path, node="node1")
    try:
        assert (await again.get("Module", "web")).metadata.generation == 1
    finally:
        await again.close()
