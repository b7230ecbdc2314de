"""The CLI's client for a daemon's REST API: small, synchronous, with errors a user can act on."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

DEFAULT_SERVER = "http://127.0.0.1:9010"


class ClientError(Exception):
    """A request failed; the message is the one line the CLI prints."""

    def __init__(self, message: str, *, reason: str = "", problems: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.problems = problems or []


def server_url(explicit: str | None) -> str:
    return (explicit or os.environ.get("TANDEM_SERVER") or DEFAULT_SERVER).rstrip("/")


class Client:
    def __init__(self, server: str, *, timeout: float = 10.0) -> None:
        self.server = server
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None, query: dict[str, str] | None = None) -> Any:
        url = self.server + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise _api_error(exc) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ClientError(
                f"cannot reach tandemd at {self.server} ({reason}): is `tandem node run` running there? "
                "Point the CLI elsewhere with --server or TANDEM_SERVER."
            ) from None

    def get(self, path: str, **query: str) -> Any:
        return self.request("GET", path, query=query or None)


def _api_error(exc: urllib.error.HTTPError) -> ClientError:
    raw = exc.read()
    try:
        error = json.loads(raw)["error"]
        return ClientError(error["message"], reason=error.get("reason", ""), problems=error.get("problems"))
    except (ValueError, KeyError, TypeError):
        text = raw.decode(errors="replace").strip()[:200]
        return ClientError(f"HTTP {exc.code} from tandemd: {text or exc.reason}")
