"""The HTTP API of ``hutch serve``: one :class:`hutch.Runtime` over REST, WebSocket and SSE.

:func:`create_app` builds the FastAPI application; :mod:`hutch.server.serve` runs it under uvicorn.
Every endpoint and body is in ``docs/API.md`` and ``/openapi.json``. Errors are always
``{"error": {"type", "message", "hint"}}`` with the status of the error class
(:func:`hutch.errors.status_table`): request bodies of the wrong shape are 400 ``BadRequestError``,
a missing box 404 ``NotFoundError``, an unexpected exception 500 ``InternalError`` (logged), a
request body over :data:`~hutch.server.wire.MAX_BODY` 400 ``BadRequestError`` (:class:`BodyLimit`).
CORS is off: there is no CORS middleware, so browsers refuse cross-origin calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hutch import errors
from hutch.box import Box
from hutch.errors import BadRequestError, HutchError, InternalError, NotFoundError
from hutch.images.reference import ImageReference
from hutch.images.store import ImageRecord, ImageStore
from hutch.runtime.metrics import BoxMetrics, RuntimeMetrics
from hutch.runtime.options import BoxOptions, Port, Volume
from hutch.runtime.pool import PoolStatus
from hutch.runtime.runtime import Runtime
from hutch.server.auth import BearerAuth
from hutch.server.files_routes import MAX_FILE, files_routes, is_upload
from hutch.server.models import (
    BoxCreate,
    BoxInfo,
    CloneRequest,
    ErrorBody,
    ExecRequest,
    ExecResultModel,
    ForkRequest,
    Health,
    ImageInfo,
    ImageRemoved,
    PoolRequest,
    PoolStatusModel,
    PullRequest,
    SnapshotInfo,
    SnapshotRequest,
    Version,
)
from hutch.server.streams import (
    SseResponse,
    WsExec,
    run_buffered,
    spawn,
    stdin_bytes,
)
from hutch.server.wire import (
    API_VERSION,
    MAX_BODY,
    error_body,
    error_status,
    record_to_json,
    result_to_json,
    snapshot_to_json,
)

log = logging.getLogger("hutch.server")

#: Documented error answers of every endpoint (for /openapi.json).
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": ", ".join(sorted(names))}
    for status, names in (
        (s, [n for n, v in errors.status_table().items() if v == s])
        for s in sorted(set(errors.status_table().values()))
    )
}


def error_response(e: HutchError) -> JSONResponse:
    return JSONResponse(error_body(e), status_code=error_status(e))


class HutchRoute(APIRoute):
    """Turns an unexpected exception of a handler into a logged 500 ``InternalError`` answer
    (FastAPI's own validation errors and hutch errors go to the app's exception handlers)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except (HutchError, RequestValidationError, StarletteHTTPException):
                raise
            except Exception as e:
                log.exception("internal error in %s %s", request.method, request.url.path)
                return error_response(InternalError(f"{type(e).__name__}: {e}"))

        return guarded


def _image_info(rec: ImageRecord) -> dict[str, Any]:
    cfg = rec.config
    return {
        "id": rec.id,
        "references": list(rec.references),
        "source": rec.source,
        "platform": rec.platform,
        "size": rec.size,
        "base_size": rec.base_size,
        "allocated": rec.allocated,
        "added": rec.added,
        "manifest_digest": rec.manifest_digest,
        "index_digest": rec.index_digest,
        "config": {
            "architecture": cfg.architecture,
            "os": cfg.os,
            "entrypoint": list(cfg.entrypoint),
            "cmd": list(cfg.cmd),
            "env": [f"{k}={v}" for k, v in cfg.env],
            "working_dir": cfg.working_dir,
            "user": cfg.user,
            "created": cfg.created,
        },
        "layers": [dataclasses.asdict(layer) for layer in rec.layers],
    }


_OPTION_FIELDS = frozenset(f.name for f in dataclasses.fields(BoxOptions))


def options_from_body(data: dict[str, Any]) -> BoxOptions:
    """BoxOptions from request JSON, with every rule checked (host-dependent ones included)."""
    kwargs = dict(data)
    unknown = sorted(set(kwargs) - _OPTION_FIELDS)
    if unknown:  # the request model and hutch.BoxOptions disagree: a 400, not a TypeError
        raise BadRequestError(f"unknown box option(s): {', '.join(unknown)}")
    if "ports" in kwargs:
        kwargs["ports"] = tuple(Port(**p) for p in kwargs["ports"])
    if "volumes" in kwargs:
        kwargs["volumes"] = tuple(Volume(**v) for v in kwargs["volumes"])
    return BoxOptions(**kwargs)


