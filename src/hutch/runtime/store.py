"""The box store: every box of a hutch home, its options, state and events, in ``HOME/runtime.db``.

**Why SQLite, in WAL mode.** Several processes (scripts, the CLI, later a server) share one hutch
home and must never lose or corrupt a record. SQLite gives atomic multi-row transactions that
survive a process being killed at any instant. In WAL (write-ahead log) mode readers never block
the writer and the writer never blocks readers; writers take turns. ``synchronous=NORMAL`` is the
WAL setting that skips an fsync per commit: a killed process loses nothing, a power cut may lose the
last commits but cannot corrupt the file. ``busy_timeout`` makes a writer wait (up to
:data:`BUSY_TIMEOUT`) for another process's transaction instead of failing at once.

**Every write is one short ``BEGIN IMMEDIATE`` transaction.** IMMEDIATE takes the write lock at
``BEGIN``, before the first read. With SQLite's default (deferred) transactions, a
read-then-write could read, lose the race to another writer, and then fail with ``SQLITE_BUSY``
when it tries to write (in WAL mode the busy timeout cannot help then: its snapshot is stale).
Taking the lock first makes each read-check-write below atomic across processes. Transactions
never wait on anything slow (no VM work, no network) while holding the lock.

**Compare-and-set.** :meth:`BoxStore.update_state` changes a box's state only if its current state
is in ``expect`` (else :class:`~hutch.errors.InvalidStateError` naming both); check and write happen
in one transaction, so when two processes race (say both start the same ``created`` box) exactly one
wins and the other is told who won. Every row also carries a ``revision``, bumped by each change:
``expect_revision=`` makes a change conditional on the row being exactly as the caller read it
(crash recovery uses this so that two recovering processes never both act on one box).

**Owners, and pid reuse.** A box in an *active* state (``starting``, ``running``, ``stopping``) is
owned by the process that runs its QEMU: :class:`ProcessIdentity` = pid + start time + boot id. A pid
alone proves nothing: after the owner dies the kernel may hand its pid to an unrelated process. The
start time (field 22 of ``/proc/PID/stat``, clock ticks since boot) of that new process differs, and
after a reboot the boot id (``/proc/sys/kernel/random/boot_id``) does. Zombies count as dead.

**Snapshots** (schema 2) have a table of their own (:class:`~hutch.runtime.snapshots.Snapshot`
rows; names unique among snapshots). A box made from one records it in ``boxes.snapshot_id``, a
foreign key: :meth:`BoxStore.delete_snapshot` refuses (ConflictError) while such boxes exist, in
the same transaction that would delete it, and a box cannot be inserted for a snapshot that is gone.

**Warm pools** (schema 3, :mod:`hutch.runtime.pool`): a box restored ahead of time and waiting in
a runtime's warm pool has ``boxes.pool`` set (its pool's key). Such rows are not boxes of anyone
yet: :meth:`BoxStore.list` and :meth:`BoxStore.find` leave them out (recovery asks for them with
``include_pool=True``), and :meth:`BoxStore.hand_out` turns one into an ordinary box — its options,
name and creation time — in one transaction. A pool's snapshot is *held* by the runtime process
that keeps the pool (``snapshots.holder_*``): :meth:`BoxStore.delete_snapshot` with ``only_auto``
leaves a snapshot alone while its holder lives, so the pool's snapshot survives its boxes coming
and going; once the holder lets go (or dies), it is removed with its last box like any snapshot
made by ``clone()``.

**Opening.** The first process to open a home's store switches it to WAL and creates or migrates
the schema (version in ``PRAGMA user_version``; :data:`MIGRATIONS`). Opening is serialised by a
``flock`` on ``runtime.db.lock`` so that this happens once. A file that is not a usable SQLite
database raises :class:`~hutch.errors.StorageError` naming it, with a hint.

The API is synchronous and every call is short: the async runtime calls it via
``asyncio.to_thread``. One :class:`BoxStore` may be shared by threads (calls are serialised by a
lock); after ``fork()`` the child opens its own connection.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hutch.errors import (
    BadRequestError,
    ConfigError,
    ConflictError,
    InvalidStateError,
    NotFoundError,
    StorageError,
)
from hutch.paths import HutchPaths
from hutch.runtime.options import BoxOptions, check_name
from hutch.runtime.snapshots import Snapshot

log = logging.getLogger("hutch.runtime")

DB_NAME = "runtime.db"
SCHEMA_VERSION = 3
#: Seconds a writer waits for another process's transaction before StorageError.
BUSY_TIMEOUT = 10.0
#: Shortest id prefix :meth:`BoxStore.get` accepts.
MIN_PREFIX = 4
#: Older events of a box are dropped beyond this many.
MAX_EVENTS_PER_BOX = 1000

STATES = ("created", "starting", "running", "stopping", "stopped", "failed")
#: States in which a box has (or is getting) a QEMU, and so must have a live owner.
ACTIVE_STATES = frozenset({"starting", "running", "stopping"})
#: A box id: lowercase hex (``hutch.box.new_box_id``: 11 digits of ms + 6 random). Ids name
#: folders, so nothing else is accepted.
ID_RE = re.compile(r"[0-9a-f]{12,64}")

#: Columns update_state/claim may set besides ``state``.
UPDATABLE = frozenset(
    {
        "image_id",
        "failure",
        "owner_pid",
        "owner_start",
        "owner_boot",
        "qemu_pid",
        "accel",
        "started_at",
        "stopped_at",
        "boot_ms",
    }
)


# --- processes ------------------------------------------------------------------------------
@functools.cache
def boot_id() -> str:
    """This boot's id ("" where the kernel does not tell)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@functools.cache
