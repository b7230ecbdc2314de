"""Fixtures every test shares: a guard that fails a test on any unexpected warning or error log."""

from __future__ import annotations

import logging
import re
import subprocess
from collections.abc import Iterator

import pytest


class ExpectedLogs:
    """Patterns of WARNING-or-worse lines a test declares it expects; anything else fails the test."""

    def __init__(self) -> None:
        self.patterns: list[re.Pattern[str]] = []

    def expect(self, pattern: str) -> None:
        self.patterns.append(re.compile(pattern))

    def allows(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return any(p.search(message) for p in self.patterns)


@pytest.fixture
def expected_logs() -> ExpectedLogs:
    return ExpectedLogs()


@pytest.fixture(autouse=True)
def _no_unexpected_warnings(caplog: pytest.LogCaptureFixture, expected_logs: ExpectedLogs) -> Iterator[None]:
    caplog.set_level(logging.INFO)
    yield
    expected = expected_logs
    bad = [
        r
        for r in caplog.get_records("call")
        if r.levelno >= logging.WARNING
        and r.name.startswith(("tandem", "agent", "controller"))
        and not expected.allows(r)
    ]
    if bad:
        lines = "\n".join(f"{r.levelname} {r.name}: {r.getMessage()}" for r in bad)
        pytest.fail(f"unexpected warnings or errors were logged:\n{lines}", pytrace=False)


def _host_addresses() -> set[str]:
    out = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True, check=False).stdout
    return {" ".join(line.split()[1:4]) for line in out.splitlines()}


@pytest.fixture(scope="session", autouse=True)
def _host_network_untouched() -> Iterator[None]:
    """Daemons in tests run on this machine: none of them may leave an address on its real interfaces."""
    before = _host_addresses()
    yield
    added = _host_addresses() - before
    if added:
        pytest.fail(f"tests left addresses on this machine's own interfaces: {sorted(added)}", pytrace=False)