def clone_overrides(data: dict[str, Any]) -> dict[str, Any]:
    """Request JSON as keyword arguments of ``Runtime.create(snapshot=…)``: its rules decide
    which options a box made from a snapshot may set (ConfigError naming the field)."""
    kwargs = dict(data)
    if "ports" in kwargs:
        kwargs["ports"] = tuple(Port(**p) for p in kwargs["ports"])
    if "volumes" in kwargs:
        kwargs["volumes"] = tuple(Volume(**v) for v in kwargs["volumes"])
    return kwargs


def _states(state: list[str] | None) -> list[str] | None:
    if not state:
        return None
    out = [s.strip() for item in state for s in item.split(",") if s.strip()]
    return out or None


#: Bytes of an oversized body the server still reads (and drops) before it answers, so that a
#: client still sending gets the 400 instead of a broken pipe; past that the connection is closed.
DRAIN_LIMIT = 64 << 20


class BodyLimit:
    """ASGI middleware: an HTTP request body over ``max_bytes`` is a 400 ``BadRequestError``.

    A ``Content-Length`` over the limit is refused before the application runs; a chunked body is
    read (at most ``max_bytes``) before the application runs and handed to it whole. Either way
    the rest of an oversized body is read and dropped (up to :data:`DRAIN_LIMIT`), so nothing is
    buffered beyond the limit and the client, still sending, reads the answer."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def too_large(self, size: int | None) -> BadRequestError:
        what = f"{size} bytes" if size is not None else "more bytes"
        return BadRequestError(
            f"the request body has {what}; the limit is {self.max_bytes} bytes",
            hint="Send large stdin through a streamed exec (box.spawn(), the WebSocket "
            "endpoint …/exec/ws), which has no size limit.",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_upload(scope):  # uploads have their own limit
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        try:
            declared: int | None = int(headers[b"content-length"])
        except (KeyError, ValueError):
            declared = None
        if declared is not None and declared > self.max_bytes:
            await _drain(receive, DRAIN_LIMIT)
            await error_response(self.too_large(declared))(scope, receive, send)
            return
        if declared is not None or b"transfer-encoding" not in headers:
            await self.app(scope, receive, send)  # the HTTP parser holds it to Content-Length
            return
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                await self.app(scope, _replay([message], receive), send)
                return
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.max_bytes:
                if message.get("more_body", False):
                    await _drain(receive, DRAIN_LIMIT)
                await error_response(self.too_large(None))(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(parts), "more_body": False}
        await self.app(scope, _replay([body], receive), send)


async def _drain(receive: Receive, limit: int) -> None:
    """Read and drop the rest of a request body (at most ``limit`` bytes)."""
    dropped = 0
    while dropped <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        dropped += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """``receive`` that first gives ``messages``, then the real ones (e.g. http.disconnect)."""
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


def create_app(
    runtime: Runtime, *, token: str | None, max_body: int = MAX_BODY, max_file: int = MAX_FILE
) -> FastAPI:
    """The API over ``runtime`` (already open, or opened on first use). With ``token``, every
    request but ``GET /health`` needs ``Authorization: Bearer <token>``. Request bodies are
    limited to ``max_body`` bytes (:class:`BodyLimit`), file uploads to ``max_file``."""
    from hutch import __version__

    app = FastAPI(
        title="hutch",
        version=__version__,
        description="Micro-VM sandboxes: boxes, commands, images. See docs/API.md.",
        docs_url=None,  # the interactive pages load scripts from a CDN: not for a local daemon
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.router.route_class = HutchRoute
    app.state.runtime = runtime
    _install_error_handlers(app)
    router = APIRouter(route_class=HutchRoute, responses=ERRORS)
    _meta_routes(router, runtime)
    _box_routes(router, runtime)
    _exec_routes(router, runtime)
    _snapshot_routes(router, runtime)
    _pool_routes(router, runtime)
    _image_routes(router, runtime)
    files_routes(router, runtime, max_file=max_file)
    app.include_router(router)
    app.add_middleware(BodyLimit, max_bytes=max_body)
    if token is not None:  # added last, so it runs first: no token, no body read
        app.add_middleware(BearerAuth, token=token)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    async def on_hutch_error(request: Request, e: Exception) -> Response:
        assert isinstance(e, HutchError)
        return error_response(e)

    async def on_validation_error(request: Request, e: Exception) -> Response:
        assert isinstance(e, RequestValidationError)
        parts = []
        for err in e.errors():
            where = ".".join(str(p) for p in err.get("loc", ())) or "request"
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return error_response(BadRequestError("invalid request: " + "; ".join(parts)))

    async def on_http_error(request: Request, e: Exception) -> Response:
        assert isinstance(e, StarletteHTTPException)
        cls: type[HutchError]
        if e.status_code == 404:
            cls = NotFoundError
            message = f"no endpoint {request.method} {request.url.path}"
        elif e.status_code == 401:
            cls, message = errors.UnauthorizedError, str(e.detail)
        elif e.status_code < 500:
            cls, message = BadRequestError, f"{e.detail} ({request.method} {request.url.path})"
        else:
            cls, message = InternalError, str(e.detail)
        body = error_body(cls(message, hint="See docs/API.md or /openapi.json for the endpoints."))
        return JSONResponse(body, status_code=e.status_code, headers=e.headers)

    app.add_exception_handler(HutchError, on_hutch_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)


# --- meta -----------------------------------------------------------------------------------
def _meta_routes(router: APIRouter, rt: Runtime) -> None:
    from hutch import __version__

    @router.get("/health", response_model=Health, tags=["meta"])
    async def health() -> dict[str, str]:
        """Liveness: answers without a token."""
        return {"status": "ok"}

    @router.get("/v1/version", response_model=Version, tags=["meta"])
    async def version() -> dict[str, Any]:
        return {
            "version": __version__,
            "api": API_VERSION,
            "pid": os.getpid(),
            "home": str(rt.paths.home),
        }

    @router.get("/v1/metrics", response_model=RuntimeMetrics, tags=["metrics"])
    async def runtime_metrics() -> RuntimeMetrics:
        """Counters of the boxes this server created, and how many boxes run in the home."""
        return await rt.metrics()

    @router.get(
        "/metrics",
        response_class=PlainTextResponse,
        tags=["metrics"],
        responses={200: {"content": {"text/plain": {}}}},
    )
    async def prometheus() -> PlainTextResponse:
        """The runtime metrics in Prometheus' text format (version 0.0.4)."""
        return PlainTextResponse(
            prometheus_text(await rt.metrics(), await rt.pool_status()),
            media_type="text/plain; version=0.0.4; charset=utf-8",
        )