def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def pid_exists(pid: int) -> bool:
    """Whether a process with this pid exists (signal 0; EPERM still means it exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_proc_stat(pid: int) -> tuple[str, float] | None:
    """(state letter, start time in seconds since boot) of a process, or None if there is none.

    The start time is field 22 of ``/proc/PID/stat`` (clock ticks). Field 2 (the command name) may
    hold spaces and parentheses, so fields are counted after its last ``)``.
    """
    if pid <= 0:
        return None
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    rest = data[data.rfind(b")") + 2 :].split()
    try:
        return rest[0].decode(), int(rest[19]) / _clock_ticks()  # fields 3 and 22
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class ProcessIdentity:
    """One process, told apart from later processes that get the same pid."""

    pid: int
    #: Seconds after boot the process started (None: unknown, only the pid is compared).
    start: float | None
    #: The boot it ran in ("" or None: unknown).
    boot: str | None = None

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity | None:
        """The process now holding ``pid``, or None if there is none (or it is a zombie)."""
        stat = read_proc_stat(pid)
        if stat is None:
            return None
        state, start = stat
        if state in ("Z", "X"):
            return None
        return cls(pid, start, boot_id())

    @classmethod
    def current(cls) -> ProcessIdentity:
        me = cls.of(os.getpid())
        if me is None:  # pragma: no cover - /proc missing
            return cls(os.getpid(), None, boot_id())
        return me

    def alive(self) -> bool:
        """Is this very process still running (not a zombie, not a pid reused since)?"""
        if self.boot and boot_id() and self.boot != boot_id():
            return False  # the host rebooted since
        stat = read_proc_stat(self.pid)
        if stat is None:
            # No readable /proc entry: gone, unless /proc hides other users' processes
            # (hidepid): then the pid existing is all we can know, and alive is the safe answer.
            return pid_exists(self.pid)
        state, start = stat
        if state in ("Z", "X"):
            return False
        if self.start is None:
            return True
        return abs(start - self.start) < 0.5 / _clock_ticks()

    def why_dead(self) -> str:
        """Why :meth:`alive` is false, for events and logs."""
        if self.boot and boot_id() and self.boot != boot_id():
            return f"the host rebooted since its owner process {self.pid} started"
        stat = read_proc_stat(self.pid)
        if stat is None:
            return f"its owner process {self.pid} is gone"
        if stat[0] in ("Z", "X"):
            return f"its owner process {self.pid} has exited"
        return f"its owner process {self.pid} is gone (the pid now belongs to another process)"


# --- records --------------------------------------------------------------------------------
@dataclass(frozen=True)
class BoxRecord:
    """One row of ``boxes``: a box's options and where its lifecycle is."""

    id: str
    name: str | None
    image: str
    options: BoxOptions
    state: str = "created"
    #: The stored image's id (config digest) once the image is resolved.
    image_id: str | None = None
    #: Why the box is ``failed`` (a message), else None.
    failure: str | None = None
    owner_pid: int | None = None
    owner_start: float | None = None
    owner_boot: str | None = None
    qemu_pid: int | None = None
    accel: str | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    stopped_at: float | None = None
    boot_ms: float | None = None
    updated_at: float = 0.0
    #: Bumped by every change (the store sets it; see ``expect_revision``).
    revision: int = 0
    #: The snapshot the box was made from (its disk backs onto the snapshot's), else None.
    snapshot_id: str | None = None
    #: The key of the warm pool the box waits in (not handed out yet), else None.
    pool: str | None = None

    @classmethod
    def new(
        cls,
        options: BoxOptions,
        *,
        id: str | None = None,
        name: str | None = None,
        snapshot_id: str | None = None,
        pool: str | None = None,
    ) -> BoxRecord:
        """A ``created`` record for new options: a fresh sortable id; the name is ``name`` or
        ``options.name`` (None: the box has no name); ``snapshot_id`` for a box made from a
        snapshot; ``pool`` for a box waiting in a warm pool."""
        from hutch.box import new_box_id  # (imported here: hutch.box may come to import us)

        return cls(
            id=id or new_box_id(),
            name=name if name is not None else options.name,
            image=options.image,
            options=options,
            snapshot_id=snapshot_id,
            pool=pool,
        )

    @property
    def owner(self) -> ProcessIdentity | None:
        if self.owner_pid is None:
            return None
        return ProcessIdentity(self.owner_pid, self.owner_start, self.owner_boot)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def owner_alive(self) -> bool:
        owner = self.owner
        return owner is not None and owner.alive()


@dataclass(frozen=True)
class BoxEvent:
    seq: int
    box_id: str
    at: float
    kind: str
    detail: str


