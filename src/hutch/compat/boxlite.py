"""A BoxLite-style API over hutch: ``import hutch.compat.boxlite as boxlite``.

Programs written against the BoxLite Python SDK's documented API run with only the import changed
(and image names: hutch has the built-in ``busybox`` and ``debian-python``, or any pulled image):

- ``boxlite.Boxlite.default()`` / ``Boxlite(Options(home_dir=…))`` → a :class:`hutch.Runtime`;
  ``await runtime.create(BoxOptions(image=…), name=…)`` creates **and starts** a box (as BoxLite
  does); ``get``/``get_info`` return ``None`` for an unknown box, ``remove`` raises
  :class:`NotFoundError`; ``list_info``, ``get_or_create``, ``metrics``, ``shutdown``.
- The low-level :class:`Box`: ``await box.exec("cmd", ["args"], [("K", "V")], timeout_secs=…)`` →
  :class:`Execution` with ``stdout()``/``stderr()`` (async iterators of text lines, newline kept),
  ``stdin()``, ``await wait()`` (exit code only, negative = killed by that signal), ``kill()``;
  ``box.info()`` (usable with and without ``await``), ``await box.metrics()`` with BoxLite's field
  names. ``stop()`` removes an ``auto_remove`` box (BoxLite's default ``auto_remove=True``); an
  exec on a stopped box starts it again.
- :class:`SimpleBox` (``async with SimpleBox(image=…) as box: r = await box.exec("ls", "-l")``) and
  :class:`CodeBox` (``run(code)``, ``install_package``) on ``debian-python``.
- Errors: :class:`BoxliteError` (a ``RuntimeError``, as in BoxLite) and its subclasses; a
  non-zero exit never raises — :class:`ExecError` is for programs to raise, as BoxLite documents.

Not available (a :class:`ConfigError` says so): ``rootfs_path``, ``entrypoint``/``cmd``,
``secrets``, ``detach``, and BoxLite's sync (greenlet) API — use
:mod:`hutch.sync` for blocking code.
"""

from __future__ import annotations

import builtins
import datetime as _dt
import signal as _signal
from collections.abc import AsyncIterator, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hutch
from hutch import errors as _e
from hutch.box import Box as _NativeBox
from hutch.compat import translating
from hutch.execution import Execution as _NativeExecution
from hutch.execution import OutputStream as _OutputStream
from hutch.runtime.store import BoxRecord as _BoxRecord

# --- errors --------------------------------------------------------------------------------


class BoxliteError(_e.HutchError, builtins.RuntimeError):
    """Base of the facade's errors (a ``RuntimeError``, as BoxLite's)."""


class ExecError(BoxliteError):
    """A command failed — raised by programs (BoxLite's ``exec`` never raises on exit codes)."""

    def __init__(self, command: str, exit_code: int, stderr: str, *, hint: str | None = None):
        self.command = command
        self.exit_code = exit_code
        self.stderr = stderr
        super().__init__(
            f"Command '{command}' failed with exit code {exit_code}: {stderr}",
            hint=hint or "Inspect exit_code and stderr on this error.",
        )


class TimeoutError(BoxliteError, _e.TimeoutError):  # (BoxLite's name)
    pass


class ParseError(BoxliteError, _e.ParseError):
    pass


class NotFoundError(BoxliteError, _e.NotFoundError):
    pass


class AlreadyExistsError(BoxliteError, _e.ConflictError):
    pass


class InvalidStateError(BoxliteError, _e.InvalidStateError):
    pass


class InvalidArgumentError(BoxliteError, _e.BadRequestError):
    pass


class ConfigError(InvalidArgumentError, _e.ConfigError):
    pass


class ImageError(BoxliteError, _e.ImageError):
    pass


class StorageError(BoxliteError, _e.StorageError):
    pass


class NetworkError(BoxliteError, _e.NetworkError):
    pass


class PortalError(BoxliteError, _e.PortalError):
    pass


class EngineError(BoxliteError, _e.EngineError):
    pass


class UnsupportedEngineError(EngineError, _e.UnsupportedEngineError):
    pass


class InternalError(BoxliteError, _e.InternalError):
    pass


