"""``RemoteRuntime`` and ``RemoteBox``: :class:`hutch.Runtime` and :class:`hutch.Box` through a
``hutch serve`` server, with the same methods, results and exceptions.

Differences that follow from the distance: a :class:`RemoteBox`'s ``state`` (and its other
record fields) is what the server said at the last call (:meth:`RemoteBox.refresh` asks again);
host-dependent option rules (CPUs, volume paths) are checked by the server, against its host.
"""

from __future__ import annotations

import builtins
import dataclasses
from collections.abc import Callable, Collection, Generator, Mapping, Sequence
from types import TracebackType
from typing import Any

from hutch.client.execution import RemoteExecution
from hutch.client.files import RemoteFiles
from hutch.client.transport import Transport, quote_id
from hutch.errors import BadRequestError
from hutch.execution import DEFAULT_MAX_OUTPUT, HOST_TIMEOUT_GRACE, ExecResult
from hutch.runtime.metrics import BoxMetrics, RuntimeMetrics
from hutch.runtime.options import BoxOptions, Port, Volume
from hutch.runtime.pool import PoolStatus
from hutch.runtime.snapshots import CLONE_OVERRIDES, MACHINE_FIELDS, Snapshot
from hutch.runtime.store import BoxRecord
from hutch.server.wire import (
    b64encode,
    dataclass_from_json,
    record_from_json,
    result_from_json,
    snapshot_from_json,
)

#: Extra seconds a request waits beyond a command's own timeout (the server kills it first).
EXEC_GRACE = HOST_TIMEOUT_GRACE + 5.0
#: Read deadline of stop/remove (the server bounds a guest shutdown itself).
STOP_TIMEOUT = 120.0

_OPTION_FIELDS = frozenset(f.name for f in dataclasses.fields(BoxOptions))


def _argv(cmd: Sequence[str | Sequence[str]]) -> list[str]:
    """``exec("ls", "-l")`` or ``exec(["ls", "-l"])``; empty = the image's default command."""
    if len(cmd) == 1 and not isinstance(cmd[0], str):
        cmd = tuple(cmd[0])
    return [str(c) for c in cmd]


