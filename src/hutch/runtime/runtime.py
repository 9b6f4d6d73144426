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
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from hutch.box import Box, store_for
from hutch.errors import HutchError, InvalidStateError
from hutch.execution import ExecResult
from hutch.paths import HutchPaths
from hutch.runtime.metrics import RuntimeMetrics
from hutch.runtime.options import BoxOptions
from hutch.runtime.recovery import RecoveryReport, kill_qemu, recover
from hutch.runtime.snapshots import ORPHAN_AGE, Snapshot, clone_options, remove_folder, sweep
from hutch.runtime.store import BoxRecord, BoxStore, ProcessIdentity

log = logging.getLogger("hutch")

_DEFAULT: dict[Path, Runtime] = {}


class Runtime:
    """Creates, finds, lists and removes boxes of one hutch home.

    ``async with hutch.Runtime() as rt:`` opens it (running crash recovery) and, on exit, stops
    the boxes this process started (removing those created with ``auto_remove``).
    """

    def __init__(self, home: Path | str | None = None) -> None:
        self.paths = HutchPaths(Path(home).absolute()) if home else HutchPaths.default()
        self._boxes: dict[str, Box] = {}  # live Box objects of this process, by id
        self._created: builtins.list[Box] = []  # every box this runtime made (for metrics)
        self._opened = False
        self.last_recovery: RecoveryReport | None = None

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
        self._opened = True

    def _sweep_snapshots(self) -> None:
        """Snapshot folders a crash left without a record, and clone()/fork() snapshots whose
        clones are gone (e.g. removed by recovery) — older than a minute, so that a fork in
        progress elsewhere is left alone."""
        store = self.store
        now = time.time()
        for snap in store.list_snapshots():
            old = snap.auto_remove and now - snap.created_at > ORPHAN_AGE
            if old and store.delete_snapshot(snap.id, only_auto=True):
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
        """Stop the boxes this process runs (their disks are kept; ``auto_remove`` ones go)."""
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
        **kwargs: Any,
    ) -> Box:
        """A new box (not started): ``create(BoxOptions(image=…))`` or ``create(image=…, …)``.

        With ``snapshot`` (a :class:`Snapshot`, or its id or name) the box is made from it: its
        first ``start()`` resumes the snapshot's VM under a new identity. Its options are the
        snapshot's; ``name``, ``env``, ``workdir``, ``user``, ``labels``, ``auto_remove`` and
        ``boot_timeout`` may be given, the machine (image, cpus, memory, disk) may not differ.

        ConflictError if the name is taken."""
        await self.open()
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
        box = Box._from_options(opts, home=self.paths.home)
        box.snapshot_id = snap.id if snap is not None else None
        rec = BoxRecord.new(opts, id=box.id, name=box.name, snapshot_id=box.snapshot_id)
        await asyncio.to_thread(self.store.insert, rec)
        box._recorded = True
        box._adopt = self._adopt
        self._boxes[box.id] = box
        self._created.append(box)
        return box

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


__all__ = ["ProcessIdentity", "Runtime"]
