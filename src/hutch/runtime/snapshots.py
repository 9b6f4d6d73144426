"""Snapshots of running boxes: what is frozen, where it lives, and how clones use it.

A snapshot is a folder ``HOME/snapshots/<id>/`` plus a row in the runtime store's ``snapshots``
table (:mod:`hutch.runtime.store`). The folder holds everything a clone resumes from:

``state``
    QEMU's device and CPU state (the migration stream without RAM: ``x-ignore-shared``), tens of
    KiB. See :mod:`hutch.vm.migration`. (A snapshot *of a clone* carries the RAM in here
    instead: a clone's RAM is a private mapping, not a file that could be copied.)
``ram``
    The guest's RAM, copied from the box's shared RAM file (tmpfs) while the VM was paused; a
    sparse file (holes and zero pages are not stored). Clones map it **privately**
    (``share=off``): pages they only read are shared through the page cache, pages they write are
    copied — a clone never writes to the snapshot.
``disk.qcow2``
    The box's disk overlay as it was at that instant (copied while QEMU's block layer was flushed
    and inactive); it backs onto the image's base ext4 — also for a snapshot of a clone, whose
    overlay chain is flattened onto the base, so that snapshots never depend on each other.
    Clones get their own new overlay on top of it (a copy of ``overlay-template.qcow2``), so
    they never write to it either.
``image.id``
    The image the disk is based on (like ``boxes/<id>/image.id``).

**Why the store (SQLite) and not a JSON file per folder:** names must be unique across processes,
and "remove a snapshot unless a box uses it" must be atomic against "create a box from it" in
another process. Boxes reference their snapshot (``boxes.snapshot_id``, a foreign key), so one
``BEGIN IMMEDIATE`` transaction checks and deletes. The folder is written under a temporary name
first and renamed into place before the row is inserted; :func:`sweep` removes folders a crash
left without a row.

A snapshot made by ``box.clone()``/``box.fork()`` is ``auto_remove``: it is removed together with
its last clone. Named snapshots (``box.snapshot()``) stay until ``Runtime.remove_snapshot``, which
refuses (:class:`~hutch.errors.ConflictError`) while boxes were made from them: a clone's disk
backs onto the snapshot's disk for as long as the clone exists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hutch.errors import ConfigError, StorageError
from hutch.paths import HutchPaths
from hutch.runtime.options import BoxOptions
from hutch.vm.disk import (
    allocated_bytes,
    copy_sparse,
    merge_overlays,
    storage_error,
    write_overlay,
)

log = logging.getLogger("hutch.runtime")

SNAPSHOTS_DIR = "snapshots"
RAM_FILE = "ram"
DISK_FILE = "disk.qcow2"
STATE_FILE = "state"
OVERLAY_TEMPLATE = "overlay-template.qcow2"
IMAGE_ID_FILE = "image.id"
#: A clone's overlay while its snapshot is taken (merged into disk.qcow2 by flatten_disk).
TOP_FILE = "top.qcow2"
#: Prefix of folders being written (``.partial-<id>-<pid>``).
PARTIAL_PREFIX = ".partial-"
#: Folders without a store row younger than this may be one being recorded right now.
ORPHAN_AGE = 60.0


@dataclass(frozen=True)
class Snapshot:
    """One snapshot (a row of the store's ``snapshots`` table)."""

    id: str
    name: str | None
    #: The box it was taken of (that box may have been removed since).
    source_box: str | None
    image: str
    #: The stored image's id (config digest); its base disk backs the snapshot's disk.
    image_id: str | None
    #: The source box's options (name cleared): clones start from them.
    options: BoxOptions
    #: The machine a clone must match exactly: accelerator, kernel, initramfs, command line.
    accel: str
    kernel: str
    initramfs: str
    cmdline: str
    #: Bytes on disk of the frozen RAM, disk overlay and device state.
    ram_bytes: int = 0
    disk_bytes: int = 0
    state_bytes: int = 0
    #: Removed with its last clone (snapshots made by ``box.clone()``/``box.fork()``).
    auto_remove: bool = False
    created_at: float = field(default_factory=time.time)
    #: The key of the warm pool it was made for (:mod:`hutch.runtime.pool`), else None.
    pool: str | None = None
    #: The process keeping it for its warm pool (pid, start time, boot id): while that process
    #: lives, the snapshot is not removed with its last box.
    holder_pid: int | None = None
    holder_start: float | None = None
    holder_boot: str | None = None

    @property
    def cpus(self) -> int:
        return self.options.cpus

    @property
    def memory_mib(self) -> int:
        return self.options.memory_mib

    @property
    def size_bytes(self) -> int:
        return self.ram_bytes + self.disk_bytes + self.state_bytes

    def folder(self, paths: HutchPaths) -> Path:
        return snapshots_root(paths) / self.id


#: Options a box made from a snapshot may set for itself; the rest is the snapshot's machine.
CLONE_OVERRIDES = frozenset(
    {"name", "env", "workdir", "user", "labels", "auto_remove", "boot_timeout", "accel"}
)
#: Options that must equal the snapshot's (they are baked into its RAM, disk and device state).
MACHINE_FIELDS = (
    "image",
    "cpus",
    "memory_mib",
    "disk_size_mib",
    "ports",
    "volumes",
    "network",
    "allow",
)


def clone_options(
    snap: Snapshot, options: BoxOptions | None, overrides: Mapping[str, Any]
) -> BoxOptions:
    """The options of a box made from ``snap``: the snapshot's, with ``overrides`` (keyword
    arguments) or the per-box fields of ``options`` applied. Machine fields may be repeated but
    not changed (ConfigError naming the field)."""
    base = snap.options
    changes: dict[str, Any] = {"name": None}
    if options is not None:
        if overrides:
            raise ConfigError("pass either options or keyword arguments, not both")
        for f in MACHINE_FIELDS:
            if getattr(options, f) != getattr(base, f):
                raise ConfigError(
                    f"{f} must be the snapshot's ({getattr(base, f)!r}) for a box made from "
                    f"snapshot {snap.id}, not {getattr(options, f)!r}"
                )
        changes.update({f: getattr(options, f) for f in CLONE_OVERRIDES})
    for key, value in overrides.items():
        if key in MACHINE_FIELDS:
            if isinstance(value, list):  # e.g. allow=[] from JSON: options hold tuples
                value = tuple(value)
            if value != getattr(base, key):
                raise ConfigError(
                    f"{key} must be the snapshot's ({getattr(base, key)!r}) for a box made from "
                    f"snapshot {snap.id}, not {value!r}"
                )
        elif key not in CLONE_OVERRIDES:
            raise ConfigError(
                f"unknown option {key!r} for a box made from a snapshot",
                hint=f"Allowed: {', '.join(sorted(CLONE_OVERRIDES))}.",
            )
        else:
            changes[key] = value
    return dataclasses.replace(base, **changes)


def snapshots_root(paths: HutchPaths) -> Path:
    return paths.snapshots


def partial_folder(paths: HutchPaths, snapshot_id: str) -> Path:
    return snapshots_root(paths) / f"{PARTIAL_PREFIX}{snapshot_id}-{os.getpid()}"


def freeze_files(
    ram: Path | None, ram_size: int, disk: Path, folder: Path, *, layered: bool
) -> int:
    """Copy a paused box's RAM file and disk overlay into ``folder`` (blocking; the VM must be
    paused and its block layer flushed). Returns the bytes stored for the RAM.

    ``ram`` None: the box's RAM is not in a shared file (a clone maps its snapshot's RAM
    privately), so the migration stream carried it and the snapshot's RAM file is left empty
    (``ram_size`` bytes of hole). ``layered``: the disk is an overlay on another snapshot's disk
    (a clone's); it is copied as ``top.qcow2`` for :func:`flatten_disk`."""
    try:
        if ram is not None:
            copy_sparse(ram, folder / RAM_FILE, skip_zero_pages=True)
        else:
            with open(folder / RAM_FILE, "xb") as f:
                f.truncate(ram_size)
            os.chmod(folder / RAM_FILE, 0o600)
        copy_sparse(disk, folder / (TOP_FILE if layered else DISK_FILE))
    except OSError as e:
        raise storage_error(Path(e.filename or folder), e) from e
    return allocated_bytes(folder / RAM_FILE)


def flatten_disk(folder: Path, lower: Path) -> None:
    """Merge a clone's copied overlay (``top.qcow2``) with the snapshot disk it was on
    (``lower``) into ``disk.qcow2`` on the image's base, so that this snapshot never depends on
    the other one (blocking; the VM may run again meanwhile: both inputs are copies or
    read-only)."""
    merge_overlays(folder / TOP_FILE, lower, folder / DISK_FILE)


def finish_folder(partial: Path, final: Path, image_id: str | None) -> None:
    """Move a snapshot folder into place and complete it (blocking): the overlay template clones
    copy names the disk by its final path. The snapshot's files are read-only from now on (the
    RAM file stays writable by its owner only because QEMU 7.2 opens a memory-backend-file
    read-write even when it maps it privately)."""
    try:
        if image_id:
            (partial / IMAGE_ID_FILE).write_text(image_id)
        os.chmod(partial / RAM_FILE, 0o600)
        for f in (DISK_FILE, STATE_FILE):
            os.chmod(partial / f, 0o444)
        os.rename(partial, final)
    except OSError as e:
        raise storage_error(Path(e.filename or partial), e) from e
    try:
        write_overlay(final / DISK_FILE, final / OVERLAY_TEMPLATE, "qcow2")
        os.chmod(final / OVERLAY_TEMPLATE, 0o444)
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        raise


def clone_disk(snapshot_folder: Path, disk: Path) -> None:
    """A new box's disk: its own overlay on the snapshot's frozen disk (a template copy)."""
    template = snapshot_folder / OVERLAY_TEMPLATE
    try:
        shutil.copyfile(template, disk)
        os.chmod(disk, 0o644)
    except OSError as e:
        disk.unlink(missing_ok=True)
        if not template.exists():
            raise StorageError(
                f"the snapshot folder {snapshot_folder} is incomplete (no {OVERLAY_TEMPLATE})",
                hint="Remove the snapshot and take it again.",
            ) from e
        raise storage_error(disk, e) from e


def check_folder(folder: Path) -> None:
    """StorageError unless a snapshot folder has every file a clone needs."""
    missing = [
        f for f in (RAM_FILE, DISK_FILE, STATE_FILE, OVERLAY_TEMPLATE) if not (folder / f).is_file()
    ]
    if missing:
        raise StorageError(
            f"the snapshot folder {folder} is missing {', '.join(missing)}",
            hint="Remove the snapshot (Runtime.remove_snapshot) and take it again.",
        )


def remove_folder(paths: HutchPaths, snapshot_id: str) -> None:
    shutil.rmtree(snapshots_root(paths) / snapshot_id, ignore_errors=True)


def sweep(paths: HutchPaths, known: set[str], *, orphan_age: float = ORPHAN_AGE) -> list[Path]:
    """Remove partial folders of dead processes, and folders without a store row (``known``:
    the ids in the store) older than ``orphan_age``. Returns what was removed."""
    from hutch.runtime.store import pid_exists

    root = snapshots_root(paths)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    now = time.time()
    for d in root.iterdir():
        if d.is_symlink() or not d.is_dir():
            continue
        if d.name.startswith(PARTIAL_PREFIX):
            try:
                pid = int(d.name.rsplit("-", 1)[1])
            except (IndexError, ValueError):
                pid = 0
            if pid == os.getpid() or (pid and pid_exists(pid)):
                continue  # still being written
        else:
            if d.name in known:
                continue
            with contextlib.suppress(OSError):
                if now - d.stat().st_mtime < orphan_age:
                    continue  # may be recorded in a moment
        shutil.rmtree(d, ignore_errors=True)
        log.info("removed the leftover snapshot folder %s", d)
        removed.append(d)
    return removed


__all__ = [
    "SNAPSHOTS_DIR",
    "Snapshot",
    "check_folder",
    "clone_disk",
    "clone_options",
    "finish_folder",
    "freeze_files",
    "remove_folder",
    "snapshots_root",
    "sweep",
]