_ERRORS: dict[type[_e.HutchError], type[_e.HutchError]] = {
    _e.TimeoutError: TimeoutError,
    _e.ParseError: ParseError,
    _e.NotFoundError: NotFoundError,
    _e.ConflictError: AlreadyExistsError,
    _e.InvalidStateError: InvalidStateError,
    _e.ConfigError: ConfigError,
    _e.BadRequestError: InvalidArgumentError,
    _e.ImageError: ImageError,
    _e.StorageError: StorageError,
    _e.NetworkError: NetworkError,
    _e.PortalError: PortalError,
    _e.UnsupportedEngineError: UnsupportedEngineError,
    _e.EngineError: EngineError,
    _e.InternalError: InternalError,
}
_translating = translating(_ERRORS, BoxliteError)


def _unsupported(what: str, hint: str) -> ConfigError:
    return ConfigError(f"{what} is not supported by hutch's BoxLite facade", hint=hint)


# --- options -------------------------------------------------------------------------------


@dataclass
class Options:
    """Runtime options: ``home_dir`` is the hutch home (default: ``HUTCH_HOME`` or XDG)."""

    home_dir: str | None = None
    image_registries: Sequence[Any] = ()


@dataclass
class NetworkSpec:
    mode: str = "enabled"
    allow_net: Sequence[str] = ()


class BoxOptions:
    """BoxLite's box options, turned into :class:`hutch.BoxOptions` when a box is created."""

    def __init__(
        self,
        image: str | None = None,
        rootfs_path: str | None = None,
        cpus: int | None = None,
        memory_mib: int | None = None,
        disk_size_gb: int | None = None,
        working_dir: str | None = None,
        env: Iterable[tuple[str, str]] | Mapping[str, str] = (),
        volumes: Iterable[Any] = (),
        network: NetworkSpec | None = None,
        ports: Iterable[Any] = (),
        auto_remove: bool | None = None,
        detach: bool | None = None,
        entrypoint: Sequence[str] | None = None,
        cmd: Sequence[str] | None = None,
        user: str | None = None,
        advanced: Any = None,
        secrets: Sequence[Any] = (),
    ) -> None:
        self.image = image
        self.rootfs_path = rootfs_path
        self.cpus = cpus
        self.memory_mib = memory_mib
        self.disk_size_gb = disk_size_gb
        self.working_dir = working_dir
        self.env = list(env.items()) if isinstance(env, Mapping) else list(env)
        self.volumes = list(volumes)
        self.network = network
        self.ports = list(ports)
        self.auto_remove = auto_remove
        self.detach = detach
        self.entrypoint = entrypoint
        self.cmd = cmd
        self.user = user
        self.advanced = advanced
        self.secrets = list(secrets)

    def to_native(self, name: str | None = None) -> hutch.BoxOptions:
        """The equivalent :class:`hutch.BoxOptions` (ConfigError for what hutch cannot do)."""
        if self.rootfs_path is not None:
            raise _unsupported(
                "rootfs_path", "Load the folder as an image: `hutch load DIR --tag NAME`."
            )
        for what, value in (
            ("entrypoint", self.entrypoint),
            ("cmd", self.cmd),
            ("secrets", self.secrets),
            ("detach", self.detach),
        ):
            if value:
                raise _unsupported(what, "Pass the command to exec(), values in env.")
        network, allow = "none", list(self.network.allow_net if self.network else ())
        if self.network is not None and self.network.mode != "disabled":
            network = "allowlist" if allow else "outbound"
        native: dict[str, Any] = {
            "image": self.image or "busybox",
            "name": name,
            "env": dict(self.env),
            "workdir": self.working_dir,
            "user": self.user,
            "auto_remove": True if self.auto_remove is None else self.auto_remove,
            "network": network,
            "allow": allow,
            "volumes": [_volume(v, i) for i, v in enumerate(self.volumes)],
            "ports": [_port(p, i) for i, p in enumerate(self.ports)],
        }
        if self.cpus is not None:
            native["cpus"] = self.cpus
        if self.memory_mib is not None:
            native["memory_mib"] = self.memory_mib
        if self.disk_size_gb is not None:
            native["disk_size_mib"] = int(self.disk_size_gb) * 1024
        try:
            return hutch.BoxOptions(**native)
        except _e.HutchError as e:
            raise ConfigError(e.message, hint=e.hint) from e