#: (name, type, help, RuntimeMetrics field)
PROMETHEUS = (
    ("hutch_boxes_created_total", "counter", "Boxes this server created.", "boxes_created"),
    (
        "hutch_boxes_failed_total",
        "counter",
        "Boxes of this server that failed to start or failed while running.",
        "boxes_failed",
    ),
    ("hutch_boxes_running", "gauge", "Boxes running in the hutch home (all processes).", "running"),
    ("hutch_commands_total", "counter", "Commands started in this server's boxes.", "commands"),
    (
        "hutch_command_errors_total",
        "counter",
        "exec/spawn calls of this server's boxes that failed.",
        "errors",
    ),
)


#: (name, type, help, PoolStatus field): one sample per warm pool, labelled by its machine.
PROMETHEUS_POOL = (
    ("hutch_pool_size", "gauge", "Ready boxes a warm pool keeps.", "size"),
    ("hutch_pool_ready", "gauge", "Boxes of a warm pool ready to be handed out.", "ready"),
    ("hutch_pool_restoring", "gauge", "Boxes of a warm pool being restored.", "restoring"),
    (
        "hutch_pool_handed_out_total",
        "counter",
        "Boxes a warm pool handed out to create.",
        "handed_out",
    ),
    (
        "hutch_pool_misses_total",
        "counter",
        "Creates that matched a warm pool with no ready box.",
        "misses",
    ),
    ("hutch_pool_restores_total", "counter", "Boxes restored into a warm pool.", "restores"),
    (
        "hutch_pool_failures_total",
        "counter",
        "Failed restores (or seed boots) of a warm pool.",
        "failures",
    ),
)


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(m: RuntimeMetrics, pools: Sequence[PoolStatus] = ()) -> str:
    """Hand-formatted exposition text: a few numbers do not need a metrics library. The pool
    families appear only while the server has warm pools."""
    lines = []
    for name, kind, help_text, field in PROMETHEUS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        lines.append(f"{name} {getattr(m, field)}")
    if pools:
        for name, kind, help_text, field in PROMETHEUS_POOL:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            for p in pools:
                labels = (
                    f'image="{_label(p.image)}",cpus="{p.cpus}",'
                    f'memory_mib="{p.memory_mib}",accel="{_label(p.accel)}"'
                )
                lines.append(f"{name}{{{labels}}} {getattr(p, field)}")
    return "\n".join(lines) + "\n"


