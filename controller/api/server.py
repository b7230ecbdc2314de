"""The REST API the CLI and the console use, and the peer endpoint the embedded store syncs over."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web
from pydantic import ValidationError

from controller import apply as applying
from controller.api.errors import UnknownResourceType, error_response, json_body, response_for
from controller.api.health import Verdicts, health_routes
from controller.resources import KINDS, Resource, Status
from controller.store import NotFound, Store, StoreError

if TYPE_CHECKING:
    from controller.reconcile import Command

log = logging.getLogger("tandem.api")
PLURALS = {cls.PLURAL: cls for cls in KINDS.values()}
COMMANDS = ("start", "stop", "restart", "swap", "prim", "second", "failover-on", "failover-off")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class PeerEndpoint(Protocol):
    """The store's peer sync (controller.sync.PeerSync): answers another node's exchange."""

    async def handle(self, request: web.Request) -> web.Response: ...


class ModuleLoop(Protocol):
    """The reconcile loop (controller.reconcile.Reconciler), as the API sees it."""

    def snapshot(self) -> list[dict[str, Any]]: ...

    def command(self, module: str, command: Command) -> str: ...


class Api:
    """Routes of one node's daemon; state lives in the store, nothing here is cached."""

    def __init__(
        self,
        *,
        store: Store,
        node: str,
        state_dir: str,
        sync: PeerEndpoint | None = None,
        verdicts: Verdicts | None = None,
        liveness_bound: float = 30.0,
        reconciler: ModuleLoop | None = None,
    ) -> None:
        self.store = store
        self.node = node
        self.state_dir = state_dir
        self.sync = sync
        self.verdicts = verdicts or Verdicts()
        self.liveness_bound = liveness_bound
        self.reconciler = reconciler

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=16 * 1024 * 1024)
        app.add_routes(
            [
                web.get("/healthz", self.healthz),
                web.get("/api/v1", self.discovery),
                web.post("/api/v1/apply", self.apply),
                web.get("/api/v1/status", self.status),
                web.post("/api/v1/modules/{name}/commands", self.module_command),
                web.get("/api/v1/{plural}", self.list),
                web.post("/api/v1/{plural}", self.create),
                web.get("/api/v1/{plural}/{name}", self.get),
                web.put("/api/v1/{plural}/{name}", self.update),
                web.delete("/api/v1/{plural}/{name}", self.delete),
                web.put("/api/v1/{plural}/{name}/status", self.update_status),
            ]
        )
        app.add_routes(health_routes(self.verdicts, liveness_bound=self.liveness_bound))
        if self.sync is not None:
            app.add_routes([web.post("/peer/v1/sync", self.sync.handle)])
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except ValidationError as exc:
            problems = [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()]
            return error_response(422, "Invalid", _validation_summary(problems), problems=problems)
        except Exception as exc:
            response = response_for(exc)
            if response is not None:
                return response
            log.exception("Request failed with an internal error. method=%s path=%s", request.method, request.path)
            return error_response(500, "InternalError", f"{type(exc).__name__}: {exc}")

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "node": self.node})

    async def discovery(self, request: web.Request) -> web.Response:
        kinds = [{"kind": c.KIND, "plural": c.PLURAL, "shortNames": list(c.SHORT_NAMES)} for c in KINDS.values()]
        return web.json_response({"node": self.node, "kinds": kinds})

    async def status(self, request: web.Request) -> web.Response:
        """This node's live module states (the reconcile loop's, not the store's)."""
        modules = self.reconciler.snapshot() if self.reconciler is not None else []
        return web.json_response({"node": self.node, "modules": modules})

    async def module_command(self, request: web.Request) -> web.Response:
        """start, stop, restart, swap, prim or second for one module on this node."""
        body = await json_body(request)
        command = body.get("command") if isinstance(body, dict) else None
        if command not in COMMANDS:
            raise StoreError(f"unknown command {command!r}: expected one of {', '.join(COMMANDS)}")
        if self.reconciler is None:
            raise StoreError(f"node {self.node} runs no reconcile loop")
        try:
            message = self.reconciler.command(request.match_info["name"], command)  # checked against COMMANDS
        except KeyError as exc:
            raise NotFound("Module", request.match_info["name"]) from exc
        return web.json_response({"node": self.node, "message": message}, status=202)

    async def list(self, request: web.Request) -> web.Response:
        cls = _kind(request)
        items = [r.to_dict() for r in await self.store.list(cls.KIND)]
        return web.json_response({"kind": f"{cls.KIND}List", "items": items})

    async def get(self, request: web.Request) -> web.Response:
        cls = _kind(request)
        return web.json_response((await self.store.get(cls.KIND, request.match_info["name"])).to_dict())

    async def create(self, request: web.Request) -> web.Response:
        resource = await _body_resource(request, _kind(request))
        applied = await applying.apply(self.store, [resource], state_dir=self.state_dir, create_only=True)
        return web.json_response(applied[0].resource.to_dict(), status=201)

    async def update(self, request: web.Request) -> web.Response:
        cls = _kind(request)
        resource = await _body_resource(request, cls)
        _same_name(request, resource)
        await self.store.get(cls.KIND, resource.name)  # NotFound before anything else
        applied = await applying.apply(self.store, [resource], state_dir=self.state_dir)
        return web.json_response(applied[0].resource.to_dict())

    async def update_status(self, request: web.Request) -> web.Response:
        cls = _kind(request)
        body = await json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("status"), dict):
            raise StoreError('the body must be {"status": {...}} with an optional metadata.resourceVersion')
        status = Status.model_validate(body["status"])
        version = (body.get("metadata") or {}).get("resourceVersion")
        written = await self.store.update_status(cls.KIND, request.match_info["name"], status, resource_version=version)
        return web.json_response(written.to_dict())

    async def delete(self, request: web.Request) -> web.Response:
        cls = _kind(request)
        version = request.query.get("resourceVersion")
        deleted = await applying.delete(self.store, cls.KIND, request.match_info["name"], resource_version=version)
        return web.json_response(deleted.to_dict())

    async def apply(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        docs = body.get("items") if isinstance(body, dict) else None
        if not isinstance(docs, list):
            raise StoreError('the apply body must be {"items": [resource, ...]}')
        resources = [_parse(doc, i) for i, doc in enumerate(docs)]
        dry_run = request.query.get("dryRun", "").lower() in ("1", "true", "all")
        applied = await applying.apply(self.store, resources, state_dir=self.state_dir, dry_run=dry_run)
        results = [
            {
                "kind": a.resource.kind,
                "name": a.resource.name,
                "action": a.action,
                "resourceVersion": a.resource.metadata.resource_version,
            }
            for a in applied
        ]
        return web.json_response({"results": results, "dryRun": dry_run})


def _kind(request: web.Request) -> type[Resource]:
    plural = request.match_info["plural"]
    cls = PLURALS.get(plural)
    if cls is None:
        raise UnknownResourceType(f"unknown resource type {plural!r}: expected one of {', '.join(PLURALS)}")
    return cls


async def _body_resource(request: web.Request, cls: type[Resource]) -> Resource:
    body = await json_body(request)
    if not isinstance(body, dict) or body.get("kind", cls.KIND) != cls.KIND:
        raise StoreError(f"the body must be a {cls.KIND} resource")
    return cls.model_validate({"kind": cls.KIND, **body})


def _same_name(request: web.Request, resource: Resource) -> None:
    if resource.name != request.match_info["name"]:
        raise StoreError(f"the body names {resource.name!r} but the URL names {request.match_info['name']!r}")


def _parse(doc: Any, index: int) -> Resource:
    if not isinstance(doc, dict) or doc.get("kind") not in KINDS:
        kind = doc.get("kind") if isinstance(doc, dict) else None
        raise StoreError(f"item {index}: unknown kind {kind!r}: expected one of {', '.join(KINDS)}")
    return KINDS[doc["kind"]].model_validate(doc)


def _validation_summary(problems: list[dict[str, str]]) -> str:
    return "; ".join(f"{p['field']}: {p['message']}" for p in problems)
