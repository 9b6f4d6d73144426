"""Warm pools: boxes restored ahead of time, so that ``Runtime.create`` hands one out at once.

A pool is kept per :class:`PoolKey` — (image, cpus, memory_mib, accel) — by one runtime
(``Runtime(pool=…)``, ``Runtime.configure_pool``, or ``[pool]`` in config.toml with
``Runtime(pool=True)``). How a pool fills:

1. **Its snapshot** (once): a *seed* box of the key is booted, runs one trivial command (so the
   guest's page cache holds the exec path), is frozen into an ``auto_remove`` snapshot and removed.
   The snapshot is *held* by this process (``snapshots.holder_*`` in the store), so it outlives
   its boxes coming and going for as long as the pool does.
2. **Its boxes**: restored from that snapshot (copy-on-write RAM, own disk overlay, a fresh
   identity: :meth:`hutch.box.Box._restore`), then warmed by one trivial exec — under TCG every
   new QEMU translates the guest code it runs for the first time, ~140 ms for the first exec;
   the pool pays that instead of the user. Each waits in the store with ``boxes.pool`` set: such
   rows are invisible to ``Runtime.list``/``get`` and ``hutch ps``.

**Handing out** (:meth:`Runtime.create` with options whose machine matches: :func:`bypass_reason`)
pops the oldest ready box — synchronously, so no box is ever handed out twice — records it as an
ordinary box (new name, the caller's options, created now: ``BoxStore.hand_out``) and gives the
guest a new identity over its running connection (``RESTORE`` again: fresh RNG seed, the host's
clock, hostname = the box's name; PROTOCOL.md §3). Only options that do not affect the VM may
differ from the pool's (:data:`PER_BOX_FIELDS`); anything else (disk size, ports, volumes, another
accelerator) bypasses the pool. An empty pool never makes ``create`` wait: the box is made from the
pool's snapshot instead (its ``start()`` restores it), or booted if there is none yet.

**Refilling** runs in one task per pool, in the background: at most ``max_restores`` restores (or
seed boots) at a time for all pools of a runtime together, failures logged and retried with
exponential backoff (:func:`backoff`); after :data:`RESEED_AFTER` failed restores in a row, or when
the image was replaced in the store, the snapshot is retired and made again.

**Draining** (``Runtime.close``, or a pool resized to 0): the refill task is cancelled, waiting
boxes are killed (their QEMU stopped at once: there is nothing in them to keep) and removed with
their folders and records, and the snapshot is let go: removed now, or — when boxes handed out
from it still exist — with the last of them. If the process dies instead, its pool QEMUs die with
it (``--pdeathsig``) and the next runtime's crash recovery removes the pool rows outright (they
are nobody's boxes) and the snapshot, whose holder is dead (:mod:`hutch.runtime.recovery`).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import logging
import random
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hutch.box import Box, release_snapshot, store_for
from hutch.errors import ConfigError, HutchError, NotFoundError, TimeoutError
from hutch.images.reference import ImageReference
from hutch.images.store import ImageStore
from hutch.paths import HutchPaths
from hutch.runtime.options import BoxOptions
from hutch.runtime.snapshots import Snapshot
from hutch.runtime.store import BoxRecord, BoxStore, ProcessIdentity

log = logging.getLogger("hutch.runtime")

#: Options a pooled box takes from the caller: they do not affect the VM (they apply to its
#: commands, its record or its removal). Every other option must be the pool's.
PER_BOX_FIELDS = frozenset(
    {"name", "env", "workdir", "user", "labels", "auto_remove", "boot_timeout"}
)
#: Most boxes one pool keeps ready (each idle box costs ~28 MiB of host memory under TCG).
MAX_POOL_SIZE = 64
#: Backoff after failures: first delay, cap (seconds).
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 60.0
#: Failed restores in a row after which the pool's snapshot is made again.
RESEED_AFTER = 3
#: How often an idle pool looks for boxes that died while waiting (seconds).
PRUNE_INTERVAL = 5.0
#: After a hand-out the refill waits this long (seconds), so that restoring the next box (CPU-
#: bound under TCG) does not compete with the first commands of the box just handed out.
REFILL_DELAY = 0.25


def normalize_image(image: str) -> str:
    """The canonical reference of an image name (``busybox`` → ``docker.io/library/busybox:
    latest``), so that spellings of one image share a pool; the name itself if it does not
    parse."""
    try:
        return str(ImageReference.parse(image))
    except HutchError:
        return image


@dataclass(frozen=True)
class PoolKey:
    """What a pool's boxes are: boxes of one key are interchangeable until handed out."""

    image: str  # canonical (normalize_image)
    cpus: int
    memory_mib: int
    accel: str = "auto"

    @classmethod
    def of(cls, options: BoxOptions) -> PoolKey:
        return cls(normalize_image(options.image), options.cpus, options.memory_mib, options.accel)

    def __str__(self) -> str:
        accel = "" if self.accel == "auto" else f" accel={self.accel}"
        return f"{self.image} cpus={self.cpus} memory_mib={self.memory_mib}{accel}"