# --- boxes ----------------------------------------------------------------------------------
async def _info(rt: Runtime, box: Box) -> dict[str, Any]:
    rec = await asyncio.to_thread(rt.store.get, box.id)
    return record_to_json(rec)


def _box_routes(router: APIRouter, rt: Runtime) -> None:
    @router.post("/v1/boxes", status_code=201, response_model=BoxInfo, tags=["boxes"])
    async def create_box(body: BoxCreate) -> dict[str, Any]:
        """Create a box (not started unless ``start`` is true). 409 if the name is taken. With
        ``snapshot``, the box is made from that snapshot: its start restores it."""
        data = body.model_dump(exclude_unset=True)
        start = data.pop("start", False)
        snapshot = data.pop("snapshot", None)
        if snapshot is not None:
            box = await rt.create(snapshot=snapshot, **clone_overrides(data))
        else:
            box = await rt.create(options_from_body(data))
        if start:
            try:
                await box.start()
            except BaseException:
                with contextlib.suppress(HutchError):
                    await asyncio.shield(rt.remove(box.id, force=True))
                raise
        return await _info(rt, box)

    @router.get("/v1/boxes", response_model=list[BoxInfo], tags=["boxes"])
    async def list_boxes(
        state: Annotated[
            list[str] | None,
            Query(description="Only boxes in these states (repeat it, or a comma list)"),
        ] = None,
    ) -> list[dict[str, Any]]:
        """Every box of the home (all processes), oldest first."""
        return [record_to_json(r) for r in await rt.list(_states(state))]

    @router.get("/v1/boxes/{id_or_name}", response_model=BoxInfo, tags=["boxes"])
    async def get_box(id_or_name: str) -> dict[str, Any]:
        """By id, unique id prefix or name."""
        return await _info(rt, await rt.get(id_or_name))

    @router.post("/v1/boxes/{id_or_name}/start", response_model=BoxInfo, tags=["boxes"])
    async def start_box(id_or_name: str) -> dict[str, Any]:
        """Boot the box (waits until its agent answers). The box then belongs to this server."""
        box = await rt.get(id_or_name)
        await box.start()
        return await _info(rt, box)

    @router.post("/v1/boxes/{id_or_name}/stop", response_model=BoxInfo, tags=["boxes"])
    async def stop_box(id_or_name: str) -> dict[str, Any]:
        """Shut the guest down; the disk is kept."""
        box = await rt.get(id_or_name)
        await box.stop()
        return await _info(rt, box)

    @router.delete("/v1/boxes/{id_or_name}", status_code=204, tags=["boxes"])
    async def remove_box(id_or_name: str, force: bool = False) -> Response:
        """Delete the box, its disk and record. A running box needs ``force=true``."""
        await rt.remove(id_or_name, force=force)
        return Response(status_code=204)

    @router.get("/v1/boxes/{id_or_name}/metrics", response_model=BoxMetrics, tags=["metrics"])
    async def box_metrics(id_or_name: str) -> BoxMetrics:
        """Counters, timings, QEMU's CPU and memory, and the guest's memory use."""
        box = await rt.get(id_or_name)
        return await box.metrics()