_COLUMNS = (
    "id",
    "name",
    "image",
    "image_id",
    "options",
    "state",
    "failure",
    "owner_pid",
    "owner_start",
    "owner_boot",
    "qemu_pid",
    "accel",
    "created_at",
    "started_at",
    "stopped_at",
    "boot_ms",
    "updated_at",
    "revision",
    "snapshot_id",
    "pool",
)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM boxes"
_SNAP_COLUMNS = (
    "id",
    "name",
    "source_box",
    "image",
    "image_id",
    "options",
    "accel",
    "kernel",
    "initramfs",
    "cmdline",
    "ram_bytes",
    "disk_bytes",
    "state_bytes",
    "auto_remove",
    "created_at",
    "pool",
    "holder_pid",
    "holder_start",
    "holder_boot",
)
_SNAP_SELECT = f"SELECT {', '.join(_SNAP_COLUMNS)} FROM snapshots"


# --- schema ---------------------------------------------------------------------------------
def _schema_1(conn: sqlite3.Connection) -> None:
    conn.execute(
        """CREATE TABLE boxes (
            id          TEXT PRIMARY KEY,
            name        TEXT UNIQUE,
            image       TEXT NOT NULL,
            image_id    TEXT,
            options     TEXT NOT NULL,
            state       TEXT NOT NULL,
            failure     TEXT,
            owner_pid   INTEGER,
            owner_start REAL,
            owner_boot  TEXT,
            qemu_pid    INTEGER,
            accel       TEXT,
            created_at  REAL NOT NULL,
            started_at  REAL,
            stopped_at  REAL,
            boot_ms     REAL,
            updated_at  REAL NOT NULL,
            revision    INTEGER NOT NULL DEFAULT 1
        )"""
    )
    conn.execute("CREATE INDEX boxes_state ON boxes (state)")
    conn.execute(
        """CREATE TABLE events (
            seq    INTEGER PRIMARY KEY AUTOINCREMENT,
            box_id TEXT NOT NULL REFERENCES boxes (id) ON DELETE CASCADE,
            at     REAL NOT NULL,
            kind   TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT ''
        )"""
    )
    conn.execute("CREATE INDEX events_box ON events (box_id, seq)")


def _schema_2(conn: sqlite3.Connection) -> None:
    """Snapshots (:mod:`hutch.runtime.snapshots`), and the snapshot each box was made from."""
    conn.execute(
        """CREATE TABLE snapshots (
            id          TEXT PRIMARY KEY,
            name        TEXT UNIQUE,
            source_box  TEXT,
            image       TEXT NOT NULL,
            image_id    TEXT,
            options     TEXT NOT NULL,
            accel       TEXT NOT NULL,
            kernel      TEXT NOT NULL,
            initramfs   TEXT NOT NULL,
            cmdline     TEXT NOT NULL,
            ram_bytes   INTEGER NOT NULL DEFAULT 0,
            disk_bytes  INTEGER NOT NULL DEFAULT 0,
            state_bytes INTEGER NOT NULL DEFAULT 0,
            auto_remove INTEGER NOT NULL DEFAULT 0,
            created_at  REAL NOT NULL
        )"""
    )
    conn.execute("ALTER TABLE boxes ADD COLUMN snapshot_id TEXT REFERENCES snapshots (id)")
    conn.execute("CREATE INDEX boxes_snapshot ON boxes (snapshot_id)")


def _schema_3(conn: sqlite3.Connection) -> None:
    """Warm pools (:mod:`hutch.runtime.pool`): the pool a box waits in, the pool a snapshot was
    made for and the process holding it."""
    conn.execute("ALTER TABLE boxes ADD COLUMN pool TEXT")
    conn.execute("ALTER TABLE snapshots ADD COLUMN pool TEXT")
    conn.execute("ALTER TABLE snapshots ADD COLUMN holder_pid INTEGER")
    conn.execute("ALTER TABLE snapshots ADD COLUMN holder_start REAL")
    conn.execute("ALTER TABLE snapshots ADD COLUMN holder_boot TEXT")


#: ``MIGRATIONS[v]`` brings a version-``v`` database to version ``v + 1``. Steps run inside the one
#: migration transaction: plain ``conn.execute`` only (``executescript`` would commit half way).
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_schema_1, _schema_2, _schema_3)
assert len(MIGRATIONS) == SCHEMA_VERSION