def _volume(v: Any, i: int) -> hutch.Volume:
    if isinstance(v, Mapping):
        host = v.get("host", v.get("host_path"))
        guest = v.get("guest", v.get("guest_path"))
        ro = v.get("read_only", v.get("ro", False))
    elif isinstance(v, tuple | list) and len(v) in (2, 3):
        host, guest, ro = v[0], v[1], (v[2] if len(v) == 3 else False)
    else:
        raise ConfigError(f"volumes[{i}] must be (host, guest[, read_only]) or a dict, not {v!r}")
    if not isinstance(ro, bool):
        raise ConfigError(f"volumes[{i}]: read_only must be True or False, not {ro!r}")
    return hutch.Volume(host_path=str(host), guest_path=str(guest), read_only=ro)


def _port(p: Any, i: int) -> hutch.Port:
    if isinstance(p, Mapping):
        guest = p.get("guest_port", p.get("guest"))
        host = p.get("host_port", p.get("host")) or 0
        protocol = p.get("protocol", "tcp")
        host_ip = p.get("host_ip", "127.0.0.1")
    elif isinstance(p, tuple | list) and 2 <= len(p) <= 4:
        host, guest = p[0], p[1]
        protocol = p[2] if len(p) > 2 else "tcp"
        host_ip = p[3] if len(p) > 3 else "127.0.0.1"
    else:
        raise ConfigError(f"ports[{i}] must be (host, guest[, protocol[, host_ip]]), not {p!r}")
    return hutch.Port(host=host, guest=guest, protocol=protocol, host_ip=host_ip)


# --- info and metrics ----------------------------------------------------------------------

