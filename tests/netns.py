"""Throw-away network namespaces for tests: created per test, always deleted, never touching the host's links."""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pyroute2 import netns as pyroute2_netns


def ip(*args: str, netns: str | None = None) -> str:
    """Run the ip command (inside the namespace when given) and return its output; raise on failure."""
    return _iproute2("ip", args, netns)


def tc(*args: str, netns: str | None = None) -> str:
    """Run the tc command (inside the namespace when given) and return its output; raise on failure."""
    return _iproute2("tc", args, netns)


def _iproute2(tool: str, args: tuple[str, ...], netns: str | None) -> str:
    prefix = [tool, "-n", netns] if netns else [tool]
    done = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{tool} {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def ip_json(*args: str, netns: str) -> list[dict[str, Any]]:
    """The JSON output of an ip command inside the namespace."""
    result: list[dict[str, Any]] = json.loads(ip("-j", *args, netns=netns) or "[]")
    return result


@contextmanager
def namespace(prefix: str = "tandem-test") -> Iterator[str]:
    """A new, empty network namespace with a random name, deleted on exit whatever happened."""
    name = f"{prefix}-{secrets.token_hex(4)}"
    ip("netns", "add", name)
    try:
        ip("link", "set", "lo", "up", netns=name)
        yield name
    finally:
        ip("netns", "del", name)


@contextmanager
def inside(name: str) -> Iterator[None]:
    """Move this thread into the namespace, so every socket it opens lives there; back to the old one on exit."""
    pyroute2_netns.pushns(name)
    try:
        yield
    finally:
        pyroute2_netns.popns()