def migrate(conn: sqlite3.Connection, path: Path) -> int:
    """Bring the schema to :data:`SCHEMA_VERSION` in one IMMEDIATE transaction; returns the
    version found. A database from a newer hutch is refused (StorageError)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if found > SCHEMA_VERSION:
            raise StorageError(
                f"the box store {path} has schema version {found}; this hutch knows up to "
                f"{SCHEMA_VERSION}",
                hint="It was written by a newer hutch: upgrade hutch, or use another HUTCH_HOME.",
            )
        for version in range(found, SCHEMA_VERSION):
            MIGRATIONS[version](conn)
        if found != SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise
    return found


def _check_id(box_id: str) -> str:
    if not isinstance(box_id, str) or ID_RE.fullmatch(box_id) is None:
        raise BadRequestError(f"{box_id!r} is not a box id (12 to 64 lowercase hex digits)")
    return box_id


def _check_state(state: str) -> str:
    if state not in STATES:
        raise BadRequestError(f"state must be one of {', '.join(STATES)}, not {state!r}")
    return state


def _check_fields(fields: dict[str, object]) -> None:
    unknown = set(fields) - UPDATABLE
    if unknown:
        raise TypeError(
            f"cannot set {', '.join(sorted(unknown))}; settable: {', '.join(sorted(UPDATABLE))}"
        )


def _ownerless(box_id: str, state: str) -> BadRequestError:
    return BadRequestError(
        f"box {box_id} cannot be {state} without an owner process",
        hint="Enter starting/running/stopping with claim(id, state=...), which records the owner; "
        "recovery treats an ownerless active box as abandoned.",
    )


def _held(snap: Snapshot) -> bool:
    """Is a live process holding this snapshot (for its warm pool)?"""
    if snap.holder_pid is None:
        return False
    return ProcessIdentity(snap.holder_pid, snap.holder_start, snap.holder_boot).alive()


def _expected(expect: Collection[str]) -> str:
    return " or ".join(sorted(expect)) if expect else "(nothing)"


# --- the store ------------------------------------------------------------------------------
class BoxStore:
    """The boxes of one hutch home (see the module docstring). Open it with
    ``BoxStore(paths.home / "runtime.db")`` or :meth:`for_home`; errors opening raise at once."""

    def __init__(self, path: Path, *, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self.path = Path(path).absolute()
        self.busy_timeout = busy_timeout
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        with self._lock:
            self._connection()

    @classmethod
    def for_home(cls, paths: HutchPaths, *, busy_timeout: float = BUSY_TIMEOUT) -> BoxStore:
        return cls(paths.home / DB_NAME, busy_timeout=busy_timeout)

    def __repr__(self) -> str:
        return f"<BoxStore {self.path}>"

    # --- connection -----------------------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        # (After fork() the parent's connection must not be used, nor closed, by the child.)
        self._conn = self._open()
        self._pid = os.getpid()
        return self._conn

    def _open(self) -> sqlite3.Connection:
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise self._os_error(e, lock_path) from e
        try:
            self._flock(fd, lock_path)
            try:
                conn = sqlite3.connect(
                    str(self.path),
                    timeout=self.busy_timeout,
                    isolation_level=None,  # autocommit: transactions are explicit BEGIN IMMEDIATE
                    check_same_thread=False,  # shared by to_thread workers, under self._lock
                )
            except sqlite3.Error as e:
                raise self._db_error(e, "opening") from e
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StorageError(
                        f"the box store {self.path} cannot use write-ahead logging "
                        f"(journal mode is {mode!r})",
                        hint="Put HUTCH_HOME on a local disk (not a network file system).",
                    )
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute("PRAGMA foreign_keys = ON")
                migrate(conn, self.path)
            except BaseException as e:
                conn.close()
                if isinstance(e, sqlite3.Error):
                    raise self._db_error(e, "opening") from e
                raise
        finally:
            os.close(fd)
        return conn

    def _flock(self, fd: int, lock_path: Path) -> None:
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StorageError(
                        f"timed out waiting for {lock_path} (another process is opening the "
                        "box store)",
                        hint=f"Retry; if it persists, look for a hung process: `fuser {lock_path}`.",
                    ) from None
                time.sleep(0.01)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __enter__(self) -> BoxStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- errors ---------------------------------------------------------------------------
    def _os_error(self, e: OSError, where: Path) -> StorageError:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            hint = "Make the hutch home writable, or set HUTCH_HOME to a folder you own."
        elif e.errno == errno.ENOSPC:
            hint = "Free disk space, or point HUTCH_HOME at a bigger disk."
        else:
            hint = "Check the hutch home's disk."
        return StorageError(f"cannot open the box store at {where}: {e.strerror or e}", hint=hint)

    def _db_error(self, e: sqlite3.Error, doing: str) -> StorageError:
        text = str(e)
        low = text.lower()
        if "locked" in low or "busy" in low:
            return StorageError(
                f"{doing} the box store {self.path}: it stayed locked by another process for "
                f"more than {self.busy_timeout:g} s",
                hint=f"Retry; if it persists, look for a hung process: `fuser {self.path}`.",
            )
        if "readonly" in low or "read-only" in low or "unable to open" in low:
            return StorageError(
                f"{doing} the box store {self.path} failed: {text}",
                hint="Make the hutch home writable, or set HUTCH_HOME to a folder you own.",
            )
        if "full" in low:
            return StorageError(
                f"{doing} the box store {self.path} failed: {text}",
                hint="Free disk space, or point HUTCH_HOME at a bigger disk.",
            )
        if "not a database" in low or "malformed" in low or "corrupt" in low:
            return StorageError(
                f"the box store {self.path} is corrupt or not a hutch database: {text}",
                hint=f"Move it aside (`mv {self.path} {self.path}.broken`) and hutch starts an "
                "empty store; the boxes it listed are forgotten and their folders under boxes/ "
                "are reclaimed.",
            )
        return StorageError(
            f"{doing} the box store {self.path} failed: {text}",
            hint="Check the hutch home's disk; `hutch doctor` checks the store.",
        )

    # --- transactions ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _read(self, doing: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._connection()
            try:
                yield conn
            except sqlite3.Error as e:
                raise self._db_error(e, doing) from e

    @contextlib.contextmanager
    def _write(self, doing: str) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: committed if the block ends normally, rolled back
        if it raises (hutch errors pass through; SQLite errors become StorageError)."""
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise self._db_error(e, doing) from e
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as e:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                if isinstance(e, sqlite3.Error):
                    raise self._db_error(e, doing) from e
                raise

    def _record(self, row: sqlite3.Row | tuple[Any, ...]) -> BoxRecord:
        values = dict(zip(_COLUMNS, row, strict=True))
        try:
            values["options"] = BoxOptions.from_json(json.loads(values["options"]))
        except (ValueError, KeyError, TypeError, ConfigError) as e:
            raise StorageError(
                f"box {values['id']} in {self.path}: its stored options are unreadable: {e}",
                hint=f"Remove the box (`hutch rm -f {values['id']}`).",
            ) from e
        return BoxRecord(**values)

    def _row(self, conn: sqlite3.Connection, box_id: str) -> BoxRecord | None:
        row = conn.execute(f"{_SELECT} WHERE id = ?", (box_id,)).fetchone()
        return None if row is None else self._record(row)

    def _require(self, conn: sqlite3.Connection, box_id: str) -> BoxRecord:
        rec = self._row(conn, box_id)
        if rec is None:
            raise NotFoundError(f"no box {box_id!r}", hint="`hutch ps -a` lists all boxes.")
        return rec

    @staticmethod
    def _check_expect(
        rec: BoxRecord, expect: Collection[str] | None, expect_revision: int | None
    ) -> None:
        if expect is not None and rec.state not in expect:
            raise InvalidStateError(
                f"box {rec.id} is {rec.state}, expected {_expected(expect)}",
                hint="Another process changed it first; look again (`hutch ps -a`).",
            )
        if expect_revision is not None and rec.revision != expect_revision:
            raise InvalidStateError(
                f"box {rec.id} changed since it was read (revision {rec.revision}, expected "
                f"{expect_revision}); it is now {rec.state}",
                hint="Another process changed it first; look again (`hutch ps -a`).",
            )

    def _add_event(self, conn: sqlite3.Connection, box_id: str, kind: str, detail: str) -> int:
        if not isinstance(kind, str) or not 0 < len(kind) <= 64:
            raise BadRequestError(f"event kind must be 1 to 64 characters, not {kind!r}")
        cur = conn.execute(
            "INSERT INTO events (box_id, at, kind, detail) VALUES (?, ?, ?, ?)",
            (box_id, time.time(), kind, str(detail)),
        )
        conn.execute(
            """DELETE FROM events WHERE box_id = ? AND seq <= (
                   SELECT seq FROM events WHERE box_id = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)""",
            (box_id, box_id, MAX_EVENTS_PER_BOX),
        )
        return int(cur.lastrowid or 0)

    # --- writing --------------------------------------------------------------------------
    def insert(self, record: BoxRecord) -> BoxRecord:
        """Add a box (and its ``created`` event); returns it as stored (revision 1).

        A taken name raises ConflictError naming it and the box that has it."""
        _check_id(record.id)
        _check_state(record.state)
        if record.name is not None:
            check_name(record.name)
        if record.active and record.owner_pid is None:
            raise _ownerless(record.id, record.state)
        now = time.time()
        stored = replace(record, updated_at=now, revision=1)
        values = [getattr(stored, c) for c in _COLUMNS]
        values[_COLUMNS.index("options")] = json.dumps(record.options.to_json(), sort_keys=True)
        with self._write("adding a box to") as conn:
            try:
                conn.execute(
                    f"INSERT INTO boxes ({', '.join(_COLUMNS)}) "
                    f"VALUES ({', '.join('?' * len(_COLUMNS))})",
                    values,
                )
            except sqlite3.IntegrityError as e:
                if "boxes.name" in str(e):
                    row = conn.execute(
                        "SELECT id FROM boxes WHERE name = ?", (record.name,)
                    ).fetchone()
                    other = f" (box {row[0]})" if row else ""
                    raise ConflictError(
                        f"the name {record.name!r} is already taken{other}",
                        hint="Pick another name, or remove the old box first "
                        f"(`hutch rm {record.name}`).",
                    ) from None
                if "boxes.id" in str(e):
                    raise ConflictError(f"a box with id {record.id} already exists") from None
                if "FOREIGN KEY" in str(e) and record.snapshot_id is not None:
                    raise NotFoundError(
                        f"no snapshot {record.snapshot_id!r} (it was removed)",
                        hint="List snapshots with Runtime.snapshots().",
                    ) from None
                raise
            detail = f"image {record.image}"
            if record.snapshot_id is not None:
                detail += f", from snapshot {record.snapshot_id}"
            self._add_event(conn, record.id, "created", detail)
        return stored

    def update_state(
        self,
        box_id: str,
        state: str,
        *,
        expect: Collection[str] | None = None,
        expect_revision: int | None = None,
        release: bool = False,
        event: tuple[str, str] | None = None,
        **fields: Any,
    ) -> BoxRecord:
        """Set ``state`` (and the columns in ``fields``, see :data:`UPDATABLE`) atomically.

        Compare-and-set: with ``expect``, only if the current state is one of them; with
        ``expect_revision``, only if nothing changed since that revision was read — else
        InvalidStateError naming the current state. ``release`` clears the owner; ``event``
        (kind, detail) is recorded in the same transaction. Returns the updated record.

        An active state (starting/running/stopping) needs an owner: enter one with
        :meth:`claim`, and ``release`` only when leaving it (else BadRequestError).
        """
        _check_state(state)
        _check_fields(fields)
        if release:
            fields.update(owner_pid=None, owner_start=None, owner_boot=None)
        with self._write("updating a box in") as conn:
            rec = self._require(conn, box_id)
            self._check_expect(rec, expect, expect_revision)
            owner_after = fields.get("owner_pid", rec.owner_pid)
            if state in ACTIVE_STATES and owner_after is None:
                raise _ownerless(box_id, state)
            self._update(conn, box_id, state, fields)
            if event is not None:
                self._add_event(conn, box_id, *event)
            return self._require(conn, box_id)

    def claim(
        self,
        box_id: str,
        pid: int | None = None,
        *,
        state: str | None = None,
        expect: Collection[str] | None = None,
        expect_revision: int | None = None,
        event: tuple[str, str] | None = None,
        **fields: Any,
    ) -> BoxRecord:
        """Make process ``pid`` (default: this one) the box's owner, recording its start time and
        boot id; optionally set ``state`` (and ``fields``) in the same transaction.

        Allowed when the box has no owner, its owner is this very process, or its owner is dead;
        a *live* other owner raises ConflictError. ``expect``/``expect_revision`` as in
        :meth:`update_state`.
        """
        me = ProcessIdentity.of(os.getpid() if pid is None else pid)
        if me is None:
            raise BadRequestError(f"process {pid} is not running; it cannot own a box")
        if state is not None:
            _check_state(state)
        _check_fields(fields)
        fields.update(owner_pid=me.pid, owner_start=me.start, owner_boot=me.boot)
        with self._write("claiming a box in") as conn:
            rec = self._require(conn, box_id)
            self._check_expect(rec, expect, expect_revision)
            owner = rec.owner
            if owner is not None and owner != me and owner.alive():
                raise ConflictError(
                    f"box {box_id} is owned by process {owner.pid}, which is still running",
                    hint="Another hutch process is using it; stop it there first.",
                )
            self._update(conn, box_id, state or rec.state, fields)
            if event is not None:
                self._add_event(conn, box_id, *event)
            return self._require(conn, box_id)

    def _update(
        self, conn: sqlite3.Connection, box_id: str, state: str, fields: dict[str, Any]
    ) -> None:
        sets = ["state = ?", "updated_at = ?", "revision = revision + 1"]
        sets += [f"{k} = ?" for k in fields]
        conn.execute(
            f"UPDATE boxes SET {', '.join(sets)} WHERE id = ?",
            (state, time.time(), *fields.values(), box_id),
        )

    def add_event(self, box_id: str, kind: str, detail: str = "") -> int:
        """Record an event; returns its sequence number. NotFoundError for an unknown box."""
        with self._write("recording an event in") as conn:
            self._require(conn, box_id)
            return self._add_event(conn, box_id, kind, detail)

    def delete(
        self, box_id: str, *, expect: Collection[str] | None = None, missing_ok: bool = False
    ) -> bool:
        """Delete a box's row and (cascading) its events; with ``expect``, only in those states.
        Returns whether a row was deleted (a missing box raises NotFoundError unless
        ``missing_ok``)."""
        with self._write("removing a box from") as conn:
            rec = self._row(conn, box_id)
            if rec is None:
                if missing_ok:
                    return False
                raise NotFoundError(f"no box {box_id!r}", hint="`hutch ps -a` lists all boxes.")
            self._check_expect(rec, expect, None)
            conn.execute("DELETE FROM boxes WHERE id = ?", (box_id,))
            return True

    # --- reading --------------------------------------------------------------------------
    def find(self, id_or_name: str) -> BoxRecord | None:
        """Like :meth:`get`, but None when nothing matches (boxes waiting in a warm pool never
        match: they are nobody's yet)."""
        key = str(id_or_name)
        mine = "pool IS NULL"
        with self._read("reading") as conn:
            row = conn.execute(f"{_SELECT} WHERE id = ? AND {mine}", (key,)).fetchone()
            if row is None:
                row = conn.execute(f"{_SELECT} WHERE name = ? AND {mine}", (key,)).fetchone()
            if row is None and len(key) >= MIN_PREFIX and re.fullmatch(r"[0-9a-f]+", key):
                rows = conn.execute(
                    f"{_SELECT} WHERE id >= ? AND id < ? AND {mine} ORDER BY id LIMIT 3",
                    (key, key + "g"),  # 'g' sorts after every hex digit
                ).fetchall()
                if len(rows) > 1:
                    (count,) = conn.execute(
                        f"SELECT count(*) FROM boxes WHERE id >= ? AND id < ? AND {mine}",
                        (key, key + "g"),
                    ).fetchone()
                    shown = ", ".join(r[0] for r in rows[:2])
                    raise ConflictError(
                        f"box id prefix {key!r} is ambiguous: {count} boxes match ({shown}, …)",
                        hint="Give more characters of the id, or use the box's name.",
                    )
                row = rows[0] if rows else None
            return None if row is None else self._record(row)

    def exists(self, box_id: str) -> bool:
        """Is there a box with exactly this id?"""
        with self._read("reading") as conn:
            return (
                conn.execute("SELECT 1 FROM boxes WHERE id = ?", (box_id,)).fetchone() is not None
            )

    def by_id(self, box_id: str) -> BoxRecord | None:
        """The box with exactly this id (no name or prefix matching), or None."""
        with self._read("reading") as conn:
            return self._row(conn, box_id)

    def get(self, id_or_name: str) -> BoxRecord:
        """A box by exact id, exact name, or unique id prefix (≥ :data:`MIN_PREFIX` characters),
        tried in that order. NotFoundError if none; ConflictError for an ambiguous prefix."""
        rec = self.find(id_or_name)
        if rec is None:
            raise NotFoundError(
                f"no box with id or name {id_or_name!r}", hint="`hutch ps -a` lists all boxes."
            )
        return rec

    def list(
        self, state: str | Collection[str] | None = None, *, include_pool: bool = False
    ) -> builtins.list[BoxRecord]:
        """All boxes (oldest first), or those in ``state`` (one state or several). Boxes waiting
        in a warm pool only with ``include_pool`` (crash recovery needs them)."""
        where = [] if include_pool else ["pool IS NULL"]
        args: builtins.list[str] = []
        if state is not None:
            states = [state] if isinstance(state, str) else sorted(state)
            for s in states:
                _check_state(s)
            where.append(f"state IN ({', '.join('?' * len(states))})")
            args += states
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        with self._read("reading") as conn:
            rows = conn.execute(f"{_SELECT}{clause} ORDER BY id", args).fetchall()
            return [self._record(r) for r in rows]

    def hand_out(
        self, box_id: str, *, pool: str, options: BoxOptions, name: str | None
    ) -> BoxRecord:
        """Make a box waiting in the warm pool ``pool`` an ordinary box with these options and
        name, created now (one transaction). InvalidStateError unless it is a running box of
        that pool; ConflictError if the name is taken (the box stays in the pool then)."""
        if name is not None:
            check_name(name)
        with self._write("handing out a box in") as conn:
            rec = self._require(conn, box_id)
            if rec.pool != pool or rec.state != "running":
                raise InvalidStateError(
                    f"box {box_id} is not a running box of the warm pool {pool} "
                    f"(pool {rec.pool}, {rec.state})"
                )
            now = time.time()
            try:
                conn.execute(
                    "UPDATE boxes SET name = ?, image = ?, options = ?, pool = NULL, "
                    "created_at = ?, updated_at = ?, revision = revision + 1 WHERE id = ?",
                    (
                        name,
                        options.image,
                        json.dumps(options.to_json(), sort_keys=True),
                        now,
                        now,
                        box_id,
                    ),
                )
            except sqlite3.IntegrityError as e:
                if "boxes.name" in str(e):
                    raise ConflictError(
                        f"the name {name!r} is already taken",
                        hint=f"Pick another name, or remove the old box first (`hutch rm {name}`).",
                    ) from None
                raise
            self._add_event(conn, box_id, "handed-out", f"from the warm pool {pool}")
            return self._require(conn, box_id)

    def events(
        self, box_id: str, limit: int = 100, *, after: int | None = None
    ) -> builtins.list[BoxEvent]:
        """A box's events, oldest first: the last ``limit`` ones, or with ``after`` the first
        ``limit`` ones whose seq is greater (to follow a box)."""
        with self._read("reading") as conn:
            if after is None:
                rows = conn.execute(
                    "SELECT seq, box_id, at, kind, detail FROM events WHERE box_id = ? "
                    "ORDER BY seq DESC LIMIT ?",
                    (box_id, limit),
                ).fetchall()
                rows.reverse()
            else:
                rows = conn.execute(
                    "SELECT seq, box_id, at, kind, detail FROM events WHERE box_id = ? AND seq > ? "
                    "ORDER BY seq LIMIT ?",
                    (box_id, after, limit),
                ).fetchall()
            return [BoxEvent(*r) for r in rows]

    # --- snapshots ------------------------------------------------------------------------
    def _snapshot(self, row: sqlite3.Row | tuple[Any, ...]) -> Snapshot:
        values = dict(zip(_SNAP_COLUMNS, row, strict=True))
        try:
            values["options"] = BoxOptions.from_json(json.loads(values["options"]))
        except (ValueError, KeyError, TypeError, ConfigError) as e:
            raise StorageError(
                f"snapshot {values['id']} in {self.path}: its stored options are unreadable: {e}",
                hint="Remove the snapshot (Runtime.remove_snapshot).",
            ) from e
        values["auto_remove"] = bool(values["auto_remove"])
        return Snapshot(**values)

    def hold_snapshot(
        self, snapshot_id: str, holder: ProcessIdentity | None, *, pool: str | None = None
    ) -> None:
        """Let ``holder`` (a live process: the one keeping a warm pool) keep an ``auto_remove``
        snapshot while no box uses it; None lets go. ``pool`` records the pool's key too.
        NotFoundError if there is no such snapshot."""
        values = (None, None, None) if holder is None else (holder.pid, holder.start, holder.boot)
        with self._write("updating a snapshot in") as conn:
            cur = conn.execute(
                "UPDATE snapshots SET holder_pid = ?, holder_start = ?, holder_boot = ?, "
                "pool = coalesce(?, pool) WHERE id = ?",
                (*values, pool, snapshot_id),
            )
            if cur.rowcount == 0:
                raise NotFoundError(f"no snapshot {snapshot_id!r}")

    def insert_snapshot(self, snap: Snapshot) -> Snapshot:
        """Record a snapshot whose folder is complete. A taken name raises ConflictError."""
        _check_id(snap.id)
        if snap.name is not None:
            check_name(snap.name)
        values = [getattr(snap, c) for c in _SNAP_COLUMNS]
        values[_SNAP_COLUMNS.index("options")] = json.dumps(snap.options.to_json(), sort_keys=True)
        values[_SNAP_COLUMNS.index("auto_remove")] = int(snap.auto_remove)
        with self._write("adding a snapshot to") as conn:
            try:
                conn.execute(
                    f"INSERT INTO snapshots ({', '.join(_SNAP_COLUMNS)}) "
                    f"VALUES ({', '.join('?' * len(_SNAP_COLUMNS))})",
                    values,
                )
            except sqlite3.IntegrityError as e:
                if "snapshots.name" in str(e):
                    raise ConflictError(
                        f"the snapshot name {snap.name!r} is already taken",
                        hint="Pick another name, or remove the old snapshot first.",
                    ) from None
                raise ConflictError(f"a snapshot with id {snap.id} already exists") from None
            if snap.source_box is not None and self._row(conn, snap.source_box) is not None:
                name = f" {snap.name!r}" if snap.name else ""
                self._add_event(conn, snap.source_box, "snapshot", f"snapshot {snap.id}{name}")
        return snap

    def find_snapshot(self, id_or_name: str) -> Snapshot | None:
        """A snapshot by exact id, exact name or unique id prefix (ConflictError if ambiguous)."""
        key = str(id_or_name)
        with self._read("reading") as conn:
            row = conn.execute(f"{_SNAP_SELECT} WHERE id = ?", (key,)).fetchone()
            if row is None:
                row = conn.execute(f"{_SNAP_SELECT} WHERE name = ?", (key,)).fetchone()
            if row is None and len(key) >= MIN_PREFIX and re.fullmatch(r"[0-9a-f]+", key):
                rows = conn.execute(
                    f"{_SNAP_SELECT} WHERE id >= ? AND id < ? ORDER BY id LIMIT 2",
                    (key, key + "g"),
                ).fetchall()
                if len(rows) > 1:
                    raise ConflictError(
                        f"snapshot id prefix {key!r} is ambiguous",
                        hint="Give more characters of the id, or use the snapshot's name.",
                    )
                row = rows[0] if rows else None
            return None if row is None else self._snapshot(row)

    def get_snapshot(self, id_or_name: str) -> Snapshot:
        snap = self.find_snapshot(id_or_name)
        if snap is None:
            raise NotFoundError(
                f"no snapshot with id or name {id_or_name!r}",
                hint="Runtime.snapshots() lists the snapshots.",
            )
        return snap

    def list_snapshots(self) -> builtins.list[Snapshot]:
        """All snapshots, oldest first."""
        with self._read("reading") as conn:
            return [self._snapshot(r) for r in conn.execute(f"{_SNAP_SELECT} ORDER BY id")]

    def snapshot_users(self, snapshot_id: str) -> builtins.list[str]:
        """Ids of the boxes made from the snapshot."""
        with self._read("reading") as conn:
            rows = conn.execute(
                "SELECT id FROM boxes WHERE snapshot_id = ? ORDER BY id", (snapshot_id,)
            ).fetchall()
            return [str(r[0]) for r in rows]

    def delete_snapshot(self, snapshot_id: str, *, only_auto: bool = False) -> bool:
        """Delete a snapshot's row — refused with ConflictError while boxes were made from it.

        ``only_auto``: only an ``auto_remove`` snapshot, only when unused and not held by a live
        process (a warm pool's: :meth:`hold_snapshot`) — no error then; returns whether a row was
        deleted. The caller removes the folder afterwards."""
        with self._write("removing a snapshot from") as conn:
            row = conn.execute(f"{_SNAP_SELECT} WHERE id = ?", (snapshot_id,)).fetchone()
            if row is None:
                if only_auto:
                    return False
                raise NotFoundError(f"no snapshot {snapshot_id!r}")
            users = [
                str(r[0])
                for r in conn.execute(
                    "SELECT id FROM boxes WHERE snapshot_id = ? ORDER BY id LIMIT 6",
                    (snapshot_id,),
                )
            ]
            snap = self._snapshot(row)
            if only_auto and (users or not snap.auto_remove or _held(snap)):
                return False
            if users:
                shown = ", ".join(users[:5]) + (", …" if len(users) > 5 else "")
                raise ConflictError(
                    f"snapshot {snapshot_id} is used by boxes made from it ({shown})",
                    hint="Their disks build on the snapshot's: remove those boxes first.",
                )
            conn.execute("DELETE FROM snapshots WHERE id = ?", (snapshot_id,))
            return True

    def integrity_check(self) -> builtins.list[str]:
        """SQLite's own check of the file: ``["ok"]`` when healthy (for ``hutch doctor``)."""
        with self._read("checking") as conn:
            return [str(r[0]) for r in conn.execute("PRAGMA integrity_check").fetchall()]

    def journal_mode(self) -> str:
        with self._read("reading") as conn:
            return str(conn.execute("PRAGMA journal_mode").fetchone()[0])


__all__ = [
    "ACTIVE_STATES",
    "DB_NAME",
    "STATES",
    "BoxEvent",
    "BoxRecord",
    "BoxStore",
    "ProcessIdentity",
    "boot_id",
    "migrate",
    "read_proc_stat",
]
