"""Running commands for HTTP clients: buffered, Server-Sent Events and WebSocket streams.

Whatever way a client goes away — it closes the connection, is killed, or the server shuts down —
the process it started is killed (its whole process group) and reaped, so a vanished client never
leaves a process running in a box, and the box stays usable.

The WebSocket framing and flow control are described in ``docs/API.md`` and :mod:`hutch.server.wire`.
Server side, each output stream has :data:`~hutch.server.wire.WINDOW` bytes of credit: a chunk is
taken from the :class:`~hutch.Execution` (which returns credit to the guest) only when it can be
sent, so a client that does not read pauses the guest process instead of filling server memory.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import anyio
from pydantic import ValidationError
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from hutch.box import Box
from hutch.errors import BadRequestError, HutchError
from hutch.execution import ExecResult, Execution
from hutch.server.models import ExecRequest, SpawnRequest
from hutch.server.wire import (
    CLOSE_SERVER_SHUTDOWN,
    MAX_CHUNK,
    STDERR,
    STDIN,
    STDOUT,
    STREAMS,
    WINDOW,
    b64decode,
    b64encode,
    error_body,
    exit_to_json,
)

log = logging.getLogger("hutch.server")

#: How long a WebSocket client has to send its spawn request after connecting.
FIRST_MESSAGE_TIMEOUT = 30.0
#: Bound on killing a process whose client went away (a hung guest must not hang the server).
KILL_TIMEOUT = 5.0


async def kill_shielded(execution: Execution) -> None:
    """Kill a process group and wait (bounded) for it, even inside a cancelled task."""
    with anyio.CancelScope(shield=True):
        with contextlib.suppress(HutchError, builtins.TimeoutError):
            await asyncio.wait_for(execution.kill(), KILL_TIMEOUT)
        with contextlib.suppress(HutchError, builtins.TimeoutError):
            await asyncio.wait_for(execution.wait(), KILL_TIMEOUT)


def stdin_bytes(body: ExecRequest) -> bytes | None:
    if body.stdin is not None and body.stdin_b64 is not None:
        raise BadRequestError("give stdin or stdin_b64, not both")
    if body.stdin_b64 is not None:
        return b64decode(body.stdin_b64, "stdin_b64")
    return body.stdin.encode() if body.stdin is not None else None


async def spawn(
    box: Box, body: ExecRequest | SpawnRequest, *, stdin: bool, max_output: int | None = None
) -> Execution:
    kwargs: dict[str, Any] = {}
    if max_output is not None:
        if max_output < 0:
            raise BadRequestError(f"max_output_bytes must be >= 0, not {max_output}")
        kwargs["max_output_bytes"] = max_output
    return await box.spawn(
        *body.cmd,
        env=body.env,
        cwd=body.cwd,
        user=body.user,
        timeout=body.timeout,
        stdin=stdin,
        tty=body.tty,
        term_size=(body.term_size[0], body.term_size[1]) if body.term_size else None,
        **kwargs,
    )


async def _feed(execution: Execution, data: bytes) -> None:
    with contextlib.suppress(HutchError):
        await execution.stdin.write(data)
        await execution.stdin.close()


async def wait_for_disconnect(receive: Callable[[], Awaitable[Message]]) -> None:
    """Return when the HTTP client goes away (its request body has already been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


# --- buffered -------------------------------------------------------------------------------
async def run_buffered(
    box: Box, body: ExecRequest, receive: Callable[[], Awaitable[Message]]
) -> ExecResult | None:
    """Run to completion, like :meth:`hutch.Box.exec`; None if the client went away first (the
    process is then killed)."""
    data = stdin_bytes(body)
    execution = await spawn(box, body, stdin=data is not None, max_output=body.max_output_bytes)
    feeder = asyncio.create_task(_feed(execution, data)) if data is not None else None
    waiter = asyncio.create_task(execution.wait())
    gone = asyncio.create_task(wait_for_disconnect(receive))
    try:
        await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
        if waiter.done():
            try:
                return waiter.result()
            except HutchError:
                box.errors += 1
                raise
        log.info("box %s: client went away; killing %r", box.id, execution.command)
        return None
    finally:
        for t in (gone, feeder):
            if t is not None:
                t.cancel()
        if not waiter.done():
            waiter.cancel()
            with contextlib.suppress(BaseException):
                await waiter
            await kill_shielded(execution)


# --- Server-Sent Events ---------------------------------------------------------------------
def sse(event: str, data: str) -> bytes:
    return f"event: {event}\ndata: {data}\n\n".encode()


class SseResponse(StreamingResponse):
    """A process's output as Server-Sent Events: ``started``, then ``stdout``/``stderr`` (base64
    data), then ``exit`` (or ``error``). Whatever ends the response early — the client going away,
    even before the first event, or a cancelled request — kills the process."""

    def __init__(self, box: Box, execution: Execution, stdin: bytes | None) -> None:
        self.box = box
        self.execution = execution
        self.stdin = stdin
        self.finished = False
        super().__init__(
            self._events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.finished:
                await kill_shielded(self.execution)

    async def _events(self) -> AsyncIterator[bytes]:
        execution = self.execution
        queue: asyncio.Queue[tuple[str, bytes | None]] = asyncio.Queue(maxsize=16)

        async def pump(fd: int) -> None:
            stream = execution.stdout if fd == STDOUT else execution.stderr
            async for chunk in stream:
                await queue.put((STREAMS[fd], chunk))
            await queue.put((STREAMS[fd], None))

        tasks = [asyncio.create_task(pump(STDOUT)), asyncio.create_task(pump(STDERR))]
        if self.stdin is not None:
            tasks.append(asyncio.create_task(_feed(execution, self.stdin)))
        try:
            yield sse("started", json.dumps({"pid": execution.pid}))
            open_streams = 2
            while open_streams:
                name, chunk = await queue.get()
                if chunk is None:
                    open_streams -= 1
                else:
                    yield sse(name, b64encode(chunk))
            try:
                result = await execution.wait()
            except HutchError as e:
                self.box.errors += 1
                self.finished = True
                yield sse("error", json.dumps(error_body(e)))
                return
            self.finished = True
            yield sse("exit", json.dumps(exit_to_json(result)))
        finally:
            for t in tasks:
                t.cancel()


# --- WebSocket ------------------------------------------------------------------------------
class _ProtocolError(Exception):
    """The client broke the stream protocol: the process is killed and the socket closed."""


class WsExec:
    """One process streamed over one WebSocket (see docs/API.md for the messages)."""

    def __init__(self, ws: WebSocket, box: Box) -> None:
        self.ws = ws
        self.box = box
        self.execution: Execution | None = None
        self.window = WINDOW
        self.in_flight = {STDOUT: 0, STDERR: 0}
        self.credit = asyncio.Condition()
        #: stdin data received and not yet written to the guest (bounded by the client's window).
        self.stdin_queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.stdin_pending = 0

    async def send_json(self, msg: dict[str, Any]) -> None:
        await self.ws.send_text(json.dumps(msg))

    async def run(self) -> None:
        ws = self.ws
        try:
            first = await asyncio.wait_for(ws.receive_text(), FIRST_MESSAGE_TIMEOUT)
        except (builtins.TimeoutError, WebSocketDisconnect, RuntimeError, KeyError):
            await self._close(1008, "expected the spawn request as the first (text) message")
            return
        try:
            try:
                request = SpawnRequest.model_validate_json(first)
            except ValidationError as e:
                raise BadRequestError(f"invalid spawn request: {validation_text(e)}") from None
            self.execution = await spawn(self.box, request, stdin=request.stdin)
        except HutchError as e:
            await self.send_json({"type": "error", **error_body(e)})
            await self._close(1000)
            return
        execution = self.execution
        tasks: list[asyncio.Task[None]] = []
        clean = False
        try:
            await self.send_json({"type": "started", "pid": execution.pid, "window": self.window})
            main = asyncio.create_task(self._stream(execution))
            receiver = asyncio.create_task(self._receive(execution))
            tasks = [main, receiver, asyncio.create_task(self._stdin(execution))]
            await asyncio.wait({main, receiver}, return_when=asyncio.FIRST_COMPLETED)
            clean = main.done() and not main.cancelled() and main.exception() is None
            for t in (main, receiver):
                if t.done() and not t.cancelled() and t.exception() is not None:
                    failure = t.exception()
                    if not isinstance(failure, WebSocketDisconnect | OSError | _ProtocolError):
                        log.error("box %s: stream failed", self.box.id, exc_info=failure)
        except (WebSocketDisconnect, OSError):
            pass  # the client went away
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(BaseException):
                    await t
            if not clean:
                log.info(
                    "box %s: stream of %r ended early; killing it", self.box.id, execution.command
                )
                await kill_shielded(execution)
        await self._close(1000 if clean else 1011)

    async def _close(self, code: int, reason: str = "") -> None:
        if self.ws.client_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close(code, reason)

    async def _stream(self, execution: Execution) -> None:
        await asyncio.gather(self._pump(execution, STDOUT), self._pump(execution, STDERR))
        try:
            result = await execution.wait()
        except HutchError as e:
            self.box.errors += 1
            await self.send_json({"type": "error", **error_body(e)})
            return
        await self.send_json({"type": "exit", **exit_to_json(result)})

    async def _pump(self, execution: Execution, fd: int) -> None:
        stream = execution.stdout if fd == STDOUT else execution.stderr
        while True:
            async with self.credit:  # wait for room before taking (and so crediting) a chunk
                await self.credit.wait_for(lambda: self.in_flight[fd] < self.window)
            chunk = await stream.read_chunk()
            if not chunk:
                break
            for i in range(0, len(chunk), MAX_CHUNK):
                part = chunk[i : i + MAX_CHUNK]
                self.in_flight[fd] += len(part)
                await self.ws.send_bytes(bytes([fd]) + part)
        await self.send_json({"type": "eof", "stream": fd})

    async def _receive(self, execution: Execution) -> None:
        """Client messages until it disconnects; returns then (the caller kills the process)."""
        while True:
            msg = await self.ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            data = msg.get("bytes")
            if data is not None:
                if not data or data[0] != STDIN:
                    await self._protocol_error(
                        "binary frames from the client must be stdin (tag 0)"
                    )
                self.stdin_pending += len(data) - 1
                if self.stdin_pending > self.window:
                    await self._protocol_error(
                        f"the client sent more than {self.window} bytes of stdin not yet acknowledged"
                    )
                self.stdin_queue.put_nowait(data[1:])
                continue
            try:
                control = json.loads(msg.get("text") or "")
                kind = control["type"]
            except (ValueError, KeyError, TypeError):
                await self._protocol_error("text frames must be JSON objects with a 'type'")
            try:
                await self._control(execution, kind, control)
            except HutchError as e:
                await self.send_json({"type": "warning", **error_body(e)})

    async def _control(self, execution: Execution, kind: str, msg: dict[str, Any]) -> None:
        if kind == "ack":
            fd, n = msg.get("stream"), msg.get("bytes")
            if fd not in STREAMS or not isinstance(n, int) or n < 0:
                raise BadRequestError("ack needs stream 1|2 and bytes >= 0")
            async with self.credit:
                self.in_flight[fd] = max(0, self.in_flight[fd] - n)
                self.credit.notify_all()
        elif kind == "stdin_close":
            self.stdin_queue.put_nowait(None)
        elif kind == "signal":
            signo, group = msg.get("signal"), msg.get("group", False)
            if not isinstance(signo, int) or not isinstance(group, bool):
                raise BadRequestError("signal needs an integer 'signal' and a boolean 'group'")
            await execution.signal(signo, group=group)
        elif kind == "kill":
            await execution.kill()
        elif kind == "resize":
            rows, cols = msg.get("rows"), msg.get("cols")
            if not isinstance(rows, int) or not isinstance(cols, int):
                raise BadRequestError("resize needs integer 'rows' and 'cols'")
            await execution.resize(rows, cols)
        else:
            raise BadRequestError(f"unknown message type {kind!r}")

    async def _stdin(self, execution: Execution) -> None:
        while True:
            data = await self.stdin_queue.get()
            try:
                if data is None:
                    await execution.stdin.close()
                    return
                await execution.stdin.write(data)
            except HutchError as e:
                await self.send_json({"type": "warning", **error_body(e)})
                if data is None:
                    return
            if data:
                self.stdin_pending -= len(data)
                await self.send_json({"type": "stdin_ack", "bytes": len(data)})

    async def _protocol_error(self, why: str) -> NoReturn:
        await self.send_json({"type": "error", **error_body(BadRequestError(why))})
        raise _ProtocolError(why)


def validation_text(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(p) for p in err.get("loc", ())) or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


__all__ = [
    "CLOSE_SERVER_SHUTDOWN",
    "SseResponse",
    "WsExec",
    "kill_shielded",
    "run_buffered",
    "spawn",
    "stdin_bytes",
    "validation_text",
]
