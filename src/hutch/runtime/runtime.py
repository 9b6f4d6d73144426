"""``hutch.Runtime``: many boxes in one hutch home, persisted in ``HOME/runtime.db``.

Every box — made by ``Runtime.create`` or as a plain ``hutch.Box`` — has a row in the store
(:mod:`hutch.runtime.store`), so boxes are listed, named and found across processes, and a box
stopped by one process can be started by another (its disk overlay is kept under ``boxes/<id>``).

**Re-attaching is not supported:** a running box's QEMU belongs to the process that started it
(it is started under ``setpriv --pdeathsig KILL`` so it can never outlive that process, even on
SIGKILL). Another process sees such a box with its state and owner pid, and gets an
:class:`InvalidStateError` saying so if it tries to drive it. When the owner dies, its boxes'
QEMUs die with it and the next runtime to open the home (:func:`recover`) marks them ``stopped``
(``failed`` if they were still starting), keeping their disks.

Snapshots (:mod:`hutch.runtime.snapshots`) are listed, found and removed here;
``create(snapshot=…)`` makes a box that resumes one. Snapshots made by ``box.clone()``/``fork()``
go with their last clone.

Warm pools (:mod:`hutch.runtime.pool`): ``Runtime(pool=…)`` or :meth:`Runtime.configure_pool`
keeps boxes restored ahead of time per (image, cpus, memory_mib); ``create`` with matching options
hands one out already running, and the pool refills in the background. ``close`` drains them.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from hutch.box import Box, store_for
from hutch.config import MAX_POOL_RESTORES, PoolConfig
from hutch.errors import ConfigError, ConflictError, HutchError, InvalidStateError, NotFoundError
from hutch.execution import ExecResult
from hutch.paths import HutchPaths
from hutch.runtime.metrics import RuntimeMetrics
from hutch.runtime.options import BoxOptions
from hutch.runtime.pool import PoolKey, PoolSpec, PoolStatus, WarmPool, bypass_reason
from hutch.runtime.recovery import RecoveryReport, kill_qemu, recover
from hutch.runtime.snapshots import ORPHAN_AGE, Snapshot, clone_options, remove_folder, sweep
from hutch.runtime.store import BoxRecord, BoxStore, ProcessIdentity

log = logging.getLogger("hutch")

_DEFAULT: dict[Path, Runtime] = {}
#: Ready boxes one create() tries before it makes a box the usual way (a box may have died while
#: it waited in the pool).
HAND_OUT_TRIES = 3

#: What ``Runtime(pool=…)`` takes: True (config.toml's ``[pool]``), a spec, or several (specs or
#: mappings of their fields).
PoolArg = bool | PoolSpec | Iterable[PoolSpec | Mapping[str, Any]] | None


def _pool_specs(pool: PoolArg) -> list[PoolSpec]:
    if pool is None or pool is False or pool is True:
        return []
    if isinstance(pool, PoolSpec):
        return [pool]
    if isinstance(pool, Mapping):
        raise ConfigError(
            "pool= takes True, a PoolSpec or a list of them (or of mappings), not one mapping",
            hint='e.g. Runtime(pool=[{"image": "busybox", "size": 2}])',
        )
    specs = []
    for i, item in enumerate(pool):
        specs.append(
            item if isinstance(item, PoolSpec) else PoolSpec.from_mapping(item, f"pool[{i}]")
        )
    return specs


class Runtime:
    """Creates, finds, lists and removes boxes of one hutch home.

    ``async with hutch.Runtime() as rt:`` opens it (running crash recovery) and, on exit, stops
    the boxes this process started (removing those created with ``auto_remove``).

    ``pool``: warm pools to keep while the runtime is open — ``True`` for config.toml's
    ``[pool]`` table, a :class:`PoolSpec`, or a list of specs (or of mappings of their fields:
    ``[{"image": "busybox", "size": 2}]``). They start filling when the runtime opens, and
    :meth:`close` drains them. ``max_restores`` (1–4; default config.toml's, else 1): pool
    restores in flight at a time, all pools together.
    """

    def __init__(
        self,
        home: Path | str | None = None,
        *,
        pool: PoolArg = None,
        max_restores: int | None = None,
    ) -> None:
        self.paths = HutchPaths(Path(home).absolute()) if home else HutchPaths.default()
        self._boxes: dict[str, Box] = {}  # live Box objects of this process, by id
        self._created: builtins.list[Box] = []  # every box this runtime made (for metrics)
        self._opened = False
        # Bumped by close(): a create() that spans a close() must not leave its box behind.
        self._generation = 0
        self.last_recovery: RecoveryReport | None = None
        # Warm pools: what is configured (started at open, forgotten at close), and what runs.
        self._pool_from_config = pool is True
        self._pool_specs: dict[PoolKey, PoolSpec] = {s.key: s for s in _pool_specs(pool)}
        if max_restores is not None and (
            isinstance(max_restores, bool)
            or not isinstance(max_restores, int)
            or not 1 <= max_restores <= MAX_POOL_RESTORES
        ):
            raise ConfigError(
                f"max_restores must be 1 to {MAX_POOL_RESTORES}, not {max_restores!r}"
            )
        self._max_restores = max_restores
        self._pools: dict[PoolKey, WarmPool] = {}
        self._pool_gate: asyncio.Semaphore | None = None

    @classmethod
    def default(cls) -> Runtime:
        """The process-wide runtime of the default hutch home."""
        paths = HutchPaths.default()
        rt = _DEFAULT.get(paths.home)
        if rt is None:
            rt = _DEFAULT[paths.home] = cls(paths.home)
        return rt

    @property
    def store(self) -> BoxStore:
        return store_for(self.paths)

    async def open(self) -> None:
        """Open the store and recover boxes whose owner process died (idempotent)."""
        if self._opened:
            return
        self.paths.ensure()
        self.last_recovery = await asyncio.to_thread(recover, self.store, self.paths)
        if self.last_recovery:
            log.info("hutch runtime: %s", self.last_recovery.summary())
        try:
            await asyncio.to_thread(self._sweep_snapshots)
        except HutchError as e:  # housekeeping must not keep the runtime from opening
            log.warning("hutch runtime: sweeping snapshots failed: %s", e.message)
        if self._pool_from_config:
            config = await asyncio.to_thread(PoolConfig.load, self.paths)
            where = f"{self.paths.home / 'config.toml'} [[pool.boxes]]"
            for i, entry in enumerate(config.boxes):
                spec = PoolSpec.from_mapping(entry, f"{where} #{i + 1}")
                self._pool_specs.setdefault(spec.key, spec)
            if self._max_restores is None:
                self._max_restores = config.max_restores
        self._opened = True
        for spec in self._pool_specs.values():
            self._start_pool(spec)

    def _sweep_snapshots(self) -> None:
        """Snapshot folders a crash left without a record, and clone()/fork() snapshots whose
        clones are gone (e.g. removed by recovery) — older than a minute, so that a fork in
        progress elsewhere is left alone — or whose warm pool's process died."""
        store = self.store
        now = time.time()
        for snap in store.list_snapshots():
            holder = (
                ProcessIdentity(snap.holder_pid, snap.holder_start, snap.holder_boot)
                if snap.holder_pid is not None
                else None
            )
            orphan = now - snap.created_at > ORPHAN_AGE or (
                holder is not None and not holder.alive()
            )
            if snap.auto_remove and orphan and store.delete_snapshot(snap.id, only_auto=True):
                remove_folder(self.paths, snap.id)
        sweep(self.paths, {s.id for s in store.list_snapshots()})

    def _adopt(self, box: Box) -> None:
        """Track a box made by a box of this runtime (clone/fork)."""
        box._adopt = self._adopt
        self._boxes[box.id] = box
        self._created.append(box)

    async def __aenter__(self) -> Runtime:
        await self.open()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Drain the warm pools (their waiting boxes and snapshots are removed) for good — a
        runtime used again after ``close`` has no pools unless :meth:`configure_pool` makes
        some — then stop the boxes this process runs (their disks are kept; ``auto_remove``
        ones go)."""
        self._generation += 1
        pools = list(self._pools.values())
        self._pools.clear()
        self._pool_specs.clear()
        self._pool_from_config = False
        drained = await asyncio.gather(*(p.close() for p in pools), return_exceptions=True)
        for pool, r in zip(pools, drained, strict=True):
            if isinstance(r, BaseException):
                log.warning("warm pool %s: draining it failed: %s", pool.key, r)
        boxes = list(self._boxes.values())
        self._boxes.clear()

        async def finish(box: Box) -> None:
            if box.options.auto_remove:
                await box.remove()
            elif box.state not in ("created", "stopped", "removed"):
                await box.stop()

        results = await asyncio.gather(*(finish(b) for b in boxes), return_exceptions=True)
        for box, r in zip(boxes, results, strict=True):
            if isinstance(r, BaseException):
                log.warning("box %s: stopping it on close failed: %s", box.id, r)
        self._opened = False

    # --- boxes -----------------------------------------------------------------------------
    async def create(
        self,
        options: BoxOptions | None = None,
        *,
        snapshot: Snapshot | str | None = None,
        pool: bool = True,
        **kwargs: Any,
    ) -> Box:
        """A new box (not started): ``create(BoxOptions(image=…))`` or ``create(image=…, …)``.

        With ``snapshot`` (a :class:`Snapshot`, or its id or name) the box is made from it: its
        first ``start()`` resumes the snapshot's VM under a new identity. Its options are the
        snapshot's; ``name``, ``env``, ``workdir``, ``user``, ``labels``, ``auto_remove`` and
        ``boot_timeout`` may be given, the machine (image, cpus, memory, disk) may not differ.

        With a warm pool of the same image, cpus, memory_mib (and accel), and no other option
        that shapes the VM, the box comes from the pool: **already running** (``start()`` is a
        no-op), with its own name, hostname, RNG seed and clock. If the pool has no ready box,
        the box is made from the pool's snapshot (its ``start()`` restores it). ``pool=False``
        never uses a pool.

        ConflictError if the name is taken."""
        await self.open()
        generation = self._generation
        t0 = time.monotonic()
        snap: Snapshot | None = None
        if snapshot is not None:
            snap = (
                snapshot
                if isinstance(snapshot, Snapshot)
                else await asyncio.to_thread(self.store.get_snapshot, snapshot)
            )
            opts = clone_options(snap, options, kwargs)
        else:
            opts = options if options is not None else BoxOptions(**kwargs)
        opts.validate()
        warm = self._pool_for(opts) if snap is None and pool else None
        if warm is not None:
            pooled = await self._hand_out(warm, opts, t0)
            if pooled is not None:
                return await self._register(pooled, generation)
            snap = warm.snapshot  # none ready: the box restores the pool's snapshot at start()
        box = Box._from_options(opts, home=self.paths.home)
        box.snapshot_id = snap.id if snap is not None else None
        rec = BoxRecord.new(opts, id=box.id, name=box.name, snapshot_id=box.snapshot_id)
        try:
            await asyncio.to_thread(self.store.insert, rec)
        except NotFoundError:
            if warm is None or snap is None:
                raise
            box.snapshot_id = None  # the pool's snapshot was retired meanwhile: boot instead
            rec = BoxRecord.new(opts, id=box.id, name=box.name)
            await asyncio.to_thread(self.store.insert, rec)
        box._recorded = True
        box._adopt = self._adopt
        return await self._register(box, generation)

    async def _register(self, box: Box, generation: int) -> Box:
        """Count a new box as this runtime's — unless :meth:`close` ran since its ``create()``
        began: nobody would stop it then, so it is removed and the caller told."""
        if generation != self._generation:
            with contextlib.suppress(HutchError):
                await box.remove()
            raise InvalidStateError(
                "the runtime was closed while the box was being created; the box was removed",
                hint="Create it again (the runtime opens again on use).",
            )
        self._boxes[box.id] = box
        self._created.append(box)
        return box

    # --- warm pools ------------------------------------------------------------------------
    def _start_pool(self, spec: PoolSpec) -> None:
        if spec.size == 0 or spec.key in self._pools:
            return
        most = self._max_restores or 1
        if self._pool_gate is None:
            self._pool_gate = asyncio.Semaphore(most)
        pool = self._pools[spec.key] = WarmPool(spec, self.paths, self._pool_gate, most)
        pool.start()

    def _pool_for(self, opts: BoxOptions) -> WarmPool | None:
        """The pool whose boxes a box with ``opts`` can be, if any."""
        if not self._pools:
            return None
        pool = self._pools.get(PoolKey.of(opts))
        if pool is None or bypass_reason(opts, pool.template) is not None:
            return None
        return pool

    async def _hand_out(self, pool: WarmPool, opts: BoxOptions, t0: float) -> Box | None:
        """A ready box of ``pool`` as a new box with ``opts``: recorded as an ordinary box (name,
        options, creation time) and given a new identity (hostname, RNG seed, clock). None when
        the pool has no ready box. A box that died while waiting, or does not take its identity,
        is removed and the next one tried."""
        for _ in range(HAND_OUT_TRIES):
            box = pool.take()
            if box is None:
                return None
            name = opts.name or f"hutch-{box.id[-6:]}"
            try:
                await asyncio.to_thread(
                    self.store.hand_out, box.id, pool=pool.label, options=opts, name=name
                )
            except ConflictError:
                pool.give_back(box)  # the name is taken: nothing of the box changed
                raise
            except InvalidStateError as e:  # it failed since it was taken
                log.warning("warm pool %s: box %s: %s", pool.key, box.id, e.message)
                pool.discard(box)
                continue
            except BaseException:
                pool.discard(box)
                raise
            box.options, box.name, box.image = opts, name, opts.image
            box.boot_timeout = opts.boot_timeout
            try:
                await box._renew_identity()
            except HutchError as e:
                pool.failures += 1
                pool.last_error = e.message
                log.warning(
                    "warm pool %s: box %s did not take its identity: %s", pool.key, box.id, e
                )
                await pool.dispose(box)  # (at once: the name it took is free again)
                continue
            except BaseException:
                pool.discard(box)
                raise
            pool.handed_out += 1
            box.boot_ms = (time.monotonic() - t0) * 1000.0
            box._adopt = self._adopt
            return box
        return None

    async def configure_pool(
        self,
        image: str = "busybox",
        *,
        cpus: int = 1,
        memory_mib: int = 256,
        size: int = 1,
        accel: str = "auto",
    ) -> PoolStatus:
        """Keep ``size`` boxes of (image, cpus, memory_mib) restored and ready: ``create`` with
        those (and otherwise only per-box options: name, env, workdir, user, labels,
        auto_remove, boot_timeout) hands one out at once. Changes the size of an existing pool;
        ``size=0`` drains and removes it. Opens the runtime; the pool fills in the background
        (:meth:`wait_pool`)."""
        spec = PoolSpec(image=image, cpus=cpus, memory_mib=memory_mib, size=size, accel=accel)
        await self.open()
        pool = self._pools.get(spec.key)
        if size == 0:
            self._pool_specs.pop(spec.key, None)
            if pool is not None:
                del self._pools[spec.key]
                pool.resize(0)
                await pool.close()
                return pool.status()
            return PoolStatus(image, cpus, memory_mib, accel, 0, 0, 0)
        self._pool_specs[spec.key] = spec
        if pool is None:
            self._start_pool(spec)
            pool = self._pools[spec.key]
        else:
            pool.resize(size)
        return pool.status()

    async def pool_status(self) -> builtins.list[PoolStatus]:
        """Every warm pool of this runtime: its size, ready and restoring boxes, and counters
        (handed out, misses, restores, failures and the last failure)."""
        return [p.status() for p in self._pools.values()]

    async def wait_pool(self, timeout: float | None = 60.0) -> None:
        """Wait until every warm pool holds its size of ready boxes (TimeoutError naming the
        pool and its last failure after ``timeout`` seconds)."""
        await self.open()
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        for pool in list(self._pools.values()):
            await pool.wait_full(deadline)

    async def get(self, id_or_name: str) -> Box:
        """The box with this id, unique id prefix or name (NotFoundError otherwise)."""
        await self.open()
        rec = await asyncio.to_thread(self.store.get, id_or_name)
        live = self._boxes.get(rec.id)
        if live is not None and live.state != "removed":
            return live
        if rec.active and not rec.owner_alive():
            await asyncio.to_thread(recover, self.store, self.paths)  # its owner died
            rec = await asyncio.to_thread(self.store.get, rec.id)
        box = Box._from_record(rec, home=self.paths.home)
        if box._foreign_owner is None:
            box._adopt = self._adopt
            self._boxes[box.id] = box
        return box

    async def list(self, state: str | Collection[str] | None = None) -> builtins.list[BoxRecord]:
        """Records of the home's boxes (all processes), oldest first; filter by state(s)."""
        await self.open()
        return await asyncio.to_thread(self.store.list, state)

    async def metrics(self) -> RuntimeMetrics:
        """Counters of this runtime's boxes, and how many boxes run in the home."""
        await self.open()
        running = await asyncio.to_thread(self.store.list, "running")
        mine = self._created
        return RuntimeMetrics(
            boxes_created=len(mine),
            boxes_failed=sum(1 for b in mine if b.failures),
            running=len(running),
            commands=sum(b.commands for b in mine),
            errors=sum(b.errors for b in mine),
        )

    async def remove(self, id_or_name: str, *, force: bool = False) -> None:
        """Delete a box, its disk and its record. A running box needs ``force=True`` (it is
        stopped first; one running in another process has its QEMU killed)."""
        box = await self.get(id_or_name)
        if box.state in ("running", "starting", "stopping") and not force:
            raise InvalidStateError(
                f"box {box.id} is {box.state}",
                hint="Stop it first, or remove it with force=True / `hutch rm -f`.",
            )
        if box._foreign_owner is not None:
            rec = await asyncio.to_thread(self.store.get, box.id)
            if rec.qemu_pid:
                await asyncio.to_thread(kill_qemu, rec.qemu_pid, box.id, 2.0)
            box._foreign_owner = None
            box.state = "stopped"
        await box.remove()
        self._boxes.pop(box.id, None)

    # --- snapshots -------------------------------------------------------------------------
    async def snapshots(self) -> builtins.list[Snapshot]:
        """Every snapshot of the home (all processes), oldest first."""
        await self.open()
        return await asyncio.to_thread(self.store.list_snapshots)

    async def get_snapshot(self, id_or_name: str) -> Snapshot:
        """The snapshot with this id, unique id prefix or name (NotFoundError otherwise)."""
        await self.open()
        return await asyncio.to_thread(self.store.get_snapshot, id_or_name)

    async def snapshot_users(self, id_or_name: str) -> builtins.list[str]:
        """Ids of the boxes made from a snapshot (they keep it from being removed)."""
        snap = await self.get_snapshot(id_or_name)
        return await asyncio.to_thread(self.store.snapshot_users, snap.id)

    async def remove_snapshot(self, id_or_name: str) -> None:
        """Delete a snapshot and its files. ConflictError while boxes made from it exist (their
        disks build on the snapshot's): remove those first."""
        snap = await self.get_snapshot(id_or_name)
        await asyncio.to_thread(self.store.delete_snapshot, snap.id)
        await asyncio.to_thread(remove_folder, self.paths, snap.id)

    async def run(
        self, image: str, *cmd: str | Sequence[str], timeout: float | None = None, **options: Any
    ) -> ExecResult:
        """Ephemeral: create a box from ``image``, run ``cmd`` (the image's default command if
        empty), remove the box, return the result."""
        box = await self.create(image=image, auto_remove=True, **options)
        try:
            await box.start()
            return await box.exec(*cmd, timeout=timeout)
        finally:
            await box.remove()
            self._boxes.pop(box.id, None)


__all__ = ["PoolSpec", "PoolStatus", "ProcessIdentity", "Runtime"]
