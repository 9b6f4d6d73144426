"""A box: one micro-VM booted from an image, and the commands run in it.

Boot path: :meth:`Box.start` reads the set-up manifest (kernel, initramfs, base image), resolves the
accelerator (:mod:`hutch.vm.accel`), makes a qcow2 overlay on the image's read-only base ext4, starts
QEMU (:mod:`hutch.vm.process`), connects to the portal socket and waits for the agent's ``HELLO``
(:mod:`hutch.portal`) — all under one deadline. If the guest never becomes ready, the error carries
the tail of the console log and QEMU is killed.

Snapshots (:mod:`hutch.runtime.snapshots`): :meth:`Box.snapshot` freezes the portal, pauses the VM,
saves its device state and copies its RAM and disk, then resumes it. A box made from a snapshot
(:meth:`Box.clone`, :meth:`Box.fork`, ``Runtime.create(snapshot=…)``) is *restored* by its first
:meth:`Box.start` instead of booted; later starts boot its disk like any box's.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from hutch.errors import (
    BadRequestError,
    ConfigError,
    ConflictError,
    EngineError,
    HutchError,
    InvalidStateError,
    PortalError,
    TimeoutError,
)
from hutch.execution import (
    DEFAULT_MAX_OUTPUT,
    DEFAULT_TERMINAL_SIZE,
    ExecResult,
    Execution,
    terminal_size,
)
from hutch.files import Files
from hutch.guest.kernel import kernel_cmdline
from hutch.images.pull import ensure_image
from hutch.images.store import BOX_IMAGE_FILE, ImageRecord
from hutch.paths import HutchPaths
from hutch.portal import Hello, Identity, PortalChannel, SpawnRequest
from hutch.portal.codec import TTY_MINOR
from hutch.runtime.metrics import (
    CPU_WINDOW,
    BoxMetrics,
    CpuSampler,
    parse_meminfo,
    qemu_rss_bytes,
)
from hutch.runtime.options import BoxOptions, NetworkMode, Port, Volume, check_name
from hutch.runtime.snapshots import (
    RAM_FILE,
    STATE_FILE,
    Snapshot,
    check_folder,
    clone_disk,
    finish_folder,
    flatten_disk,
    freeze_files,
    partial_folder,
    remove_folder,
    snapshots_root,
)
from hutch.runtime.store import BoxRecord, BoxStore, ProcessIdentity, pid_exists
from hutch.setup import Manifest, load_manifest
from hutch.vm import attach
from hutch.vm.accel import resolve_accel
from hutch.vm.cmdline import VmSpec
from hutch.vm.disk import (
    allocated_bytes,
    create_overlay,
    disk_size_bytes,
    grow_overlay,
    storage_error,
)
from hutch.vm.egress import AllowList, EgressProxy, proxy_env
from hutch.vm.migration import load_state, save_state, wait_chardev_open
from hutch.vm.network import NetworkPlan, mac_for
from hutch.vm.process import QemuProcess

log = logging.getLogger("hutch")

DEFAULT_BOOT_TIMEOUT = 30.0
SPAWN_TIMEOUT = 30.0
SHUTDOWN_GRACE = 5.0
#: Deadline for small control messages (shutdown request, ping) to a possibly hung guest.
CONTROL_TIMEOUT = 5.0
#: Deadline for saving a snapshot's state and copying its RAM and disk (the VM is paused).
SNAPSHOT_TIMEOUT = 60.0
#: Most clones one fork() makes.
MAX_FORK = 256
DISK_FILE = "disk.qcow2"


def new_box_id() -> str:
    """Unique, sortable by creation time: 11 hex digits of milliseconds + 6 random hex digits."""
    return f"{int(time.time() * 1000):011x}{secrets.token_hex(3)}"


_STORES: dict[Path, BoxStore] = {}


def store_for(paths: HutchPaths) -> BoxStore:
    """This process's one connection to a home's runtime store (opened on first use)."""
    store = _STORES.get(paths.home)
    if store is None:
        store = _STORES[paths.home] = BoxStore.for_home(paths)
    return store


def sweep_stale_run_dirs(paths: HutchPaths) -> None:
    """Remove run folders (sockets, RAM files) whose owning process is gone.

    Their QEMU died with the owner (``--pdeathsig``), but a RAM file on tmpfs would otherwise hold
    the guest's memory forever.
    """
    if not paths.run.is_dir():
        return
    for d in paths.run.iterdir():
        try:  # "PID START" (or a bare PID, as older versions wrote)
            owner = int((d / "owner").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            owner = 0
        if owner and pid_exists(owner):
            continue
        try:  # a folder another process made a moment ago may not have its owner file yet
            if not owner and time.time() - d.stat().st_mtime < 10:
                continue
        except OSError:
            continue
        shutil.rmtree(d, ignore_errors=True)


def _argv(cmd: Sequence[str | Sequence[str]]) -> list[str]:
    if len(cmd) == 1 and not isinstance(cmd[0], str):
        cmd = tuple(cmd[0])
    argv = [str(c) for c in cmd]
    if not argv:
        raise BadRequestError(
            "no command given", hint='Pass the program and its arguments, e.g. exec("ls", "-l").'
        )
    for a in argv:
        if "\0" in a:
            raise BadRequestError(f"command argument {a!r} contains a NUL byte")
    return argv


def _env_pairs(env: Mapping[str, str] | None) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for k, v in (env or {}).items():
        if not k or "=" in k or "\0" in k or "\0" in str(v):
            raise BadRequestError(
                f"invalid environment variable name or value: {k!r}",
                hint="Names must be non-empty and contain no '=' or NUL; values no NUL.",
            )
        pairs.append((k, str(v)))
    return pairs


MIB = 1024 * 1024


def check_disk_size(want_mib: int, base_bytes: int, image: str) -> None:
    """``disk_size_mib`` may grow an image's disk, never shrink it (ext4 cannot shrink online)."""
    base_mib = -(-base_bytes // MIB)
    if want_mib < base_mib:
        raise ConfigError(
            f"disk_size_mib must be at least {base_mib} for image {image!r} (the size of its "
            f"disk), not {want_mib}",
            hint="Leave disk_size_mib unset for the image's size, or lower [images] base_size "
            "in config.toml (it applies to images converted after the change).",
        )


async def release_snapshot(paths: HutchPaths, store: BoxStore, snapshot_id: str) -> bool:
    """Remove an ``auto_remove`` snapshot (made by clone()/fork()) once no box uses it; returns
    whether it was removed."""
    try:
        gone = await asyncio.to_thread(store.delete_snapshot, snapshot_id, only_auto=True)
    except HutchError as e:
        log.warning("snapshot %s: could not release it: %s", snapshot_id, e.message)
        return False
    if gone:
        await asyncio.to_thread(remove_folder, paths, snapshot_id)
    return gone


class Box:
    """A micro-VM sandbox. ``async with Box() as box:`` boots it and removes it afterwards."""

    def __init__(
        self,
        image: str = "busybox",
        *,
        cpus: int = 1,
        memory_mib: int = 256,
        accel: str = "auto",
        name: str | None = None,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
        home: Path | str | None = None,
        kernel_args: Sequence[str] = (),
        disk_size_mib: int | None = None,
        ports: Sequence[Port] = (),
        volumes: Sequence[Volume] = (),
        network: NetworkMode = "none",
        allow: Sequence[str] = (),
        id: str | None = None,
        _options: BoxOptions | None = None,
    ) -> None:
        #: The validated options (one rule set, shared with the Runtime and the store).
        self.options = _options or BoxOptions(
            image=image,
            name=name,
            cpus=cpus,
            memory_mib=memory_mib,
            accel=accel,
            boot_timeout=boot_timeout,
            disk_size_mib=disk_size_mib,
            ports=ports,
            volumes=volumes,
            network=network,
            allow=allow,
        )
        self.id = id or new_box_id()
        self.name = name or f"hutch-{self.id[-6:]}"
        self.image = image
        self.cpus = cpus
        self.memory_mib = memory_mib
        self.accel_requested = accel
        self.accel: str | None = None
        self.boot_timeout = boot_timeout
        self.paths = HutchPaths(Path(home).absolute()) if home else HutchPaths.default()
        self.kernel_args = list(kernel_args)
        self.state = "created"
        self.hello: Hello | None = None
        self.boot_ms: float | None = None
        #: The stored image the box runs (set by start(); its config supplies exec defaults).
        self.image_record: ImageRecord | None = None
        #: Milliseconds start() spent resolving (or pulling) the image.
        self.image_ms: float | None = None
        #: Why a running box turned ``failed`` (set by the watcher), else None.
        self.failure: HutchError | None = None
        self._qemu: QemuProcess | None = None
        self._channel: PortalChannel | None = None
        self._watcher: asyncio.Task[None] | None = None
        #: Processes started in this box by this process, and exec/spawn calls that failed.
        self.commands = 0
        self.errors = 0
        #: How often the box turned ``failed`` (a start that failed, or a VM that died).
        self.failures = 0
        self._cpu = CpuSampler()
        self._cpu_last: tuple[float, float] | None = None
        #: Whether the box has a row in the runtime store yet (a plain Box gets one at start).
        self._recorded = False
        #: Set when another live process owns (runs) this box: it cannot be driven from here.
        self._foreign_owner: int | None = None
        #: The snapshot this box was made from (its first start restores it), else None.
        self.snapshot_id: str | None = None
        #: Milliseconds the last restore took (QEMU launch → the agent's HELLO), else None.
        self.restore_ms: float | None = None
        self._snapshot_lock = asyncio.Lock()
        #: Set by a Runtime for the boxes it tracks: clones made by clone()/fork() join it.
        self._adopt: Callable[[Box], None] | None = None
        #: The ports published while running, host port 0 resolved (see :attr:`ports`).
        self._published: tuple[Port, ...] | None = None
        self._egress: EgressProxy | None = None  # an allowlist box's proxy, while it runs

    @classmethod
    def _from_options(
        cls, options: BoxOptions, *, home: Path, id: str | None = None, name: str | None = None
    ) -> Box:
        return cls(
            options.image,
            cpus=options.cpus,
            memory_mib=options.memory_mib,
            accel=options.accel,
            name=name if name is not None else options.name,
            boot_timeout=options.boot_timeout,
            home=home,
            id=id,
            _options=options,
        )

    @classmethod
    def from_snapshot(
        cls, snapshot: Snapshot, *, name: str | None = None, home: Path | str | None = None
    ) -> Box:
        """A new box (not started) made from ``snapshot``: its first :meth:`start` resumes the
        snapshot's VM (copy-on-write RAM, its own disk overlay on the snapshot's disk) with a new
        identity (hostname = the box's name, RNG reseeded, clock set) instead of booting."""
        options = dataclasses.replace(snapshot.options, name=name)
        paths = HutchPaths(Path(home).absolute()) if home else HutchPaths.default()
        box = cls._from_options(options, home=paths.home, name=name)
        box.snapshot_id = snapshot.id
        return box

    @classmethod
    def _from_record(cls, rec: BoxRecord, *, home: Path) -> Box:
        """A Box object for a stored box (made by another process, or earlier by this one)."""
        box = cls._from_options(rec.options, home=home, id=rec.id, name=rec.name)
        box.snapshot_id = rec.snapshot_id
        box._recorded = True
        box.state = rec.state
        box.boot_ms = rec.boot_ms
        box.accel = rec.accel
        if rec.active:
            owner = rec.owner
            me = ProcessIdentity.current()
            if owner is not None and owner.alive() and owner.pid != me.pid:
                box._foreign_owner = owner.pid
        if rec.state == "failed" and rec.failure:
            box.failure = HutchError(rec.failure)
        return box

    # --- persistence (the runtime store: HOME/runtime.db) ----------------------------------
    def _store(self) -> BoxStore:
        return store_for(self.paths)

    async def _persist(self, what: str, call: Callable[[], object], *, strict: bool) -> None:
        """Run one store call off the loop. ``strict`` errors propagate (the start CAS); others
        are logged: the store catches up through crash recovery (dead owner → stopped)."""
        try:
            await asyncio.to_thread(call)
        except HutchError as e:
            if strict:
                raise
            log.warning("box %s: could not record %s in the store: %s", self.id, what, e.message)

    async def _claim_start(self, restoring: bool) -> None:
        store = self._store()
        if not self._recorded:
            rec = BoxRecord.new(
                self.options, id=self.id, name=self.name, snapshot_id=self.snapshot_id
            )
            await asyncio.to_thread(store.insert, rec)
            self._recorded = True
        how = f" (restoring snapshot {self.snapshot_id})" if restoring else ""
        await asyncio.to_thread(
            store.claim,
            self.id,
            state="starting",
            expect={"created", "stopped", "failed"},
            event=("start", f"by pid {os.getpid()}{how}"),
        )

    def _check_host(self) -> None:
        """Before claiming the start: the host facts the options rely on (volume paths still
        there, fixed host ports free), so a refused start leaves the box as it was."""
        self.options.validate()
        attach.check_ports(self.options)

    def _check_owner(self) -> None:
        if self._foreign_owner is not None:
            raise InvalidStateError(
                f"box {self.id} is {self.state} in another process (pid {self._foreign_owner})",
                hint="A box's VM belongs to the process that started it; drive it from there, "
                "or stop that process (the next runtime marks the box stopped).",
            )

    # --- paths ----------------------------------------------------------------------------
    @property
    def box_dir(self) -> Path:
        return self.paths.boxes / self.id

    @property
    def run_dir(self) -> Path:
        return self.paths.run / self.id

    @property
    def console_log(self) -> Path:
        return self.box_dir / "console.log"

    @property
    def qemu_pid(self) -> int | None:
        return self._qemu.pid if self._qemu and self._qemu.running else None

    @property
    def ports(self) -> tuple[Port, ...]:
        """The published ports: while running, as bound (a host port 0 replaced by the port
        picked); otherwise as asked for."""
        return self._published if self._published is not None else tuple(self.options.ports)

    def __repr__(self) -> str:
        return f"<Box {self.id} {self.image} {self.state}>"

    # --- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Boot the VM and wait until its agent answers (bounded by ``boot_timeout``)."""
        if self.state == "running":
            return
        if self.state not in ("created", "stopped", "failed"):
            raise InvalidStateError(
                f"cannot start box {self.id} while it is {self.state}",
                hint="Wait for the current start/stop to finish.",
            )
        self._check_owner()
        self._check_host()
        if self.state == "failed":
            await self._teardown()  # what is left of the failed VM: watcher, QEMU, sockets
        # A box made from a snapshot is restored until it has a disk of its own.
        restoring = self.snapshot_id is not None and not (self.box_dir / DISK_FILE).exists()
        await self._claim_start(restoring)  # compare-and-set in the store: one starter wins
        self.state = "starting"
        self.failure = None
        t0 = time.monotonic()
        try:
            # The image first (a pull can take minutes: it has its own deadlines and progress),
            # then the boot under boot_timeout.
            manifest = load_manifest(self.paths)
            self.image_record = record = await ensure_image(self.image, paths=self.paths)
            self.image_ms = (time.monotonic() - t0) * 1000.0
            deadline = time.monotonic() + self.boot_timeout
            if restoring:
                await self._restore(manifest, record, t0, deadline)
            else:
                await self._boot(manifest, record, t0, deadline)
        except BaseException as e:
            self.state = "failed"
            self.failures += 1
            await self._teardown()
            if restoring:  # its disk only makes sense with the RAM it resumed with: next start
                (self.box_dir / DISK_FILE).unlink(missing_ok=True)  # restores again
            why = e.message if isinstance(e, HutchError) else (str(e) or type(e).__name__)
            await self._persist(
                "the failed start",
                lambda: self._store().update_state(
                    self.id,
                    "failed",
                    release=True,
                    failure=why,
                    stopped_at=time.time(),
                    event=("start-failed", why),
                ),
                strict=False,
            )
            raise
        self.state = "running"
        await self._persist(
            "the running state",
            lambda: self._store().update_state(
                self.id,
                "running",
                expect={"starting"},
                image_id=self.image_record.id if self.image_record else None,
                qemu_pid=self.qemu_pid,
                accel=self.accel,
                started_at=time.time(),
                boot_ms=self.boot_ms,
                event=("ports", attach.describe(self._published)) if self._published else None,
            ),
            strict=False,
        )

    async def _boot(
        self, manifest: Manifest, record: ImageRecord, t0: float, deadline: float
    ) -> None:
        base = record.base_path
        verdict = await resolve_accel(
            self.accel_requested, self.paths, manifest.kernel_path, manifest.initramfs_path
        )
        self.accel = verdict.accel
        # The probe itself logs a warning when it falls back to TCG; later boxes just note it.
        log.info("box %s: accelerator %s (%s)", self.id, verdict.accel, verdict.reason)
        sweep_stale_run_dirs(self.paths)
        disk = self.box_dir / DISK_FILE
        self._prepare_dirs(record)
        if not disk.exists():
            await create_overlay(base, disk)
        extra_args = await self._size_disk(base, disk)
        io = attach.prepare(self.options, self.id, self.run_dir)  # volumes, NIC, ports
        await self._start_egress(io.net)
        extra_args += io.kernel_args
        spec = VmSpec(
            kernel=manifest.kernel_path,
            initramfs=manifest.initramfs_path,
            root_disk=disk,
            cmdline=kernel_cmdline([f"hutch.hostname={self.name}", *extra_args, *self.kernel_args]),
            portal_socket=self.run_dir / "portal.sock",
            qmp_socket=self.run_dir / "qmp.sock",
            console_log=self.console_log,
            ram_file=self.run_dir / "ram",
            accel=verdict.accel,
            cpus=self.cpus,
            memory_mib=self.memory_mib,
            devices=io.devices,
            spawns=io.net is not None and io.net.proxy_socket is not None,
            launcher=io.launcher,
        )
        qemu = self._qemu = await QemuProcess.start(spec, self.box_dir / "qemu.log")
        channel = self._channel = await self._connect(qemu, spec.portal_socket, deadline)
        self.hello = await self._wait_hello(qemu, channel, deadline)
        self._published = await attach.finish(qemu, self.hello, io, deadline)
        attach.write_ports(self.box_dir, self._published)
        self.boot_ms = (time.monotonic() - t0) * 1000.0
        self._watcher = asyncio.get_running_loop().create_task(self._watch(qemu, channel))

    def _prepare_dirs(self, record: ImageRecord) -> None:
        try:
            self.box_dir.mkdir(parents=True, exist_ok=True)
            self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            me = ProcessIdentity.current()  # "PID START": survives pid reuse
            (self.run_dir / "owner").write_text(f"{me.pid} {me.start}")
            (self.box_dir / BOX_IMAGE_FILE).write_text(record.id)
            self.console_log.write_bytes(b"")
        except OSError as e:
            raise storage_error(Path(e.filename or self.box_dir), e) from e

    async def _restore(
        self, manifest: Manifest, record: ImageRecord, t0: float, deadline: float
    ) -> None:
        """Resume the snapshot's VM as this box (see docs/ARCHITECTURE.md, *Snapshots*).

        QEMU starts with the snapshot's machine command line, paused, waiting for an incoming
        migration; its RAM is the snapshot's RAM file mapped copy-on-write and its disk a new
        overlay on the snapshot's disk. The state file is read (``migrate-incoming``); the portal
        is connected *before* the VM resumes, so the guest's port never sees its host leave; then
        RESTORE gives the agent its new identity and the HELLO answering it ends the restore."""
        assert self.snapshot_id is not None
        snap = await asyncio.to_thread(self._store().get_snapshot, self.snapshot_id)
        folder = snap.folder(self.paths)
        check_folder(folder)
        if (snap.cpus, snap.memory_mib) != (self.cpus, self.memory_mib):
            raise ConfigError(
                f"box {self.id}: cpus/memory_mib must be the snapshot's "
                f"({snap.cpus}/{snap.memory_mib}), not {self.cpus}/{self.memory_mib}"
            )
        self.accel = snap.accel
        sweep_stale_run_dirs(self.paths)
        self._prepare_dirs(record)
        disk = self.box_dir / DISK_FILE
        clone_disk(folder, disk)
        kernel, initramfs = Path(snap.kernel), Path(snap.initramfs)
        if not (kernel.is_file() and initramfs.is_file()):  # rebuilt since: the state has
            kernel, initramfs = manifest.kernel_path, manifest.initramfs_path  # the RAM anyway
        io = attach.net_devices(self.options, self.id, self.run_dir)  # the snapshot's NIC
        await self._start_egress(io.net)
        spec = VmSpec(
            kernel=kernel,
            initramfs=initramfs,
            root_disk=disk,
            cmdline=snap.cmdline,
            portal_socket=self.run_dir / "portal.sock",
            qmp_socket=self.run_dir / "qmp.sock",
            console_log=self.console_log,
            ram_file=folder / RAM_FILE,
            accel=snap.accel,
            cpus=snap.cpus,
            memory_mib=snap.memory_mib,
            ram_shared=False,
            incoming=True,
            devices=io.devices,
            spawns=io.net is not None and io.net.proxy_socket is not None,
        )
        try:
            state_fd = os.open(folder / STATE_FILE, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise storage_error(folder / STATE_FILE, e) from e
        try:
            qemu = self._qemu = await QemuProcess.start(
                spec, self.box_dir / "qemu.log", pass_fds=(state_fd,)
            )
        finally:
            os.close(state_fd)
        connect = asyncio.ensure_future(
            self._connect(qemu, spec.portal_socket, deadline, restoring=True)
        )
        try:
            async with qemu.qmp_session(deadline) as qmp:
                await load_state(qmp, state_fd, deadline)
                channel = self._channel = await connect
                await wait_chardev_open(qmp, "portal", deadline)
                await channel.restore(self._identity())
                await qmp.execute("cont")
        except EngineError as e:
            raise EngineError(
                f"box {self.id}: restoring snapshot {snap.id} failed: {e.message}\n"
                f"{qemu.diagnostics()}",
                hint="Remove the snapshot and take it again if it keeps failing (it may come "
                "from another QEMU version).",
            ) from None
        finally:
            if not connect.done():
                connect.cancel()
                with contextlib.suppress(BaseException):
                    await connect
        self.hello = await self._wait_hello(qemu, channel, deadline)
        self._published = await attach.finish(qemu, self.hello, io, deadline)
        attach.write_ports(self.box_dir, self._published)
        self.boot_ms = (time.monotonic() - t0) * 1000.0
        self.restore_ms = self.boot_ms - (self.image_ms or 0.0)
        self._watcher = asyncio.get_running_loop().create_task(self._watch(qemu, channel))

    async def _size_disk(self, base: Path, disk: Path) -> list[str]:
        """Apply ``disk_size_mib``: grow the overlay, and ask the agent to grow the filesystem."""
        want_mib = self.options.disk_size_mib
        if want_mib is None:
            return []
        base_bytes = base.stat().st_size
        check_disk_size(want_mib, base_bytes, self.image)
        if disk_size_bytes(disk) < want_mib * MIB:
            await grow_overlay(disk, want_mib * MIB)
        return ["hutch.grow=1"] if want_mib * MIB > base_bytes else []

    def _not_ready(self, qemu: QemuProcess, what: str) -> HutchError:
        if not qemu.running and (why := attach.failure(qemu, self.options)) is not None:
            return why  # a published host port taken since _check_host
        if not qemu.running:
            return EngineError(
                f"box {self.id}: QEMU exited with status {qemu.returncode} {what}\n"
                f"{qemu.diagnostics()}"
            )
        return TimeoutError(
            f"box {self.id}: the guest did not become ready within {self.boot_timeout:g} s "
            f"({what})\n{qemu.diagnostics()}",
            hint="Raise boot_timeout on a loaded host, or check the console tail above; "
            "`hutch doctor` checks the kernel and accelerator.",
        )

    async def _connect(
        self, qemu: QemuProcess, sock: Path, deadline: float, *, restoring: bool = False
    ) -> PortalChannel:
        while True:
            if not qemu.running or time.monotonic() > deadline:
                raise self._not_ready(qemu, "before its portal socket accepted a connection")
            try:
                return await PortalChannel.connect_unix(str(sock), restoring=restoring)
            except (FileNotFoundError, ConnectionRefusedError):
                await asyncio.sleep(0.002 if restoring else 0.005)

    async def _wait_hello(
        self, qemu: QemuProcess, channel: PortalChannel, deadline: float
    ) -> Hello:
        exited = asyncio.ensure_future(qemu.wait())
        waiters: set[asyncio.Future[Any]] = {channel.hello, exited}
        try:
            done, _ = await asyncio.wait(
                waiters,
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            exited.cancel()
        if channel.hello in done:
            try:
                return channel.hello.result()
            except PortalError as e:
                if "protocol" in e.message:
                    raise
            await qemu.wait(1.0)  # a dying QEMU closes the portal first: attribute it correctly
        raise self._not_ready(qemu, "before the agent said hello")

    async def _watch(self, qemu: QemuProcess, channel: PortalChannel) -> None:
        """While running: QEMU exiting, or the portal failing (e.g. a protocol violation by the
        guest), marks the box failed; in the second case the VM is stopped too."""
        exited = asyncio.ensure_future(qemu.wait())
        broken = asyncio.ensure_future(channel.closed_event.wait())
        guard = asyncio.ensure_future(qemu.guard_console())
        try:
            await asyncio.wait({exited, broken}, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():  # a dying QEMU closes the portal first: attribute it correctly
                await asyncio.wait({exited}, timeout=0.5)
        finally:
            exited.cancel()
            broken.cancel()
            guard.cancel()
        if self.state != "running":
            return
        self.state = "failed"
        self.failures += 1
        if qemu.running:
            reason = channel.close_reason
            self.failure = (
                reason
                if isinstance(reason, HutchError)
                else PortalError(f"portal failed: {reason}")
            )
            log.warning("box %s: %s; stopping the VM", self.id, self.failure.message)
            await qemu.stop(grace=1.0)
        else:
            self.failure = EngineError(
                f"the VM exited unexpectedly (status {qemu.returncode})\n{qemu.diagnostics()}"
            )
            log.warning("box %s: QEMU exited unexpectedly (status %s)", self.id, qemu.returncode)
        await channel.close(f"box {self.id} failed: {self.failure.message}")
        failure = self.failure.message
        await self._persist(
            "the failure",
            lambda: self._store().update_state(
                self.id, "failed", release=True, failure=failure, stopped_at=time.time()
            ),
            strict=False,
        )

    async def stop(self) -> None:
        """Shut the guest down (processes get SIGTERM, then SIGKILL); the disk is kept."""
        if self.state in ("created", "stopped", "removed"):
            return
        self._check_owner()
        self.state = "stopping"
        try:
            if self._channel is not None and self._qemu is not None and self._qemu.running:
                # Bounded: a hung guest that stopped reading must not hang stop() on a full socket.
                with contextlib.suppress(PortalError, builtins.TimeoutError):
                    await asyncio.wait_for(self._channel.shutdown(), CONTROL_TIMEOUT)
                if await self._qemu.wait(SHUTDOWN_GRACE) is None:
                    log.warning("box %s: guest did not power off in time; stopping QEMU", self.id)
        finally:
            await self._teardown()
            self.state = "stopped"
            if self._recorded:
                await self._persist(
                    "the stop",
                    lambda: self._store().update_state(
                        self.id, "stopped", release=True, stopped_at=time.time(), qemu_pid=None
                    ),
                    strict=False,
                )

    async def _start_egress(self, net: NetworkPlan | None) -> None:
        """An allowlist box's filtering proxy, listening before QEMU starts (:mod:`hutch.vm.egress`)."""
        if net is None or net.proxy_socket is None:
            return
        allow = AllowList.parse(self.options.allow)
        self._egress = await EgressProxy.start(net.proxy_socket, allow, self.id)

    async def _teardown(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        egress_proxy, self._egress = self._egress, None
        if egress_proxy is not None:
            await egress_proxy.close()
        if self._qemu is not None:
            await self._qemu.stop()
            self._qemu = None
        if self._channel is not None:
            await self._channel.close(f"box {self.id} is stopped")
            self._channel = None
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self._published = None
        attach.clear_ports(self.box_dir)

    async def remove(self) -> None:
        """Stop the box if needed and delete its disk and logs (and the snapshot it was cloned
        from, if that was made by clone()/fork() and this was its last box)."""
        if self.state == "removed":
            return
        await self.stop()
        shutil.rmtree(self.box_dir, ignore_errors=True)
        if self._recorded:
            await self._persist(
                "the removal",
                lambda: self._store().delete(self.id, missing_ok=True),
                strict=False,
            )
        self.state = "removed"
        if self.snapshot_id is not None:
            await release_snapshot(self.paths, self._store(), self.snapshot_id)

    async def __aenter__(self) -> Box:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.remove()

    # --- commands -------------------------------------------------------------------------
    def _require_channel(self) -> PortalChannel:
        self._check_owner()
        if self.state == "failed" and self.failure is not None:
            raise InvalidStateError(
                f"box {self.id} failed: {self.failure.message}",
                hint="Start it again (its disk is kept), or remove it.",
            )
        if self.state != "running" or self._channel is None:
            raise InvalidStateError(
                f"box {self.id} is {self.state}, not running",
                hint="Call `await box.start()` first (or use `async with Box(...)`).",
            )
        return self._channel

    @property
    def files(self) -> Files:
        """File access in the running guest: read/write/list/stat/mkdir/remove/chmod and tree
        upload/download (:class:`hutch.files.Files`)."""
        return Files(self)

    def default_command(self) -> list[str]:
        """The image's Entrypoint + Cmd (what ``exec()`` with no command runs)."""
        config = self.image_record.config if self.image_record else None
        argv = [*config.entrypoint, *config.cmd] if config else []
        if not argv:
            raise BadRequestError(
                f"image {self.image!r} defines no Entrypoint or Cmd",
                hint="Pass the command to run, e.g. exec('sh', '-c', '…').",
            )
        return argv

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
    ) -> Execution:
        """Start a process; stream its output with ``async for chunk in execution.stdout``.

        With no command, runs the image's Entrypoint + Cmd. The image's Env, WorkingDir and User
        apply unless ``env`` (merged over the image's), ``cwd`` or ``user`` say otherwise.

        ``timeout`` (seconds) is enforced in the guest: the process group is killed when it
        expires and :meth:`Execution.wait` raises :class:`~hutch.errors.TimeoutError`.
        With ``stdin=False`` the process reads ``/dev/null``.

        ``tty=True`` runs it on a terminal of ``term_size`` = (rows, columns) (default 24×80)
        with ``TERM=xterm-256color`` unless ``env`` sets it: output arrives on ``stdout`` only,
        and :meth:`Execution.resize` changes the size (see :mod:`hutch.execution`).
        """
        channel = self._require_channel()
        size = None
        if tty:
            size = terminal_size(*(term_size or DEFAULT_TERMINAL_SIZE))
            hello = self.hello
            if hello is None or hello.minor < TTY_MINOR:
                raise InvalidStateError(
                    f"box {self.id}: its guest agent has no terminals (protocol "
                    f"1.{hello.minor if hello else 0}, terminals need 1.{TTY_MINOR})",
                    hint="Run `hutch setup` to rebuild the agent, then restart the box.",
                )
            env = {"TERM": "xterm-256color", **(env or {})}
            stdin = True
        elif term_size is not None:
            raise BadRequestError("term_size needs tty=True")
        config = self.image_record.config if self.image_record else None
        if not cmd and config is not None:
            cmd = tuple(self.default_command())
        argv = _argv(cmd)
        # Defaults, weakest first: the proxy of an allowlist box, the image's Env/WorkingDir/User,
        # then the box's options.
        opts = self.options
        proxy = proxy_env() if opts.network == "allowlist" else {}
        env = {**proxy, **(dict(config.env) if config else {}), **opts.env, **(env or {})}
        if cwd is None:
            cwd = opts.workdir or (config.working_dir if config else None) or None
        if user is None:
            user = opts.user or (config.user if config else None) or None
        if timeout is not None and not 0 < timeout <= 86400 * 7:
            raise BadRequestError(f"timeout must be between 0 and one week, not {timeout}")
        request = SpawnRequest(
            argv=argv,
            env=_env_pairs(env),
            cwd=cwd,
            user=None if user is None else str(user),
            timeout_ms=max(1, int(timeout * 1000)) if timeout is not None else 0,
            stdin=stdin,
            tty=size,
        )
        try:
            stream = await channel.spawn(request)
            try:
                pid = await asyncio.wait_for(asyncio.shield(stream.started), SPAWN_TIMEOUT)
            except builtins.TimeoutError:
                raise TimeoutError(
                    f"the guest did not start {argv!r} within {SPAWN_TIMEOUT:g} s"
                ) from None
        except HutchError:
            self.errors += 1
            raise
        self.commands += 1
        return Execution(stream, pid, timeout, max_output_bytes, tty=tty)

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
        """Run a command to completion and return its output (see :class:`ExecResult`).

        With ``tty=True`` the output is what the terminal showed, on ``stdout``; ``stdin`` is
        typed into the terminal and ended like Ctrl-D does."""
        execution = await self.spawn(
            *cmd,
            env=env,
            cwd=cwd,
            user=user,
            timeout=timeout,
            stdin=stdin is not None,
            max_output_bytes=max_output_bytes,
            tty=tty,
            term_size=term_size,
        )
        feeder: asyncio.Task[None] | None = None
        if stdin is not None:
            data = stdin.encode() if isinstance(stdin, str) else bytes(stdin)

            async def feed() -> None:
                await execution.stdin.write(data)
                await execution.stdin.close()

            feeder = asyncio.get_running_loop().create_task(feed())
        try:
            return await execution.wait()
        except HutchError:
            self.errors += 1
            raise
        finally:
            if feeder is not None:
                if not feeder.done():
                    feeder.cancel()
                with contextlib.suppress(asyncio.CancelledError, HutchError):
                    await feeder

    async def metrics(self) -> BoxMetrics:
        """Counters, timings, QEMU's CPU and memory, and the guest's memory use.

        CPU use is measured since the previous ``metrics()`` call (the first call samples a
        short window). Resource figures are 0 when the box is not running."""
        cpu_percent, mem_total, mem_used, rss = 0.0, 0, 0, 0
        pid = self.qemu_pid
        if self.state == "running" and pid is not None and self._foreign_owner is None:
            before = self._cpu_last or self._cpu.sample(pid)
            if self._cpu_last is None:
                await asyncio.sleep(CPU_WINDOW)
            after = self._cpu.sample(pid)
            if before is not None and after is not None:
                cpu_percent = self._cpu.percent(before, after)
                self._cpu_last = after
            rss = qemu_rss_bytes(pid)
            meminfo = await self._internal_exec("cat", "/proc/meminfo")
            mem_total, mem_used = parse_meminfo(meminfo)
        guest_boot = self.hello.boot_ready_us / 1000.0 if self.hello else None
        return BoxMetrics(
            commands=self.commands,
            errors=self.errors,
            total_create_ms=self.boot_ms,
            guest_boot_ms=guest_boot,
            image_ms=self.image_ms,
            cpu_percent=round(cpu_percent, 1),
            memory_bytes=mem_used,
            memory_total_bytes=mem_total,
            qemu_rss_bytes=rss,
        )

    async def _internal_exec(self, *argv: str) -> str:
        """A small command of hutch's own (not counted in the box's commands)."""
        channel = self._require_channel()
        stream = await channel.spawn(SpawnRequest(argv=list(argv), stdin=False))
        pid = await asyncio.wait_for(asyncio.shield(stream.started), SPAWN_TIMEOUT)
        result = await asyncio.wait_for(
            Execution(stream, pid, None, 1 << 20).wait(), CONTROL_TIMEOUT
        )
        return result.stdout

    # --- snapshots and clones ---------------------------------------------------------------
    async def snapshot(self, name: str | None = None) -> Snapshot:
        """Freeze this running box into a snapshot (RAM, device state, disk) and let it run on.

        The VM is paused for the copy (tens of milliseconds for a small guest); processes in it
        keep running afterwards, and commands sent meanwhile wait. The snapshot is recorded in
        the home's store until ``Runtime.remove_snapshot``; boxes made from it
        (``Runtime.create(snapshot=…)``) resume where this box was."""
        return await self._snapshot(name, auto_remove=False)

    async def clone(self, *, name: str | None = None) -> Box:
        """A running copy of this box: a snapshot, restored as a new box with its own name,
        hostname, RNG seed and disk overlay. The snapshot goes with its last clone."""
        return (await self.fork(1, names=None if name is None else [name]))[0]

    async def fork(self, n: int, *, names: Sequence[str] | None = None) -> builtins.list[Box]:
        """``n`` running copies of this box from one snapshot, restored concurrently (see
        :meth:`clone`). If any fails, all are removed and the error is raised."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_FORK:
            raise BadRequestError(f"fork() makes 1 to {MAX_FORK} boxes, not {n!r}")
        if names is not None:
            names = [check_name(x, "clone name") for x in names]
            if len(names) != n or len(set(names)) != n:
                raise BadRequestError(f"fork({n}) needs {n} different names, not {names!r}")
        snap = await self._snapshot(None, auto_remove=True)
        boxes = [
            Box.from_snapshot(snap, name=names[i] if names else None, home=self.paths.home)
            for i in range(n)
        ]
        results = await asyncio.gather(*(b.start() for b in boxes), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await asyncio.gather(*(b.remove() for b in boxes), return_exceptions=True)
            await release_snapshot(self.paths, self._store(), snap.id)
            raise errors[0]
        if self._adopt is not None:
            for b in boxes:
                self._adopt(b)
        return boxes

    async def _snapshot(self, name: str | None, *, auto_remove: bool) -> Snapshot:
        if name is not None:
            check_name(name, "snapshot name")
        channel = self._require_channel()
        qemu, hello, record = self._qemu, self.hello, self.image_record
        assert qemu is not None and record is not None
        if self.options.volumes:
            raise ConfigError(
                f"box {self.id} has volumes: it cannot be snapshotted (QEMU cannot save a "
                "mounted virtio-9p share)",
                hint="Snapshot a box without volumes, and copy data in with exec(stdin=…).",
            )
        if hello is None or hello.minor < 1:
            raise InvalidStateError(
                f"box {self.id}: its guest agent predates snapshots",
                hint="Run `hutch setup` (it rebuilds the agent), then stop and start the box.",
            )
        store = self._store()
        if name is not None and await asyncio.to_thread(store.find_snapshot, name) is not None:
            raise ConflictError(
                f"the snapshot name {name!r} is already taken",
                hint="Pick another name, or remove the old snapshot first.",
            )
        snap_id = new_box_id()
        partial = partial_folder(self.paths, snap_id)
        final = snapshots_root(self.paths) / snap_id
        async with self._snapshot_lock:
            try:
                partial.mkdir(parents=True)
            except OSError as e:
                raise storage_error(partial, e) from e
            try:
                ram_bytes, state_bytes = await self._freeze_into(channel, qemu, partial)
                if self.snapshot_id is not None:  # a clone: its disk is on another snapshot's
                    lower = snapshots_root(self.paths) / self.snapshot_id / DISK_FILE
                    await asyncio.to_thread(flatten_disk, partial, lower)
                disk_bytes = allocated_bytes(partial / DISK_FILE)
                await asyncio.to_thread(finish_folder, partial, final, record.id)
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)
                raise
        snap = Snapshot(
            id=snap_id,
            name=name,
            source_box=self.id,
            image=self.image,
            image_id=record.id,
            options=dataclasses.replace(self.options, name=None),
            accel=self.accel or qemu.spec.accel,
            kernel=str(qemu.spec.kernel),
            initramfs=str(qemu.spec.initramfs),
            cmdline=qemu.spec.cmdline,
            ram_bytes=ram_bytes,
            disk_bytes=disk_bytes,
            state_bytes=state_bytes,
            auto_remove=auto_remove,
        )
        if not self._recorded:  # a plain Box is recorded at its start; be safe
            await asyncio.to_thread(store.insert, BoxRecord.new(self.options, id=self.id))
            self._recorded = True
        try:
            await asyncio.to_thread(store.insert_snapshot, snap)
        except BaseException:
            await asyncio.to_thread(remove_folder, self.paths, snap_id)
            raise
        log.info(
            "box %s: snapshot %s (RAM %.1f MiB, disk %.1f MiB, state %.0f KiB)",
            self.id,
            snap_id,
            ram_bytes / MIB,
            disk_bytes / MIB,
            state_bytes / 1024,
        )
        return snap

    async def _freeze_into(
        self, channel: PortalChannel, qemu: QemuProcess, folder: Path
    ) -> tuple[int, int]:
        """Freeze the portal, pause the VM, save its state and copy RAM and disk into
        ``folder``; resume the VM and thaw the portal whatever happens."""
        deadline = time.monotonic() + SNAPSHOT_TIMEOUT
        try:
            await channel.freeze(CONTROL_TIMEOUT)
        except builtins.TimeoutError:
            raise TimeoutError(
                f"box {self.id}: the guest agent did not answer FREEZE within "
                f"{CONTROL_TIMEOUT:g} s",
                hint="The guest may be overloaded or hung; see the console log.",
            ) from None
        try:
            async with qemu.qmp_session() as qmp:
                try:
                    state_bytes = await save_state(qmp, folder / STATE_FILE, deadline)
                    ram_bytes = await asyncio.to_thread(
                        freeze_files,
                        qemu.spec.ram_file if qemu.spec.ram_shared else None,
                        qemu.spec.memory_mib * MIB,
                        qemu.spec.root_disk,
                        folder,
                        layered=self.snapshot_id is not None,
                    )
                except BaseException:
                    with contextlib.suppress(EngineError):
                        await qmp.execute("cont")
                    raise
                await qmp.execute("cont")
        finally:
            channel.thaw(time.time_ns())  # the guest's clock stood still while it was paused
        return ram_bytes, state_bytes

    def _identity(self) -> Identity:
        """A restored or handed-out box's identity: hostname = its name, and its own MAC if it
        has a NIC (the restored guest memory still holds the snapshot's)."""
        mac = None
        if self.options.network != "none":
            mac = bytes.fromhex(mac_for(self.id).replace(":", ""))
        return Identity(hostname=self.name, mac=mac)

    async def _renew_identity(self) -> None:
        """Give this running box a new identity — fresh RNG seed, the host's clock, hostname =
        its name — by ``RESTORE`` on its connection (a warm-pool box being handed out: nothing
        of the previous identity's host runs in it)."""
        channel = self._require_channel()
        try:
            self.hello = await asyncio.wait_for(
                channel.reidentify(self._identity()), CONTROL_TIMEOUT
            )
        except builtins.TimeoutError:
            raise TimeoutError(
                f"box {self.id}: the guest agent did not take its new identity within "
                f"{CONTROL_TIMEOUT:g} s",
                hint="The guest may be overloaded or hung; see the console log.",
            ) from None

    async def ping(self, timeout: float = CONTROL_TIMEOUT) -> float:
        """Round trip to the guest agent, in seconds; TimeoutError if it does not answer."""
        channel = self._require_channel()
        try:
            return await asyncio.wait_for(channel.ping(), timeout)
        except builtins.TimeoutError:
            raise TimeoutError(
                f"box {self.id}: the agent did not answer a ping within {timeout:g} s",
                hint="The guest may be overloaded or hung; see the console log.",
            ) from None
