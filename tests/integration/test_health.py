"""The health URL over real HTTP: 200 OK only while a fresh verdict says this node serves the module."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from controller.api.health import Verdicts
from controller.api.server import Api
from controller.store.embedded import EmbeddedStore


class FakeClock:
    """Virtual time for the verdicts' expiry: the test moves it, nothing sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[TestClient, Verdicts, FakeClock]]:
    clock = FakeClock()
    verdicts = Verdicts(clock=clock)
    store = await EmbeddedStore.open(tmp_path, node="node1")
    app = Api(store=store, node="node1", state_dir=str(tmp_path), verdicts=verdicts, liveness_bound=5).app()
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield client, verdicts, clock
    await store.close()


async def answer(client: TestClient, path: str, method: str = "GET") -> tuple[int, str]:
    response = await client.request(method, path)
    return response.status, await response.text()


async def test_the_health_url_is_200_only_where_the_module_is_served(
    served: tuple[TestClient, Verdicts, FakeClock],
) -> None:
    client, verdicts, _ = served
    assert await answer(client, "/health/notes") == (404, "NOT FOUND\n")
    verdicts.record("notes", serving=True, valid_for=3)
    assert await answer(client, "/health/notes") == (200, "OK\n")
    assert await answer(client, "/var/modules/notes/ready.txt") == (200, "OK\n")
    assert await answer(client, "/health/other") == (404, "NOT FOUND\n")
    assert await answer(client, "/health/notes", "HEAD") == (200, "")
    verdicts.record("notes", serving=False, valid_for=3)
    assert await answer(client, "/health/notes") == (404, "NOT FOUND\n")
    assert await answer(client, "/health/notes", "HEAD") == (404, "")


async def test_a_verdict_that_is_not_renewed_expires(served: tuple[TestClient, Verdicts, FakeClock]) -> None:
    client, verdicts, clock = served
    verdicts.record("notes", serving=True, valid_for=3)
    clock.now += 2.9
    assert (await answer(client, "/health/notes"))[0] == 200
    clock.now += 0.2
    assert (await answer(client, "/health/notes"))[0] == 404


async def test_liveness_says_when_the_loop_last_ran(served: tuple[TestClient, Verdicts, FakeClock]) -> None:
    client, verdicts, clock = served
    status, text = await answer(client, "/liveness")
    assert status == 503 and "never ran" in text
    verdicts.record("notes", serving=False, valid_for=3)
    assert (await answer(client, "/liveness"))[0] == 200
    clock.now += 6
    status, text = await answer(client, "/liveness")
    assert status == 503 and "last ran 6.0s ago" in text