def options_json(options: BoxOptions | None, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Options as JSON, checked here by every rule except the host-dependent ones (the server
    checks those against its own host)."""
    if options is not None:
        if kwargs:
            raise TypeError("pass either options or keyword arguments, not both")
        return options.to_json()
    unknown = set(kwargs) - _OPTION_FIELDS
    if unknown:
        raise TypeError(f"unexpected option(s): {', '.join(sorted(unknown))}")
    data = dict(kwargs)
    for key, cls in (("ports", Port), ("volumes", Volume)):
        if key in data:
            data[key] = [x.to_json() if isinstance(x, cls) else x for x in data[key]]
    return BoxOptions.from_json(data).to_json()


def clone_json(options: BoxOptions | None, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """What a box made from a snapshot sets for itself: the given keyword arguments only (or
    all of ``options``), as JSON. The server applies ``Runtime.create(snapshot=…)``'s rules."""
    if options is not None:
        if kwargs:
            raise TypeError("pass either options or keyword arguments, not both")
        wanted = CLONE_OVERRIDES | set(MACHINE_FIELDS)  # as Runtime.create reads options
        return {k: v for k, v in options.to_json().items() if k in wanted}
    data: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in ("ports", "volumes"):
            value = [x.to_json() if isinstance(x, Port | Volume) else x for x in value]
        elif key in ("env", "labels") and isinstance(value, Mapping):
            value = dict(value)
        data[key] = value
    return data


class RemoteBox:
    """A box on a hutch server; the methods of :class:`hutch.Box`."""

    def __init__(self, runtime: RemoteRuntime, info: Mapping[str, Any]) -> None:
        self._rt = runtime
        self._update(info)

    def _update(self, info: Mapping[str, Any]) -> None:
        self.record: BoxRecord = record_from_json(info)
        rec = self.record
        self.id = rec.id
        self.name = rec.name
        self.image = rec.image
        self.options = rec.options
        self.state = rec.state
        self.accel = rec.accel
        self.boot_ms = rec.boot_ms
        self.failure = rec.failure

    @property
    def _path(self) -> str:
        return f"/v1/boxes/{quote_id(self.id)}"

    def __repr__(self) -> str:
        return f"<RemoteBox {self.id} {self.image} {self.state}>"

    async def refresh(self) -> RemoteBox:
        """Fetch the box's record again (``state`` etc. are as of the last call)."""
        r = await self._rt._t.request("GET", self._path)
        self._update(r.json())
        return self

    async def start(self) -> None:
        """Boot the box on the server (waits until its agent answers)."""
        r = await self._rt._t.request("POST", f"{self._path}/start", read_timeout=None)
        self._update(r.json())

    async def stop(self) -> None:
        """Shut the guest down; the disk is kept."""
        r = await self._rt._t.request("POST", f"{self._path}/stop", read_timeout=STOP_TIMEOUT)
        self._update(r.json())

    async def remove(self) -> None:
        """Stop the box if needed and delete its disk, logs and record."""
        await self._rt._t.request(
            "DELETE", self._path, params={"force": "true"}, read_timeout=STOP_TIMEOUT
        )
        self.state = "removed"

    async def __aenter__(self) -> RemoteBox:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.remove()

    async def exec(
        self,
        *cmd: str | Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | int | None = None,
        timeout: float | None = None,
        stdin: bytes | str | None = None,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT,
        tty: bool = False,
        term_size: tuple[int, int] | None = None,
    ) -> ExecResult:
        """Run a command to completion (see :meth:`hutch.Box.exec`)."""
        body: dict[str, Any] = {
            "cmd": _argv(cmd),
            "env": dict(env) if env is not None else None,
            "cwd": cwd,
            "user": user,
            "timeout": timeout,
            "max_output_bytes": max_output_bytes,
            "tty": tty,
            "term_size": term_size,
        }
        if isinstance(stdin, str):
            body["stdin"] = stdin
        elif stdin is not None:
            body["stdin_b64"] = b64encode(bytes(stdin))
        read = None if timeout is None else timeout + EXEC_GRACE
        r = await self._rt._t.request("POST", f"{self._path}/exec", json=body, read_timeout=read)
        return result_from_json(r.json())

    async def spawn(
        self,
        *cmd: str | Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | int | None = None,
        timeout: float | None = None,
        stdin: bool = True,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT,
        tty: bool = False,
        term_size: tuple[int, int] | None = None,
    ) -> RemoteExecution:
        """Start a process and stream it over a WebSocket (see :meth:`hutch.Box.spawn`)."""
        if max_output_bytes < 0:
            raise BadRequestError(f"max_output_bytes must be >= 0, not {max_output_bytes}")
        request = {
            "cmd": _argv(cmd),
            "env": dict(env) if env is not None else None,
            "cwd": cwd,
            "user": user,
            "timeout": timeout,
            "stdin": stdin,
            "tty": tty,
            "term_size": term_size,
        }
        return await RemoteExecution.open(
            self._rt._t,
            f"{self._path}/exec/ws",
            request,
            timeout=timeout,
            max_output=max_output_bytes,
        )

    @property
    def files(self) -> RemoteFiles:
        """The box's files (the methods of :class:`hutch.files.Files`), over the server."""
        return RemoteFiles(self)

    async def metrics(self) -> BoxMetrics:
        r = await self._rt._t.request("GET", f"{self._path}/metrics")
        m: BoxMetrics = dataclass_from_json(BoxMetrics, r.json())
        return m

    # --- snapshots, clones and forks (see hutch.Box) --------------------------------------
    async def snapshot(self, name: str | None = None) -> Snapshot:
        """Freeze this running box into a snapshot on the server; the box runs on."""
        r = await self._rt._t.request(
            "POST", f"{self._path}/snapshot", json={"name": name}, read_timeout=None
        )
        return snapshot_from_json(r.json())

    async def clone(self, *, name: str | None = None) -> RemoteBox:
        """A running copy of this box on the server (its snapshot goes with its last clone)."""
        r = await self._rt._t.request(
            "POST", f"{self._path}/clone", json={"name": name}, read_timeout=None
        )
        return RemoteBox(self._rt, r.json())

    async def fork(self, n: int, *, names: Sequence[str] | None = None) -> builtins.list[RemoteBox]:
        """``n`` running copies of this box from one snapshot, restored concurrently."""
        body = {"n": n, "names": list(names) if names is not None else None}
        r = await self._rt._t.request("POST", f"{self._path}/fork", json=body, read_timeout=None)
        return [RemoteBox(self._rt, d) for d in r.json()]


class RemoteRuntime:
    """A hutch server's runtime; the methods of :class:`hutch.Runtime`. Made by
    :func:`hutch.client.connect`; ``async with`` (or ``await``) checks that the server answers,
    and ``async with`` closes the connection pool at the end (boxes stay on the server: they are
    the server's)."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport

    @property
    def url(self) -> str:
        return self._t.address.url

    def __repr__(self) -> str:
        return f"<RemoteRuntime {self.url}>"

    async def open(self) -> None:
        """Check that a server answers (ConnectionError naming the address otherwise)."""
        await self.version()

    async def close(self) -> None:
        """Close the connection pool (boxes keep running on the server)."""
        await self._t.aclose()

    async def __aenter__(self) -> RemoteRuntime:
        await self.open()
        return self

    def __await__(self) -> Generator[Any, None, RemoteRuntime]:
        """``rt = await connect(url)``: checks the server answers, then gives the runtime."""
        return self._opened().__await__()

    async def _opened(self) -> RemoteRuntime:
        await self.open()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def version(self) -> dict[str, Any]:
        """``{"version": server's hutch version, "api": API version}``."""
        r = await self._t.request("GET", "/v1/version")
        out: dict[str, Any] = r.json()
        return out

    async def create(
        self,
        options: BoxOptions | None = None,
        *,
        snapshot: Snapshot | str | None = None,
        **kwargs: Any,
    ) -> RemoteBox:
        """A new box on the server (not started). ConflictError if the name is taken.

        With ``snapshot`` (a :class:`hutch.Snapshot`, or its id or name) the box is made from it
        (its first ``start()`` restores it), with the rules of :meth:`hutch.Runtime.create`."""
        if snapshot is None:
            body = options_json(options, kwargs)
        else:
            snap_id = snapshot.id if isinstance(snapshot, Snapshot) else snapshot
            body = {**clone_json(options, kwargs), "snapshot": snap_id}
        r = await self._t.request("POST", "/v1/boxes", json=body)
        return RemoteBox(self, r.json())

    async def get(self, id_or_name: str) -> RemoteBox:
        """The box with this id, unique id prefix or name (NotFoundError otherwise)."""
        r = await self._t.request("GET", f"/v1/boxes/{quote_id(id_or_name)}")
        return RemoteBox(self, r.json())

    async def list(self, state: str | Collection[str] | None = None) -> builtins.list[BoxRecord]:
        """Records of the server's home's boxes, oldest first; filter by state(s)."""
        params: dict[str, Any] = {}
        if state is not None:
            params["state"] = [state] if isinstance(state, str) else list(state)
        r = await self._t.request("GET", "/v1/boxes", params=params)
        return [record_from_json(d) for d in r.json()]

    async def remove(self, id_or_name: str, *, force: bool = False) -> None:
        """Delete a box; a running one needs ``force=True``."""
        await self._t.request(
            "DELETE",
            f"/v1/boxes/{quote_id(id_or_name)}",
            params={"force": "true" if force else "false"},
            read_timeout=STOP_TIMEOUT,
        )

    async def run(
        self, image: str, *cmd: str | Sequence[str], timeout: float | None = None, **options: Any
    ) -> ExecResult:
        """Ephemeral: create and start a box from ``image``, run ``cmd``, remove the box."""
        body = options_json(None, {"image": image, "auto_remove": True, **options})
        r = await self._t.request(
            "POST", "/v1/boxes", json={**body, "start": True}, read_timeout=None
        )
        box = RemoteBox(self, r.json())
        try:
            return await box.exec(*cmd, timeout=timeout)
        finally:
            await box.remove()

    async def metrics(self) -> RuntimeMetrics:
        r = await self._t.request("GET", "/v1/metrics")
        m: RuntimeMetrics = dataclass_from_json(RuntimeMetrics, r.json())
        return m

    # --- snapshots (the server's home) ----------------------------------------------------
    async def snapshots(self) -> builtins.list[Snapshot]:
        """Every snapshot of the server's home, oldest first."""
        r = await self._t.request("GET", "/v1/snapshots")
        return [snapshot_from_json(d) for d in r.json()]

    async def get_snapshot(self, id_or_name: str) -> Snapshot:
        """The snapshot with this id, unique id prefix or name (NotFoundError otherwise)."""
        r = await self._t.request("GET", f"/v1/snapshots/{quote_id(id_or_name)}")
        return snapshot_from_json(r.json())

    async def snapshot_users(self, id_or_name: str) -> builtins.list[str]:
        """Ids of the boxes made from a snapshot (they keep it from being removed)."""
        r = await self._t.request("GET", f"/v1/snapshots/{quote_id(id_or_name)}")
        return [str(u) for u in r.json().get("users") or []]

    async def remove_snapshot(self, id_or_name: str) -> None:
        """Delete a snapshot and its files; ConflictError while boxes made from it exist."""
        await self._t.request("DELETE", f"/v1/snapshots/{quote_id(id_or_name)}")

    # --- warm pools (the server's) ----------------------------------------------------------
    async def configure_pool(
        self,
        image: str = "busybox",
        *,
        cpus: int = 1,
        memory_mib: int = 256,
        size: int = 1,
        accel: str = "auto",
    ) -> PoolStatus:
        """Keep ``size`` restored boxes of (image, cpus, memory_mib) ready on the server
        (``PUT /v1/pools``; ``size=0`` drains and removes the pool). See
        :meth:`hutch.Runtime.configure_pool`."""
        body = {
            "image": image,
            "cpus": cpus,
            "memory_mib": memory_mib,
            "size": size,
            "accel": accel,
        }
        r = await self._t.request("PUT", "/v1/pools", json=body, read_timeout=STOP_TIMEOUT)
        status: PoolStatus = dataclass_from_json(PoolStatus, r.json())
        return status

    async def pool_status(self) -> builtins.list[PoolStatus]:
        """The server's warm pools (``GET /v1/pools``)."""
        r = await self._t.request("GET", "/v1/pools")
        return [dataclass_from_json(PoolStatus, d) for d in r.json()]

    async def wait_pool(self, timeout: float | None = 60.0) -> None:
        """Wait until every warm pool of the server holds its size of ready boxes
        (TimeoutError after ``timeout`` seconds)."""
        params = {} if timeout is None else {"timeout": str(timeout)}
        await self._t.request(
            "POST",
            "/v1/pools/wait",
            params=params,
            read_timeout=None if timeout is None else timeout + 10.0,
        )

    # --- images (the server's store) ------------------------------------------------------
    async def images(self) -> builtins.list[dict[str, Any]]:
        """The server's image store (``GET /v1/images``), newest first."""
        r = await self._t.request("GET", "/v1/images")
        out: builtins.list[dict[str, Any]] = r.json()
        return out

    async def remove_image(self, name: str, *, force: bool = False) -> builtins.list[str]:
        r = await self._t.request(
            "DELETE",
            f"/v1/images/{quote_id(name)}",
            params={"force": "true" if force else "false"},
        )
        done: builtins.list[str] = r.json()["done"]
        return done

    async def pull(
        self,
        reference: str,
        *,
        platform: str | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Pull on the server; ``progress`` gets each NDJSON event. Returns the image's record."""
        from hutch.server.wire import error_from_body

        body = {"reference": reference, "platform": platform}
        async for event in self._t.json_lines("POST", "/v1/images/pull", json=body):
            if event.get("type") == "error":
                raise error_from_body(event)
            if event.get("type") == "done":
                image: dict[str, Any] = event["image"]
                return image
            if progress is not None:
                progress(event)
        from hutch.errors import ConnectionError

        raise ConnectionError(f"the pull of {reference!r} ended without a result")


__all__ = ["RemoteBox", "RemoteRuntime", "clone_json", "options_json"]
