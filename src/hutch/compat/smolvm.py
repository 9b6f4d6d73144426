"""A smolvm-style API over hutch: ``from hutch.compat import smolvm``.

Programs written against the smolvm Python SDK's documented API run with only the import changed:

- ``Machine(MachineConfig(name=…))`` only builds the object; ``await machine.start()`` creates and
  starts the box (idempotent); ``Machine.create(config)`` and ``async with with_machine(config)``
  do both. ``async with Machine(config)`` does **not** start it, and on exit stops, deletes and
  closes it, ignoring errors — as smolvm does.
- ``await machine.exec(["cmd", "arg"], env={…}, workdir=…, timeout=…)`` → :class:`ExecResult`
  (``exit_code``, ``stdout``, ``stderr``, ``success``, ``output``, ``assert_success()``); a
  non-zero exit never raises by itself. ``machine.run(image, [cmd])`` runs the command in an
  ephemeral box of another image. ``quick_exec``/``quick_run`` are one-liners.
- ``MachineConfig.server_url``: ``None`` (the default) drives the embedded runtime of the hutch
  home; a URL (``http://HOST:PORT`` or ``unix:///PATH``) drives a ``hutch serve`` through
  :func:`hutch.client.connect` — a server that does not answer raises :class:`ConnectionError`.
- Errors: :class:`SmolvmError` and its subclasses (each also the matching hutch class);
  :class:`ExecutionError` comes only from ``assert_success()``.

``mounts`` become volumes, ``ports`` published TCP ports, ``network=True`` the ``outbound``
network. Not available yet: ``fork``/``branch`` (hutch has ``Box.fork``) and logs.
"""

from __future__ import annotations

import contextlib
import enum
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import hutch
from hutch import errors as _e
from hutch.compat import translating

# --- errors --------------------------------------------------------------------------------


class SmolvmError(_e.HutchError):
    """Base of the facade's errors."""


class ConnectionError(SmolvmError, _e.ConnectionError):  # (smolvm's name)
    pass


class TimeoutError(SmolvmError, _e.TimeoutError):  # (smolvm's name)
    pass


class NotFoundError(SmolvmError, _e.NotFoundError):
    pass


class ConflictError(SmolvmError, _e.ConflictError):
    pass


class BadRequestError(SmolvmError, _e.BadRequestError):
    pass


class InternalError(SmolvmError, _e.InternalError):
    pass


class ExecutionError(SmolvmError):
    """A command failed (raised by :meth:`ExecResult.assert_success`)."""

    def __init__(self, exit_code: int, stdout: str, stderr: str) -> None:
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"Command failed with exit code {exit_code}",
            hint="Inspect exit_code, stdout and stderr on this error.",
        )


_ERRORS: dict[type[_e.HutchError], type[_e.HutchError]] = {
    _e.ConnectionError: ConnectionError,
    _e.TimeoutError: TimeoutError,
    _e.NotFoundError: NotFoundError,
    _e.ConflictError: ConflictError,
    _e.InvalidStateError: ConflictError,  # 409, as the server sends it
    _e.BadRequestError: BadRequestError,
    _e.ImageError: BadRequestError,
    _e.OutputLimitError: BadRequestError,
    _e.UnauthorizedError: SmolvmError,
    _e.HutchError: InternalError,  # everything else is a 5xx: smolvm's InternalError
}
_translating = translating(_ERRORS, SmolvmError)


# --- types ---------------------------------------------------------------------------------