_STATUS = {
    "created": "configured",
    "starting": "configured",
    "running": "running",
    "stopping": "stopping",
    "stopped": "stopped",
    "failed": "failed",
}


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return _dt.datetime.fromtimestamp(t, _dt.UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class BoxStateInfo:
    status: str
    running: bool
    pid: int | None


@dataclass(frozen=True)
class BoxInfo:
    """What ``box.info()`` / ``runtime.list_info()`` return. Also awaitable (``await box.info()``,
    as in BoxLite's newest versions)."""

    id: str
    name: str | None
    state: BoxStateInfo
    created_at: str | None
    started_at: str | None
    image: str
    cpus: int
    memory_mib: int

    @property
    def status(self) -> str:
        """``info.status`` (older BoxLite) = ``info.state.status``."""
        return self.state.status

    def __await__(self) -> Generator[Any, None, BoxInfo]:
        if False:  # a generator that returns at once
            yield
        return self

    @classmethod
    def from_record(cls, rec: _BoxRecord, live: _NativeBox | None = None) -> BoxInfo:
        state = live.state if live is not None and live.state != "removed" else rec.state
        pid = (live.qemu_pid if live is not None else None) or rec.qemu_pid
        return cls(
            id=rec.id,
            name=rec.name,
            state=BoxStateInfo(
                _STATUS.get(state, "unknown"),
                state == "running",
                pid if state == "running" else None,
            ),
            created_at=_iso(rec.created_at),
            started_at=_iso(rec.started_at),
            image=rec.image,
            cpus=rec.options.cpus,
            memory_mib=rec.options.memory_mib,
        )


@dataclass(frozen=True)
class BoxMetrics:
    """BoxLite's per-box metrics (bytes and network counters are not tracked: ``None``)."""

    commands_executed_total: int
    exec_errors_total: int
    total_create_duration_ms: float | None
    guest_boot_duration_ms: float | None
    cpu_percent: float | None
    memory_bytes: int | None
    bytes_sent_total: int | None = None
    bytes_received_total: int | None = None
    network_bytes_sent: int | None = None
    network_bytes_received: int | None = None
    network_tcp_connections: int | None = None
    network_tcp_errors: int | None = None

    # The short names BoxLite's repr uses, as attributes too.
    @property
    def commands(self) -> int:
        return self.commands_executed_total

    @property
    def errors(self) -> int:
        return self.exec_errors_total

    @property
    def total_create_ms(self) -> float | None:
        return self.total_create_duration_ms

    @property
    def guest_boot_ms(self) -> float | None:
        return self.guest_boot_duration_ms

    @property
    def cpu(self) -> float | None:
        return self.cpu_percent

    @property
    def mem(self) -> int | None:
        return self.memory_bytes

    def __repr__(self) -> str:
        return (
            f"BoxMetrics(commands={self.commands_executed_total}, errors={self.exec_errors_total}, "
            f"total_create_ms={self.total_create_duration_ms}, "
            f"guest_boot_ms={self.guest_boot_duration_ms}, cpu={self.cpu_percent}, "
            f"mem={self.memory_bytes})"
        )


@dataclass(frozen=True)
class RuntimeMetrics:
    boxes_created_total: int
    boxes_failed_total: int
    num_running_boxes: int
    total_commands_executed: int
    total_exec_errors: int


# --- executions ----------------------------------------------------------------------------


class _ExecId(str):
    """An execution id usable both as ``execution.id`` and ``execution.id()``."""

    def __call__(self) -> str:
        return str(self)


class _Lines:
    """An output stream as an async iterator of text lines (newline kept), taken once."""

    def __init__(self, stream: _OutputStream) -> None:
        self._stream = stream

    def __aiter__(self) -> AsyncIterator[str]:
        return self._lines()

    async def _lines(self) -> AsyncIterator[str]:
        pending = b""
        async for chunk in self._stream:
            pending += chunk
            while (cut := pending.find(b"\n")) >= 0:
                line, pending = pending[: cut + 1], pending[cut + 1 :]
                yield line.decode("utf-8", "replace")
        if pending:
            yield pending.decode("utf-8", "replace")


class ExecStdin:
    def __init__(self, native: _NativeExecution) -> None:
        self._native = native
        self._closed = False

    @_translating
    async def send_input(self, data: bytes | str) -> None:
        await self._native.stdin.write(data.encode() if isinstance(data, str) else bytes(data))

    @_translating
    async def close(self) -> None:
        self._closed = True
        await self._native.stdin.close()

    async def is_closed(self) -> bool:
        return self._closed


@dataclass(frozen=True)
class ExecWaitResult:
    """``await execution.wait()``: the exit code (negative: killed by that signal)."""

    exit_code: int
    error_message: str | None = None
    timed_out: bool = False


class Execution:
    """A running command (from the low-level ``Box.exec``)."""

    def __init__(self, native: _NativeExecution) -> None:
        self._native = native
        self._taken: set[str] = set()

    @property
    def id(self) -> _ExecId:
        return _ExecId(str(self._native.id))

    def _take(self, which: str) -> None:
        if which in self._taken:
            raise InvalidStateError(f"{which} stream not available (it was already taken)")
        self._taken.add(which)

    def stdout(self) -> _Lines:
        self._take("stdout")
        return _Lines(self._native.stdout)

    def stderr(self) -> _Lines:
        self._take("stderr")
        return _Lines(self._native.stderr)

    def stdin(self) -> ExecStdin:
        self._take("stdin")
        return ExecStdin(self._native)

    @_translating
    async def wait(self) -> ExecWaitResult:
        try:
            r = await self._native.wait()
        except _e.TimeoutError as e:
            return ExecWaitResult(-int(_signal.SIGKILL), e.message, timed_out=True)
        if r.exit_code is not None:
            return ExecWaitResult(r.exit_code)
        return ExecWaitResult(-(r.signal or 0), f"killed by {r.signal_name}")

    @_translating
    async def kill(self) -> None:
        await self._native.kill()

    @_translating
    async def signal(self, signo: int) -> None:
        await self._native.signal(signo)

    @_translating
    async def resize_tty(self, rows: int, cols: int) -> None:
        """The terminal's size, for an execution started with ``tty=True``."""
        await self._native.resize(rows, cols)


# --- boxes ---------------------------------------------------------------------------------


class Box:
    """A box of the runtime (BoxLite's native ``Box``)."""

    def __init__(self, runtime: Boxlite, native: _NativeBox) -> None:
        self._runtime = runtime
        self._native = native

    @property
    def id(self) -> str:
        return self._native.id

    @property
    def name(self) -> str | None:
        return self._native.options.name

    def info(self) -> BoxInfo:
        rec = self._runtime._rt.store.get(self.id)
        return BoxInfo.from_record(rec, self._native)

    @_translating
    async def start(self) -> None:
        await self._native.start()

    @_translating
    async def stop(self) -> None:
        """Stop the box (its disk is kept); an ``auto_remove`` box is removed."""
        if self._native.state == "removed":
            return
        if self._native.options.auto_remove:
            await self._runtime._rt.remove(self.id, force=True)
        else:
            await self._native.stop()

    @_translating
    async def exec(
        self,
        command: str,
        args: Sequence[str] | None = None,
        env: Iterable[tuple[str, str]] | Mapping[str, str] | None = None,
        tty: bool = False,
        user: str | None = None,
        timeout_secs: float | None = None,
        cwd: str | None = None,
    ) -> Execution:
        if self._native.state in ("created", "stopped", "failed"):
            await self._native.start()  # BoxLite restarts a stopped box on exec
        pairs = dict(env.items()) if isinstance(env, Mapping) else dict(env or ())
        native = await self._native.spawn(
            command, *(args or ()), env=pairs, user=user, cwd=cwd, timeout=timeout_secs, tty=tty
        )
        return Execution(native)

    @_translating
    async def metrics(self) -> BoxMetrics:
        m = await self._native.metrics()
        return BoxMetrics(
            commands_executed_total=m.commands,
            exec_errors_total=m.errors,
            total_create_duration_ms=m.total_create_ms,
            guest_boot_duration_ms=m.guest_boot_ms,
            cpu_percent=m.cpu_percent,
            memory_bytes=m.memory_bytes,
        )

    async def __aenter__(self) -> Box:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


# --- the runtime ---------------------------------------------------------------------------


class Boxlite:
    """The runtime: a hutch home (``Options.home_dir``) and its boxes."""

    _default: Boxlite | None = None

    def __init__(self, options: Options | None = None) -> None:
        home = options.home_dir if options is not None else None
        if options is not None and options.image_registries:
            raise _unsupported(
                "image_registries", "Configure registries in HUTCH_HOME/config.toml [registries]."
            )
        self._rt = hutch.Runtime(Path(home)) if home else hutch.Runtime.default()

    @classmethod
    def default(cls) -> Boxlite:
        if cls._default is None:
            cls._default = cls()
        return cls._default

    def _box(self, native: _NativeBox) -> Box:
        return Box(self, native)

    @_translating
    async def create(self, options: BoxOptions | None = None, name: str | None = None) -> Box:
        """Create **and start** a box (BoxLite semantics)."""
        native = await self._rt.create((options or BoxOptions()).to_native(name))
        try:
            await native.start()
        except BaseException:
            await self._rt.remove(native.id, force=True)
            raise
        return self._box(native)

    @_translating
    async def get(self, id_or_name: str) -> Box | None:
        try:
            return self._box(await self._rt.get(id_or_name))
        except _e.NotFoundError:
            return None

    @_translating
    async def get_or_create(
        self, options: BoxOptions | None = None, name: str | None = None
    ) -> tuple[Box, bool]:
        if name is not None:
            found = await self.get(name)
            if found is not None:
                if found._native.state != "running":
                    await found._native.start()
                return found, False
        return await self.create(options, name), True

    @_translating
    async def get_info(self, id_or_name: str) -> BoxInfo | None:
        try:
            rec = self._rt.store.get(id_or_name)
        except _e.NotFoundError:
            return None
        return BoxInfo.from_record(rec, self._rt._boxes.get(rec.id))

    @_translating
    async def list_info(self) -> list[BoxInfo]:
        return [BoxInfo.from_record(r, self._rt._boxes.get(r.id)) for r in await self._rt.list()]

    @_translating
    async def metrics(self) -> RuntimeMetrics:
        m = await self._rt.metrics()
        return RuntimeMetrics(
            boxes_created_total=m.boxes_created,
            boxes_failed_total=m.boxes_failed,
            num_running_boxes=m.running,
            total_commands_executed=m.commands,
            total_exec_errors=m.errors,
        )

    @_translating
    async def remove(self, id_or_name: str, force: bool = False) -> None:
        await self._rt.remove(id_or_name, force=force)

    @_translating
    async def shutdown(self, timeout: int | None = None) -> None:
        """Stop every box this process started (``auto_remove`` ones are removed)."""
        await self._rt.close()

    def close(self) -> None:
        """(BoxLite: a no-op; boxes stop with :meth:`shutdown` or at process exit.)"""

    def __enter__(self) -> Boxlite:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- high-level boxes ----------------------------------------------------------------------


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool = False
    error_message: str | None = None


_NOT_STARTED = (
    "Box not started. Use 'async with SimpleBox(...) as box:' or call 'await box.start()' first."
)


class SimpleBox:
    """``async with SimpleBox(image=…) as box: r = await box.exec("ls", "-l")``."""

    def __init__(
        self,
        image: str | None = None,
        rootfs_path: str | None = None,
        memory_mib: int | None = None,
        cpus: int | None = None,
        runtime: Boxlite | None = None,
        name: str | None = None,
        auto_remove: bool = True,
        reuse_existing: bool = False,
        **kwargs: Any,
    ) -> None:
        self._runtime = runtime or Boxlite.default()
        self._options = BoxOptions(
            image=image,
            rootfs_path=rootfs_path,
            memory_mib=memory_mib,
            cpus=cpus,
            auto_remove=auto_remove,
            **kwargs,
        )
        self._name = name
        self._reuse = reuse_existing
        self._box: Box | None = None
        self._created: bool | None = None

    def _require(self) -> Box:
        if self._box is None:
            raise InvalidStateError(_NOT_STARTED)
        return self._box

    @property
    def id(self) -> str:
        return self._require().id

    @property
    def created(self) -> bool | None:
        return self._created

    def info(self) -> BoxInfo:
        return self._require().info()

    async def start(self) -> SimpleBox:
        if self._box is None:
            if self._reuse:
                self._box, self._created = await self._runtime.get_or_create(
                    self._options, self._name
                )
            else:
                self._box = await self._runtime.create(self._options, self._name)
                self._created = True
        return self

    async def __aenter__(self) -> SimpleBox:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        if self._box is not None:
            await self.stop()

    @_translating
    async def exec(
        self,
        cmd: str,
        *args: str,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        timeout: float | None = None,
        cwd: str | None = None,
    ) -> ExecResult:
        """Run to completion. A non-zero exit is returned, not raised; a timeout raises
        :class:`TimeoutError`."""
        box = self._require()
        if box._native.state in ("created", "stopped", "failed"):
            await box._native.start()
        try:
            r = await box._native.exec(cmd, *args, env=env, user=user, cwd=cwd, timeout=timeout)
        except _e.TimeoutError as e:
            raise TimeoutError(
                f"Command '{' '.join([cmd, *args])}' timed out"
                + (f" after {timeout:g} seconds" if timeout is not None else ""),
                hint=e.hint,
            ) from e
        code = r.exit_code if r.exit_code is not None else -(r.signal or 0)
        return ExecResult(code, r.stdout, r.stderr)

    async def metrics(self) -> BoxMetrics:
        return await self._require().metrics()

    async def stop(self) -> None:
        box = self._require()
        await box.stop()
        self._box = None

    async def shutdown(self) -> None:
        await self.stop()


class CodeBox(SimpleBox):
    """Run Python code in a box of the ``debian-python`` image (see :class:`hutch.CodeBox`)."""

    def __init__(
        self,
        image: str = "debian-python",
        memory_mib: int | None = None,
        cpus: int | None = None,
        runtime: Boxlite | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(image=image, memory_mib=memory_mib, cpus=cpus, runtime=runtime, **kwargs)

    async def run(self, code: str, timeout: float | None = None) -> str:
        """The code's stdout (and stderr, when it failed)."""
        r = await self.exec("python3", "-c", code, timeout=timeout)
        return r.stdout if r.exit_code == 0 else r.stdout + r.stderr

    async def run_script(self, script_path: str) -> str:
        return await self.run(Path(script_path).read_text())

    @_translating
    async def install_packages(self, *packages: str) -> str:
        """Install wheels fetched by the host (the box needs no network): see
        :meth:`hutch.CodeBox.install`."""
        from hutch.codebox import install_into

        box = self._require()
        if box._native.state != "running":
            await box._native.start()
        names = await install_into(box._native, list(packages))
        return "Successfully installed " + " ".join(names) + "\n"

    async def install_package(self, package: str) -> str:
        return await self.install_packages(package)


__all__ = [
    "AlreadyExistsError",
    "Box",
    "BoxInfo",
    "BoxMetrics",
    "BoxOptions",
    "BoxStateInfo",
    "Boxlite",
    "BoxliteError",
    "CodeBox",
    "ConfigError",
    "EngineError",
    "ExecError",
    "ExecResult",
    "ExecStdin",
    "ExecWaitResult",
    "Execution",
    "ImageError",
    "InternalError",
    "InvalidArgumentError",
    "InvalidStateError",
    "NetworkError",
    "NetworkSpec",
    "NotFoundError",
    "Options",
    "ParseError",
    "PortalError",
    "RuntimeMetrics",
    "SimpleBox",
    "StorageError",
    "TimeoutError",
    "UnsupportedEngineError",
]