# --- snapshots, clones and forks -----------------------------------------------------------
def _snapshot_routes(router: APIRouter, rt: Runtime) -> None:
    @router.post(
        "/v1/boxes/{id_or_name}/snapshot",
        status_code=201,
        response_model=SnapshotInfo,
        tags=["snapshots"],
    )
    async def snapshot_box(id_or_name: str, body: SnapshotRequest | None = None) -> dict[str, Any]:
        """Freeze a running box (RAM, device state, disk) into a snapshot; the box runs on.
        409 if the box is not running here, or the name is taken."""
        box = await rt.get(id_or_name)
        snap = await box.snapshot(name=body.name if body is not None else None)
        return snapshot_to_json(snap, users=[])

    @router.post(
        "/v1/boxes/{id_or_name}/clone", status_code=201, response_model=BoxInfo, tags=["snapshots"]
    )
    async def clone_box(id_or_name: str, body: CloneRequest | None = None) -> dict[str, Any]:
        """A running copy of a running box (a snapshot, restored as a new box; the snapshot goes
        with its last clone). The clone belongs to this server."""
        box = await rt.get(id_or_name)
        clone = await box.clone(name=body.name if body is not None else None)
        return await _info(rt, clone)

    @router.post(
        "/v1/boxes/{id_or_name}/fork",
        status_code=201,
        response_model=list[BoxInfo],
        tags=["snapshots"],
    )
    async def fork_box(id_or_name: str, body: ForkRequest) -> list[dict[str, Any]]:
        """``n`` running copies of a running box from one snapshot, restored concurrently; if
        one fails, all are removed and the error is the answer."""
        box = await rt.get(id_or_name)
        clones = await box.fork(body.n, names=body.names)
        return [await _info(rt, c) for c in clones]

    @router.get("/v1/snapshots", response_model=list[SnapshotInfo], tags=["snapshots"])
    async def list_snapshots() -> list[dict[str, Any]]:
        """Every snapshot of the home (all processes), oldest first, with the boxes using it."""
        snaps = await rt.snapshots()

        def with_users() -> list[dict[str, Any]]:
            return [snapshot_to_json(s, rt.store.snapshot_users(s.id)) for s in snaps]

        return await asyncio.to_thread(with_users)

    @router.get("/v1/snapshots/{id_or_name}", response_model=SnapshotInfo, tags=["snapshots"])
    async def get_snapshot(id_or_name: str) -> dict[str, Any]:
        """By id, unique id prefix or name; ``users`` are the ids of the boxes made from it."""
        snap = await rt.get_snapshot(id_or_name)
        users = await asyncio.to_thread(rt.store.snapshot_users, snap.id)
        return snapshot_to_json(snap, users)

    @router.delete("/v1/snapshots/{id_or_name}", status_code=204, tags=["snapshots"])
    async def remove_snapshot(id_or_name: str) -> Response:
        """Delete a snapshot and its files; 409 while boxes made from it exist."""
        await rt.remove_snapshot(id_or_name)
        return Response(status_code=204)


# --- exec -----------------------------------------------------------------------------------
# --- warm pools -----------------------------------------------------------------------------
def _pool_routes(router: APIRouter, rt: Runtime) -> None:
    @router.get("/v1/pools", response_model=list[PoolStatusModel], tags=["pools"])
    async def list_pools() -> list[dict[str, Any]]:
        """The server's warm pools: size, ready and restoring boxes, counters, last failure."""
        return [dataclasses.asdict(p) for p in await rt.pool_status()]

    @router.put("/v1/pools", response_model=PoolStatusModel, tags=["pools"])
    async def configure_pool(body: PoolRequest) -> dict[str, Any]:
        """Create, resize or (``size`` 0) drain and remove the pool of (image, cpus, memory_mib,
        accel); it fills in the background. Answers its status now."""
        status = await rt.configure_pool(
            body.image,
            cpus=body.cpus,
            memory_mib=body.memory_mib,
            accel=body.accel,
            size=body.size,
        )
        return dataclasses.asdict(status)

    @router.post("/v1/pools/wait", status_code=204, tags=["pools"])
    async def wait_pools(timeout: Annotated[float | None, Query(gt=0)] = None) -> Response:
        """Wait until every warm pool holds its size of ready boxes (408 ``TimeoutError``
        naming the pool and its last failure after ``timeout`` seconds; none: no limit)."""
        await rt.wait_pool(timeout)
        return Response(status_code=204)