class MachineState(str, enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"


@dataclass
class MountSpec:
    source: str
    target: str
    readonly: bool = False


@dataclass
class PortSpec:
    host: int
    guest: int


@dataclass
class ResourceSpec:
    cpus: int | None = None
    memory_mb: int | None = None
    network: bool | None = None


@dataclass
class MachineConfig:
    name: str
    #: None: the embedded runtime of the hutch home; else a `hutch serve` URL.
    server_url: str | None = None
    image: str | None = None
    mounts: list[MountSpec] = field(default_factory=list)
    ports: list[PortSpec] = field(default_factory=list)
    resources: ResourceSpec | None = None
    network: bool = False
    forkable: bool = False

    def to_native(self) -> hutch.BoxOptions:
        res = self.resources or ResourceSpec()
        native: dict[str, Any] = {
            "image": self.image or "busybox",
            "name": self.name,
            "network": "outbound"
            if self.network or (self.resources is not None and self.resources.network)
            else "none",
            "volumes": [
                hutch.Volume(host_path=m.source, guest_path=m.target, read_only=m.readonly)
                for m in self.mounts
            ],
            "ports": [hutch.Port(host=p.host, guest=p.guest) for p in self.ports],
        }
        if res.cpus is not None:
            native["cpus"] = res.cpus
        if res.memory_mb is not None:
            native["memory_mib"] = res.memory_mb
        try:
            return hutch.BoxOptions(**native)
        except _e.HutchError as e:
            raise BadRequestError(e.message, hint=e.hint) from e


@dataclass
class MachineInfo:
    name: str
    state: MachineState
    mounts: list[MountSpec] = field(default_factory=list)
    ports: list[PortSpec] = field(default_factory=list)
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    network: bool = False
    pid: int | None = None
    restart_count: int | None = None


def _machine_state(state: str) -> MachineState:
    if state in ("starting", "running"):
        return MachineState.RUNNING
    if state == "created":
        return MachineState.CREATED
    return MachineState.STOPPED


@dataclass
class ExecResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def success(self) -> bool:
        return self.exit_code == 0

    @property
    def output(self) -> str:
        if self.stdout and self.stderr:
            return self.stdout + "\n" + self.stderr
        return self.stdout or self.stderr

    def assert_success(self) -> ExecResult:
        if not self.success:
            raise ExecutionError(self.exit_code, self.stdout, self.stderr)
        return self

    def __repr__(self) -> str:
        status = "success" if self.success else f"failed({self.exit_code})"
        return f"ExecResult({status}, stdout={len(self.stdout)}b, stderr={len(self.stderr)}b)"

    @classmethod
    def from_native(cls, r: hutch.ExecResult) -> ExecResult:
        code = r.exit_code if r.exit_code is not None else 128 + (r.signal or 0)
        return cls(code, r.stdout, r.stderr)


# --- runtimes ------------------------------------------------------------------------------

_REMOTES: dict[str, Any] = {}


async def _runtime(server_url: str | None) -> Any:
    """The embedded runtime, or a client of the server at ``server_url`` (one per URL)."""
    if server_url is None:
        return hutch.Runtime.default()
    if server_url not in _REMOTES:
        from hutch.client import connect

        _REMOTES[server_url] = await connect(server_url)
    return _REMOTES[server_url]


# --- machines ------------------------------------------------------------------------------


class Machine:
    """A named box. ``Machine(config)`` builds the object; :meth:`start` creates the box."""

    def __init__(self, config: MachineConfig) -> None:
        self.config = config
        self.name = config.name
        self._box: Any = None
        self._started = False
        self.info: MachineInfo | None = None

    @classmethod
    async def create(cls, config: MachineConfig) -> Machine:
        machine = cls(config)
        await machine.start()
        return machine

    @property
    def is_started(self) -> bool:
        return self._started

    @property
    def state(self) -> MachineState | None:
        return self.info.state if self.info else None

    @property
    def mounts(self) -> list[MountSpec]:
        return list(self.config.mounts)

    @_translating
    async def start(self) -> None:
        """Create the box (or find the stopped one of this name) and start it (idempotent)."""
        if self._started:
            return
        rt = await _runtime(self.config.server_url)
        try:
            self._box = await rt.get(self.name)
        except _e.NotFoundError:
            self._box = await rt.create(self.config.to_native())
        if self._box.state != "running":
            await self._box.start()
        self._started = True
        await self.status()

    @_translating
    async def stop(self) -> None:
        if not self._started or self._box is None:
            return
        await self._box.stop()
        self._started = False
        await self.status()

    @_translating
    async def delete(self) -> None:
        rt = await _runtime(self.config.server_url)
        await rt.remove(self.name, force=True)
        self._box = None
        self._started = False

    async def close(self) -> None:
        """Release this object (the box itself is kept; :meth:`delete` removes it)."""
        self._box = None

    @_translating
    async def status(self) -> MachineInfo:
        rt = await _runtime(self.config.server_url)
        box = await rt.get(self.name)
        outbound = getattr(box.options, "network", "none") == "outbound"
        res = ResourceSpec(
            cpus=box.options.cpus, memory_mb=box.options.memory_mib, network=outbound
        )
        self.info = MachineInfo(
            name=self.name,
            state=_machine_state(box.state),
            mounts=list(self.config.mounts),
            ports=list(self.config.ports),
            resources=res,
            network=outbound,
            pid=getattr(box, "qemu_pid", None),
        )
        return self.info

    @_translating
    async def exec(
        self,
        command: Sequence[str],
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        timeout: int | None = None,
    ) -> ExecResult:
        if not self._started:
            await self.start()
        r = await self._box.exec(*command, env=env, cwd=workdir, timeout=timeout)
        return ExecResult.from_native(r)

    @_translating
    async def run(
        self,
        image: str,
        command: Sequence[str],
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        timeout: int | None = None,
    ) -> ExecResult:
        """Run ``command`` in a fresh ephemeral box of ``image`` (pulled if needed)."""
        rt = await _runtime(self.config.server_url)
        r = await rt.run(image, *command, env=dict(env or {}), workdir=workdir, timeout=timeout)
        return ExecResult.from_native(r)

    @_translating
    async def pull_image(self, image: str, oci_platform: str | None = None) -> None:
        """Pull ``image`` into the hutch home (the server's, with a ``server_url``)."""
        rt = await _runtime(self.config.server_url)
        if self.config.server_url is None:
            from hutch.images.pull import ensure_image

            await ensure_image(image, paths=rt.paths)
        else:
            await rt.pull(image)

    async def __aenter__(self) -> Machine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await self.stop()
        with contextlib.suppress(Exception):
            await self.delete()
        await self.close()


@contextlib.asynccontextmanager
async def with_machine(config: MachineConfig) -> AsyncIterator[Machine]:
    """Create and start a machine; stop and delete it afterwards (errors ignored)."""
    machine = await Machine.create(config)
    try:
        yield machine
    finally:
        async with machine:
            pass


async def quick_exec(
    command: Sequence[str],
    name: str | None = None,
    server_url: str | None = None,
    mounts: list[MountSpec] | None = None,
    env: Mapping[str, str] | None = None,
    workdir: str | None = None,
    timeout: int | None = None,
) -> ExecResult:
    """Run one command in a throw-away machine."""
    config = MachineConfig(
        name=name or f"quick-exec-{int(time.time() * 1000)}",
        server_url=server_url,
        mounts=list(mounts or []),
    )
    async with with_machine(config) as machine:
        return await machine.exec(command, env=env, workdir=workdir, timeout=timeout)


async def quick_run(
    image: str,
    command: Sequence[str],
    name: str | None = None,
    server_url: str | None = None,
    mounts: list[MountSpec] | None = None,
    env: Mapping[str, str] | None = None,
    workdir: str | None = None,
    timeout: int | None = None,
    network: bool = False,
) -> ExecResult:
    """Run one command in a throw-away machine of ``image``."""
    config = MachineConfig(
        name=name or f"quick-run-{int(time.time() * 1000)}",
        server_url=server_url,
        image=image,
        mounts=list(mounts or []),
        network=network,
    )
    async with with_machine(config) as machine:
        return await machine.exec(command, env=env, workdir=workdir, timeout=timeout)


__all__ = [
    "BadRequestError",
    "ConflictError",
    "ConnectionError",
    "ExecResult",
    "ExecutionError",
    "InternalError",
    "Machine",
    "MachineConfig",
    "MachineInfo",
    "MachineState",
    "MountSpec",
    "NotFoundError",
    "PortSpec",
    "ResourceSpec",
    "SmolvmError",
    "TimeoutError",
    "quick_exec",
    "quick_run",
    "with_machine",
]