@dataclass(frozen=True)
class PoolSpec:
    """One warm pool: ``size`` ready boxes of ``image`` with ``cpus`` and ``memory_mib``."""

    image: str = "busybox"
    cpus: int = 1
    memory_mib: int = 256
    size: int = 1
    accel: str = "auto"

    def __post_init__(self) -> None:
        n = self.size
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_POOL_SIZE:
            raise ConfigError(f"pool size must be 0 to {MAX_POOL_SIZE}, not {n!r}")
        self.options()  # image, cpus, memory_mib and accel, checked as any box's

    def options(self) -> BoxOptions:
        """The options the pool's boxes wait with (``auto_remove``: a pool box that outlives
        its pool by accident is removed like an ephemeral box)."""
        return BoxOptions(
            image=self.image,
            cpus=self.cpus,
            memory_mib=self.memory_mib,
            accel=self.accel,
            auto_remove=True,
        )

    @property
    def key(self) -> PoolKey:
        return PoolKey.of(self.options())

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any], where: str = "pool") -> PoolSpec:
        """From a mapping (a ``[[pool.boxes]]`` table, a JSON object): the fields above."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(m) - known
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(sorted(unknown))}",
                hint=f"Known keys: {', '.join(sorted(known))}.",
            )
        if "image" not in m:
            raise ConfigError(f"{where}: image is required", hint='e.g. image = "busybox"')
        try:
            return cls(**dict(m))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e.message}", hint=e.hint) from None


def split_options(options: BoxOptions) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the options that make the VM, the per-box ones of :data:`PER_BOX_FIELDS`)."""
    machine: dict[str, Any] = {}
    per_box: dict[str, Any] = {}
    for f in dataclasses.fields(BoxOptions):
        (per_box if f.name in PER_BOX_FIELDS else machine)[f.name] = getattr(options, f.name)
    return machine, per_box


def bypass_reason(options: BoxOptions, template: BoxOptions) -> str | None:
    """Why a box with ``options`` cannot come from a pool whose boxes have ``template``: the
    first option that differs and shapes the VM (the image compared by canonical name); None
    when one of the pool's boxes can be it. Options added to :class:`BoxOptions` later bypass
    the pool unless they keep their defaults — they may shape the VM."""
    if normalize_image(options.image) != normalize_image(template.image):
        return "image"
    machine, _ = split_options(options)
    pool_machine, _ = split_options(template)
    for name, value in machine.items():
        if name != "image" and value != pool_machine[name]:
            return name
    return None


def backoff(failures: int) -> float:
    """Seconds to wait after ``failures`` (≥ 1) failures in a row: doubling from
    :data:`BACKOFF_FIRST` up to :data:`BACKOFF_MAX`, with ±20 % jitter."""
    base: float = min(BACKOFF_MAX, BACKOFF_FIRST * 2.0 ** min(failures - 1, 16))
    return base * random.uniform(0.8, 1.2)