def _exec_routes(router: APIRouter, rt: Runtime) -> None:
    @router.post("/v1/boxes/{id_or_name}/exec", response_model=ExecResultModel, tags=["exec"])
    async def exec_buffered(id_or_name: str, body: ExecRequest, request: Request) -> Any:
        """Run a command to completion. Output is base64 (``stdout_b64``/``stderr_b64``). If the
        client goes away first, the process is killed."""
        box = await rt.get(id_or_name)
        result = await run_buffered(box, body, request.receive)
        if result is None:
            return Response(status_code=499)  # nobody is listening any more
        return result_to_json(result)

    @router.post(
        "/v1/boxes/{id_or_name}/exec/sse",
        tags=["exec"],
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def exec_sse(id_or_name: str, body: ExecRequest) -> StreamingResponse:
        """Stream a command's output as Server-Sent Events: ``started`` ({"pid"}), ``stdout`` and
        ``stderr`` (base64 chunks), then ``exit`` (the result without output) or ``error``."""
        box = await rt.get(id_or_name)
        data = stdin_bytes(body)
        execution = await spawn(box, body, stdin=data is not None)
        return SseResponse(box, execution, data)

    @router.websocket("/v1/boxes/{id_or_name}/exec/ws")
    async def exec_ws(websocket: WebSocket, id_or_name: str) -> None:
        """Interactive stream: see docs/API.md (not in OpenAPI, which has no WebSockets)."""
        try:
            box = await rt.get(id_or_name)
        except HutchError as e:
            await _deny(websocket, e)
            return
        except Exception as e:
            log.exception("internal error opening a stream on %s", id_or_name)
            await _deny(websocket, InternalError(f"{type(e).__name__}: {e}"))
            return
        await websocket.accept()
        await WsExec(websocket, box).run()


async def _deny(ws: WebSocket, e: HutchError) -> None:
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(error_response(e))
    else:  # pragma: no cover - uvicorn supports denial responses
        await ws.close(1008, e.message[:120])


# --- images ---------------------------------------------------------------------------------
def _image_routes(router: APIRouter, rt: Runtime) -> None:
    def store() -> ImageStore:
        return ImageStore(rt.paths)

    @router.get("/v1/images", response_model=list[ImageInfo], tags=["images"])
    async def list_images() -> list[dict[str, Any]]:
        """The local image store, newest first."""
        return [_image_info(r) for r in await asyncio.to_thread(store().list)]

    @router.delete("/v1/images/{ref:path}", response_model=ImageRemoved, tags=["images"])
    async def remove_image(ref: str, force: bool = False) -> dict[str, Any]:
        """Remove a name; the image is deleted with its last name (409 while boxes use it,
        unless ``force=true``). ``ref`` is a name (it may contain ``/``, ``:`` and ``@``) or an
        image id."""
        done = await asyncio.to_thread(store().remove, ref, force=force)
        return {"done": done}

    @router.post(
        "/v1/images/pull",
        tags=["images"],
        response_class=StreamingResponse,
        responses={200: {"content": {"application/x-ndjson": {}}}},
    )
    async def pull_image(body: PullRequest) -> StreamingResponse:
        """Pull into the local store, streaming progress as NDJSON lines (``PullEventModel``):
        ``status`` and ``layer`` events, then ``done`` (with the image) or ``error``."""
        ImageReference.parse(body.reference)  # a bad reference is a 400 before streaming
        return StreamingResponse(_pull_lines(rt, body), media_type="application/x-ndjson")


async def _pull_lines(rt: Runtime, body: PullRequest) -> AsyncIterator[bytes]:
    from hutch.images.pull import PullEvent, pull

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[PullEvent] = asyncio.Queue()

    def progress(ev: PullEvent) -> None:  # called from the loop and from worker threads
        loop.call_soon_threadsafe(queue.put_nowait, ev)

    def line(d: dict[str, Any]) -> bytes:
        return (json.dumps(d) + "\n").encode()

    task = asyncio.create_task(
        pull(body.reference, paths=rt.paths, platform=body.platform, progress=progress)
    )

    def event_line(ev: PullEvent) -> bytes:
        return line(
            {
                "type": ev.kind,
                "message": ev.message,
                "digest": ev.digest,
                "done": ev.done,
                "total": ev.total,
            }
        )

    try:
        while True:
            getter = asyncio.create_task(queue.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                break
            yield event_line(getter.result())
        await asyncio.sleep(0)  # events scheduled from worker threads before the pull ended
        while not queue.empty():
            yield event_line(queue.get_nowait())
        try:
            rec = task.result()
        except HutchError as e:
            yield line({"type": "error", **error_body(e)})
            return
        except Exception as e:
            log.exception("internal error pulling %s", body.reference)
            yield line({"type": "error", **error_body(InternalError(f"{type(e).__name__}: {e}"))})
            return
        yield line({"type": "done", "message": "pulled", "image": _image_info(rec)})
    finally:
        if not task.done():
            task.cancel()  # the client went away: the pull stops (it resumes next time)


__all__ = [
    "BodyLimit",
    "clone_overrides",
    "create_app",
    "error_response",
    "options_from_body",
    "prometheus_text",
]
