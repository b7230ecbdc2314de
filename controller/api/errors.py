"""Mapping store and validation errors to HTTP answers with a reason and a message."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from controller.apply import Rejected
from controller.store import AlreadyExists, Conflict, NotFound, StoreError, StoreUnavailable


class UnknownResourceType(StoreError):
    """The URL names a resource type Tandem does not have."""


_STATUS = [
    (UnknownResourceType, 404, "NotFound"),
    (NotFound, 404, "NotFound"),
    (AlreadyExists, 409, "AlreadyExists"),
    (Conflict, 409, "Conflict"),
    (StoreUnavailable, 503, "StoreUnavailable"),
    (Rejected, 422, "Invalid"),
    (StoreError, 400, "BadRequest"),
]


def error_response(status: int, reason: str, message: str, **details: Any) -> web.Response:
    body = {"error": {"reason": reason, "message": message, **details}}
    return web.json_response(body, status=status)


def response_for(exc: Exception) -> web.Response | None:
    for cls, status, reason in _STATUS:
        if isinstance(exc, cls):
            details: dict[str, Any] = {}
            if isinstance(exc, Rejected):
                details["problems"] = [
                    {"object": "/".join(f.key), "field": f.field, "message": f.message} for f in exc.findings
                ]
            return error_response(status, reason, str(exc), **details)
    return None


async def json_body(request: web.Request) -> Any:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": {"reason": "BadRequest", "message": f"request body is not JSON: {exc}"}}),
            content_type="application/json",
        ) from None
