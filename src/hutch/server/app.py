"""The HTTP API of ``hutch serve``: one :class:`hutch.Runtime` over REST, WebSocket and SSE.

:func:`create_app` builds the FastAPI application; :mod:`hutch.server.serve` runs it under uvicorn.
Every endpoint and body is in ``docs/API.md`` and ``/openapi.json``. Errors are always
``{"error": {"type", "message", "hint"}}`` with the status of the error class
(:func:`hutch.errors.status_table`): request bodies of the wrong shape are 400 ``BadRequestError``,
a missing box 404 ``NotFoundError``, an unexpected exception 500 ``InternalError`` (logged).
CORS is off: there is no CORS middleware, so browsers refuse cross-origin calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from hutch import errors
from hutch.box import Box
from hutch.errors import BadRequestError, HutchError, InternalError, NotFoundError
from hutch.images.reference import ImageReference
from hutch.images.store import ImageRecord, ImageStore
from hutch.runtime.metrics import BoxMetrics, RuntimeMetrics
from hutch.runtime.options import BoxOptions, Port, Volume
from hutch.runtime.runtime import Runtime
from hutch.server.auth import BearerAuth
from hutch.server.models import (
    BoxCreate,
    BoxInfo,
    ErrorBody,
    ExecRequest,
    ExecResultModel,
    Health,
    ImageInfo,
    ImageRemoved,
    PullRequest,
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
    error_body,
    error_status,
    record_to_json,
    result_to_json,
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


def options_from_body(data: dict[str, Any]) -> BoxOptions:
    """BoxOptions from request JSON, with every rule checked (host-dependent ones included)."""
    kwargs = dict(data)
    if "ports" in kwargs:
        kwargs["ports"] = tuple(Port(**p) for p in kwargs["ports"])
    if "volumes" in kwargs:
        kwargs["volumes"] = tuple(Volume(**v) for v in kwargs["volumes"])
    return BoxOptions(**kwargs)


def _states(state: list[str] | None) -> list[str] | None:
    if not state:
        return None
    out = [s.strip() for item in state for s in item.split(",") if s.strip()]
    return out or None


def create_app(runtime: Runtime, *, token: str | None) -> FastAPI:
    """The API over ``runtime`` (already open, or opened on first use). With ``token``, every
    request but ``GET /health`` needs ``Authorization: Bearer <token>``."""
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
    _image_routes(router, runtime)
    app.include_router(router)
    if token is not None:
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
            prometheus_text(await rt.metrics()),
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


def prometheus_text(m: RuntimeMetrics) -> str:
    """Hand-formatted exposition text: five numbers do not need a metrics library."""
    lines = []
    for name, kind, help_text, field in PROMETHEUS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        lines.append(f"{name} {getattr(m, field)}")
    return "\n".join(lines) + "\n"


# --- boxes ----------------------------------------------------------------------------------
async def _info(rt: Runtime, box: Box) -> dict[str, Any]:
    rec = await asyncio.to_thread(rt.store.get, box.id)
    return record_to_json(rec)


def _box_routes(router: APIRouter, rt: Runtime) -> None:
    @router.post("/v1/boxes", status_code=201, response_model=BoxInfo, tags=["boxes"])
    async def create_box(body: BoxCreate) -> dict[str, Any]:
        """Create a box (not started unless ``start`` is true). 409 if the name is taken."""
        data = body.model_dump(exclude_unset=True)
        start = data.pop("start", False)
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


# --- exec -----------------------------------------------------------------------------------
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


__all__ = ["create_app", "error_response", "options_from_body", "prometheus_text"]