@dataclass(frozen=True)
class PoolStatus:
    """A pool's state and counters (``Runtime.pool_status()``)."""

    image: str
    cpus: int
    memory_mib: int
    accel: str
    #: Ready boxes the pool keeps.
    size: int
    #: Boxes ready to be handed out now, and being restored.
    ready: int
    restoring: int
    #: Boxes handed out by ``create``; creates that found no ready box.
    handed_out: int = 0
    misses: int = 0
    #: Boxes restored into the pool, and failed restores (or seed boots).
    restores: int = 0
    failures: int = 0
    last_error: str | None = None
    #: Seconds until the next attempt after failures (0: none pending).
    retry_in: float = 0.0
    snapshot_id: str | None = None
    #: Milliseconds of the last restore into the pool (QEMU start → warmed up).
    last_restore_ms: float | None = None


class WarmPool:
    """One pool of a runtime (see the module docstring). Made and driven by the Runtime."""

    def __init__(
        self, spec: PoolSpec, paths: HutchPaths, gate: asyncio.Semaphore, parallel: int = 1
    ) -> None:
        self.spec = spec
        self.key = spec.key
        self.template = spec.options()
        self.paths = paths
        #: Shared by the runtime's pools: at most ``parallel`` (max_restores) restores at a time.
        self._gate = gate
        self._parallel = max(1, parallel)
        self._ready: deque[Box] = deque()
        self._restoring = 0
        self.snapshot: Snapshot | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._cleanup: set[asyncio.Task[None]] = set()
        self._closing = False
        self._failed_in_a_row = 0
        self._restore_failures_in_a_row = 0
        self._retry_at = 0.0
        self._refill_at = 0.0
        self.handed_out = 0
        self.misses = 0
        self.restores = 0
        self.failures = 0
        self.last_error: str | None = None
        self.last_restore_ms: float | None = None

    def __repr__(self) -> str:
        return f"<WarmPool {self.key} {len(self._ready)}/{self.spec.size}>"

    @property
    def store(self) -> BoxStore:
        return store_for(self.paths)

    @property
    def label(self) -> str:
        """The key as recorded in ``boxes.pool`` / ``snapshots.pool``."""
        return str(self.key)

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None or self._task.done():
            self._closing = False
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"hutch-pool {self.key}"
            )

    def resize(self, size: int) -> None:
        """Keep ``size`` ready boxes from now on (surplus ready boxes are removed)."""
        self.spec = dataclasses.replace(self.spec, size=size)
        while len(self._ready) > size:
            self._discard(self._ready.pop())
        self._wake.set()

    @property
    def full(self) -> bool:
        return len(self._ready) >= self.spec.size

    def status(self) -> PoolStatus:
        return PoolStatus(
            image=self.spec.image,
            cpus=self.spec.cpus,
            memory_mib=self.spec.memory_mib,
            accel=self.spec.accel,
            size=self.spec.size,
            ready=len(self._ready),
            restoring=self._restoring,
            handed_out=self.handed_out,
            misses=self.misses,
            restores=self.restores,
            failures=self.failures,
            last_error=self.last_error,
            retry_in=round(max(0.0, self._retry_at - time.monotonic()), 3),
            snapshot_id=self.snapshot.id if self.snapshot else None,
            last_restore_ms=self.last_restore_ms,
        )

    async def close(self) -> None:
        """Drain: stop refilling, remove every waiting box, let go of the snapshot."""
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        boxes = list(self._ready)
        self._ready.clear()
        await asyncio.gather(*(self._dispose(b) for b in boxes), return_exceptions=True)
        while self._cleanup:
            await asyncio.gather(*list(self._cleanup), return_exceptions=True)
        await self._let_go()

    # --- handing out ----------------------------------------------------------------------
    def take(self) -> Box | None:
        """The oldest ready box, out of the pool (never to be handed out again); None if there
        is none. Synchronous: two callers can never get the same box."""
        box: Box | None = None
        while self._ready:
            candidate = self._ready.popleft()
            if _alive(candidate):
                box = candidate
                break
            self._discard(candidate)  # died while waiting
        if box is None:
            self.misses += 1
        else:
            self._refill_at = time.monotonic() + REFILL_DELAY
        self._wake.set()  # refill
        return box

    def give_back(self, box: Box) -> None:
        """A box taken but not handed out after all (nothing of it changed): first in line."""
        if self._closing or not _alive(box):
            self._discard(box)
        else:
            self._ready.appendleft(box)

    def discard(self, box: Box) -> None:
        """A box taken whose hand-out failed: remove it in the background."""
        self._discard(box)

    async def dispose(self, box: Box) -> None:
        """A box taken whose hand-out failed: remove it now."""
        await self._dispose(box)

    def _discard(self, box: Box) -> None:
        task = asyncio.get_running_loop().create_task(self._dispose(box))
        self._cleanup.add(task)
        task.add_done_callback(self._cleanup.discard)

    async def _dispose(self, box: Box) -> None:
        """Remove a pool box fast: its QEMU is stopped at once (nothing in it is kept), then its
        folder and record go (Box.remove)."""
        try:
            with contextlib.suppress(Exception):
                await box._teardown()
            if box.state in ("running", "starting", "failed"):
                box.state = "stopped"  # torn down: remove() has no guest to shut down
            await box.remove()
        except Exception as e:  # logged, not raised: draining goes on
            log.warning("warm pool %s: removing box %s failed: %s", self.key, box.id, e)

    async def _let_go(self) -> None:
        """Stop holding the snapshot; it is removed now if no box uses it, else with the last
        box made from it."""
        snap, self.snapshot = self.snapshot, None
        if snap is None:
            return
        with contextlib.suppress(NotFoundError):
            await asyncio.to_thread(self.store.hold_snapshot, snap.id, None)
        await release_snapshot(self.paths, self.store, snap.id)

    # --- refilling ------------------------------------------------------------------------
    async def _run(self) -> None:
        while not self._closing:
            self._prune()
            need = self.spec.size - len(self._ready) - self._restoring
            delay = max(self._retry_at, self._refill_at) - time.monotonic()
            if need <= 0 or delay > 0:
                self._wake.clear()
                wait = delay if need > 0 else PRUNE_INTERVAL
                with contextlib.suppress(builtins.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
                continue
            try:
                await self._check_image()
                if self.snapshot is None:
                    async with self._gate:
                        if self._closing:
                            return
                        await self._make_snapshot()
                batch = min(need, self._parallel)
                results = await asyncio.gather(
                    *(self._restore_one() for _ in range(batch)), return_exceptions=True
                )
                errors = [r for r in results if isinstance(r, BaseException)]
                for r in errors:
                    if isinstance(r, asyncio.CancelledError):
                        raise r
                if errors:
                    raise errors[0]
                self._failed_in_a_row = 0
                self._retry_at = 0.0
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._failed(e)

    def _failed(self, e: BaseException) -> None:
        self._failed_in_a_row += 1
        self.failures += 1
        why = e.message if isinstance(e, HutchError) else (str(e) or type(e).__name__)
        self.last_error = why.split("\n", 1)[0]
        delay = backoff(self._failed_in_a_row)
        self._retry_at = time.monotonic() + delay
        log.warning(
            "warm pool %s: %s (failure %d in a row; retrying in %.1f s)",
            self.key,
            why,
            self._failed_in_a_row,
            delay,
        )

    def _prune(self) -> None:
        for box in [b for b in self._ready if not _alive(b)]:
            self._ready.remove(box)
            log.warning("warm pool %s: box %s died while waiting; replacing it", self.key, box.id)
            self._discard(box)

    async def _check_image(self) -> None:
        """Retire the snapshot if the image was replaced in the store since it was made (a new
        pull of the tag), or after repeated failed restores from it."""
        snap = self.snapshot
        if snap is None:
            return
        stale = self._restore_failures_in_a_row >= RESEED_AFTER
        if not stale and snap.image_id is not None:
            rec = await asyncio.to_thread(ImageStore(self.paths).lookup, self.spec.image)
            stale = rec is not None and rec.id != snap.image_id
            if stale:
                log.info("warm pool %s: the image changed; making a new snapshot", self.key)
        if stale:
            self._restore_failures_in_a_row = 0
            boxes = list(self._ready)
            self._ready.clear()
            for b in boxes:
                self._discard(b)
            await self._let_go()

    async def _make_snapshot(self) -> None:
        """Boot a seed box of the key, run one command in it, freeze it (see the module
        docstring)."""
        store = self.store
        seed = Box._from_options(self.template, home=self.paths.home)
        rec = BoxRecord.new(self.template, id=seed.id, name=None, pool=self.label)
        await asyncio.to_thread(store.insert, rec)
        seed._recorded = True
        t0 = time.monotonic()
        try:
            await seed.start()
            await seed._internal_exec("true")
            snap = await seed._snapshot(None, auto_remove=True)
            self.snapshot = snap  # from here on, close() lets go of it
            await asyncio.to_thread(
                store.hold_snapshot, snap.id, ProcessIdentity.current(), pool=self.label
            )
            self.snapshot = dataclasses.replace(snap, pool=self.label)
        finally:
            await asyncio.shield(self._dispose(seed))
        log.info(
            "warm pool %s: snapshot %s made in %.0f ms",
            self.key,
            snap.id,
            (time.monotonic() - t0) * 1000,
        )

    async def _restore_one(self) -> None:
        async with self._gate:
            if self._closing or self.snapshot is None:
                return
            snap = self.snapshot
            box = Box.from_snapshot(snap, home=self.paths.home)
            rec = BoxRecord.new(
                box.options, id=box.id, name=None, snapshot_id=snap.id, pool=self.label
            )
            try:
                await asyncio.to_thread(self.store.insert, rec)
            except NotFoundError:
                self.snapshot = None  # removed behind the pool's back: make a new one
                raise
            box._recorded = True
            self._restoring += 1
            t0 = time.monotonic()
            try:
                await box.start()
                await box._internal_exec("true")  # TCG translates the exec path now
            except BaseException:
                self._restore_failures_in_a_row += 1
                await asyncio.shield(self._dispose(box))
                raise
            finally:
                self._restoring -= 1
        self._restore_failures_in_a_row = 0
        self.last_restore_ms = round((time.monotonic() - t0) * 1000, 1)
        self.restores += 1
        if self._closing or self.snapshot is None or self.snapshot.id != snap.id:
            self._discard(box)  # drained or retired meanwhile
            return
        self._ready.append(box)

    async def wait_full(self, deadline: float) -> None:
        """Until the pool holds its size of ready boxes; TimeoutError at ``deadline``
        (``time.monotonic()``) naming the last failure."""
        while not self.full:
            if time.monotonic() >= deadline:
                why = f"; last failure: {self.last_error}" if self.last_error else ""
                raise TimeoutError(
                    f"warm pool {self.key}: {len(self._ready)} of {self.spec.size} boxes ready"
                    f"{why}",
                    hint="See the log for why restores fail; Runtime.pool_status() counts them.",
                )
            await asyncio.sleep(0.01)


def _alive(box: Box) -> bool:
    channel = box._channel
    return box.state == "running" and channel is not None and not channel.is_closed


__all__ = [
    "PER_BOX_FIELDS",
    "PoolKey",
    "PoolSpec",
    "PoolStatus",
    "WarmPool",
    "backoff",
    "bypass_reason",
    "normalize_image",
    "split_options",
]
