"""The wire format shared by ``hutch serve`` (:mod:`hutch.server.app`) and ``hutch.client``.

Pure standard library + hutch: the client imports this module without FastAPI. ``docs/API.md``
describes the same formats for other clients.

* **Errors**: ``{"error": {"type": <hutch.errors class name>, "message": …, "hint": …}}`` with the
  class's ``http_status``; an :class:`~hutch.errors.ExecutionError` also carries ``command``,
  ``exit_code``, ``stdout``, ``stderr`` and ``signal``.
* **Bytes** (process output, stdin) travel as standard base64 (RFC 4648, with padding) in JSON,
  and raw in WebSocket binary frames.
* **WebSocket exec stream**: binary frames are ``[tag byte][data]`` — tag :data:`STDIN` (client →
  server), :data:`STDOUT` / :data:`STDERR` (server → client); every other message is a JSON text
  frame with a ``"type"``. Both directions are flow controlled by a window of :data:`WINDOW` bytes
  (see docs/API.md).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from collections.abc import Mapping
from typing import Any

from hutch import errors
from hutch.errors import BadRequestError, ExecutionError, HutchError
from hutch.execution import ExecResult
from hutch.runtime.options import BoxOptions
from hutch.runtime.snapshots import Snapshot
from hutch.runtime.store import BoxRecord

#: Bumped when a request or response changes incompatibly.
API_VERSION = 1

#: WebSocket binary frame tags (the first byte of a binary frame).
STDIN, STDOUT, STDERR = 0, 1, 2
STREAMS = {STDOUT: "stdout", STDERR: "stderr"}
#: Bytes one side may have sent and the other not yet acknowledged, per output stream and for stdin.
WINDOW = 1 << 20
#: Largest data part of one binary frame.
MAX_CHUNK = 64 << 10
#: Largest WebSocket message either side accepts (a chunk plus its tag, or a JSON control message).
MAX_MESSAGE = 1 << 20
#: The WebSocket close code a server sends when it shuts down (RFC 6455 "service restart").
CLOSE_SERVER_SHUTDOWN = 1012
#: Largest HTTP request body the server reads (JSON, ``stdin_b64`` included): 16 MiB. Larger
#: stdin goes through a WebSocket stream (``spawn``), which is flow controlled.
MAX_BODY = 16 << 20


# --- bytes ----------------------------------------------------------------------------------
def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str, where: str = "data") -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise BadRequestError(f"{where} is not valid base64") from None


# --- errors ---------------------------------------------------------------------------------
def wire_class(e: HutchError) -> type[HutchError]:
    """The :mod:`hutch.errors` class an error travels as (facade subclasses map to their base)."""
    for cls in type(e).__mro__:
        if (
            isinstance(cls, type)
            and issubclass(cls, HutchError)
            and cls.__module__ == errors.__name__
        ):
            return cls
    return HutchError  # pragma: no cover - every HutchError has HutchError in its MRO


def error_body(e: HutchError) -> dict[str, Any]:
    cls = wire_class(e)
    info: dict[str, Any] = {"type": cls.__name__, "message": e.message, "hint": e.hint}
    if isinstance(e, ExecutionError):
        info.update(
            command=e.command,
            exit_code=e.exit_code,
            stdout=e.stdout,
            stderr=e.stderr,
            signal=e.signal,
        )
    return {"error": info}


def error_status(e: HutchError) -> int:
    return wire_class(e).http_status


def error_from_body(body: object, status: int = 500) -> HutchError:
    """Rebuild the exception a server sent (``{"error": {...}}``); unknown types → HutchError."""
    info = body.get("error") if isinstance(body, Mapping) else None
    if not isinstance(info, Mapping):
        return HutchError(f"the hutch server answered HTTP {status} without an error body")
    name = str(info.get("type", ""))
    message = str(info.get("message", "")) or f"HTTP {status}"
    hint = info.get("hint")
    hint = str(hint) if hint is not None else None
    cls = getattr(errors, name, None)
    if cls is ExecutionError:
        exit_code = info.get("exit_code")
        signal = info.get("signal")
        return ExecutionError(
            [str(c) for c in info.get("command") or []],
            exit_code if isinstance(exit_code, int) else None,
            str(info.get("stdout", "")),
            str(info.get("stderr", "")),
            signal=signal if isinstance(signal, int) else None,
            hint=hint,
        )
    if isinstance(cls, type) and issubclass(cls, HutchError) and cls.__module__ == errors.__name__:
        return cls(message, hint=hint)
    return HutchError(message, hint=hint)


# --- results --------------------------------------------------------------------------------
def exit_to_json(r: ExecResult) -> dict[str, Any]:
    """An ExecResult without its output (the WebSocket/SSE ``exit`` message)."""
    return {
        "command": list(r.command),
        "exit_code": r.exit_code,
        "signal": r.signal,
        "timed_out": r.timed_out,
        "duration_ms": r.duration_ms,
        "pid": r.pid,
    }


def result_to_json(r: ExecResult) -> dict[str, Any]:
    return {
        **exit_to_json(r),
        "stdout_b64": b64encode(r.stdout_bytes),
        "stderr_b64": b64encode(r.stderr_bytes),
    }


def result_from_json(
    d: Mapping[str, Any], *, stdout: bytes | None = None, stderr: bytes | None = None
) -> ExecResult:
    """An ExecResult from :func:`result_to_json` (or an exit message plus the streamed output)."""
    return ExecResult(
        command=[str(c) for c in d.get("command") or []],
        exit_code=d.get("exit_code"),
        stdout_bytes=stdout if stdout is not None else b64decode(d.get("stdout_b64", "")),
        stderr_bytes=stderr if stderr is not None else b64decode(d.get("stderr_b64", "")),
        signal=d.get("signal"),
        timed_out=bool(d.get("timed_out", False)),
        duration_ms=float(d.get("duration_ms") or 0.0),
        pid=d.get("pid"),
    )


# --- box records ----------------------------------------------------------------------------
_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(BoxRecord) if f.name != "options")


def record_to_json(rec: BoxRecord) -> dict[str, Any]:
    d = {name: getattr(rec, name) for name in _RECORD_FIELDS}
    d["options"] = rec.options.to_json()
    return d


def record_from_json(d: Mapping[str, Any]) -> BoxRecord:
    """A :class:`BoxRecord` as the server sent it (options rebuilt without host checks)."""
    kwargs = {name: d[name] for name in _RECORD_FIELDS if name in d}
    return BoxRecord(options=BoxOptions.from_json(d.get("options") or {}), **kwargs)


# --- snapshots ------------------------------------------------------------------------------
_SNAPSHOT_FIELDS = tuple(f.name for f in dataclasses.fields(Snapshot) if f.name != "options")


def snapshot_to_json(snap: Snapshot, users: list[str] | None = None) -> dict[str, Any]:
    """A snapshot's record, plus its derived ``cpus``, ``memory_mib`` and ``size_bytes`` and, if
    given, ``users`` (ids of the boxes made from it)."""
    d: dict[str, Any] = {name: getattr(snap, name) for name in _SNAPSHOT_FIELDS}
    d["options"] = snap.options.to_json()
    d.update(cpus=snap.cpus, memory_mib=snap.memory_mib, size_bytes=snap.size_bytes)
    if users is not None:
        d["users"] = list(users)
    return d


def snapshot_from_json(d: Mapping[str, Any]) -> Snapshot:
    """A :class:`Snapshot` as the server sent it (derived fields and unknown keys ignored)."""
    kwargs = {name: d[name] for name in _SNAPSHOT_FIELDS if name in d}
    return Snapshot(options=BoxOptions.from_json(d.get("options") or {}), **kwargs)


def dataclass_from_json(cls: type[Any], d: Mapping[str, Any]) -> Any:
    """A metrics dataclass from JSON; unknown keys (a newer server) are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


__all__ = [
    "API_VERSION",
    "CLOSE_SERVER_SHUTDOWN",
    "MAX_BODY",
    "MAX_CHUNK",
    "MAX_MESSAGE",
    "STDERR",
    "STDIN",
    "STDOUT",
    "STREAMS",
    "WINDOW",
    "b64decode",
    "b64encode",
    "dataclass_from_json",
    "error_body",
    "error_from_body",
    "error_status",
    "exit_to_json",
    "record_from_json",
    "record_to_json",
    "result_from_json",
    "result_to_json",
    "snapshot_from_json",
    "snapshot_to_json",
    "wire_class",
]
