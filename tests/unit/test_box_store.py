"""The box store on real SQLite files: records, lookups, compare-and-set, events, errors."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hutch.errors import (
    BadRequestError,
    ConflictError,
    InvalidStateError,
    NotFoundError,
    StorageError,
)
from hutch.runtime.options import BoxOptions, Port
from hutch.runtime.store import (
    MAX_EVENTS_PER_BOX,
    SCHEMA_VERSION,
    BoxRecord,
    BoxStore,
    ProcessIdentity,
    read_proc_stat,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[BoxStore]:
    s = BoxStore(tmp_path / "home" / "runtime.db")
    yield s
    s.close()


def record(box_id: str, name: str | None = None, **opts: object) -> BoxRecord:
    return BoxRecord.new(BoxOptions(name=name, **opts), id=box_id)  # type: ignore[arg-type]


def test_insert_and_get_by_id_name_and_prefix(store: BoxStore) -> None:
    opts = BoxOptions(name="web", memory_mib=512, env={"A": "1"}, ports=[Port(8080, 80)])
    stored = store.insert(BoxRecord.new(opts))
    assert stored.revision == 1 and stored.state == "created" and stored.name == "web"
    assert len(stored.id) == 17
    got = store.get(stored.id)
    assert got == stored
    assert got.options == opts and got.options.env["A"] == "1"
    assert store.get("web") == stored
    assert store.get(stored.id[:4]) == stored
    assert store.get(stored.id[:12]) == stored
    assert store.find("nothing") is None
    with pytest.raises(NotFoundError) as info:
        store.get("nothing")
    assert "hutch ps -a" in info.value.hint
    with pytest.raises(NotFoundError):
        store.get(stored.id[:3])  # too short for a prefix
    assert store.exists(stored.id) and not store.exists(stored.id[:12])


def test_ambiguous_prefix_and_lookup_order(store: BoxStore) -> None:
    a = store.insert(record("aaaa00000000000001"))
    store.insert(record("aaaa00000000000002"))
    with pytest.raises(ConflictError, match="ambiguous: 2 boxes") as info:
        store.get("aaaa")
    assert "more characters" in info.value.hint
    assert store.get("aaaa00000000000001") == a
    # an exact name wins over an id prefix
    named = store.insert(record("bbbb00000000000001", name="aaaa"))
    assert store.get("aaaa") == named


def test_duplicate_name_is_a_conflict_naming_it(store: BoxStore) -> None:
    first = store.insert(record("0000000000000000a1", name="db"))
    with pytest.raises(ConflictError) as info:
        store.insert(record("0000000000000000a2", name="db"))
    assert "'db'" in info.value.message and first.id in info.value.message
    assert "Pick another name" in info.value.hint
    with pytest.raises(ConflictError, match="already exists"):
        store.insert(record("0000000000000000a1", name="other"))
    assert [r.id for r in store.list()] == [first.id]  # nothing half-written
    # unnamed boxes never clash
    store.insert(record("0000000000000000a3"))
    store.insert(record("0000000000000000a4"))
    # the name is free again once its box is deleted
    store.delete(first.id)
    store.insert(record("0000000000000000a5", name="db"))


def test_insert_rejects_bad_ids_states_and_names(store: BoxStore) -> None:
    with pytest.raises(BadRequestError, match="not a box id"):
        store.insert(record("../../etc"))
    with pytest.raises(BadRequestError, match="state"):
        store.insert(BoxRecord("000000000000000001", None, "busybox", BoxOptions(), state="zombie"))
    with pytest.raises(BadRequestError, match="name"):
        store.insert(BoxRecord("000000000000000001", "Bad Name", "busybox", BoxOptions()))
    with pytest.raises(BadRequestError, match="without an owner"):
        store.insert(
            BoxRecord("000000000000000001", None, "busybox", BoxOptions(), state="running")
        )


def test_list_by_state(store: BoxStore) -> None:
    ids = [store.insert(record(f"00000000000000000{i}")).id for i in range(4)]
    store.claim(ids[1], state="starting")
    store.claim(ids[2], state="running")
    assert [r.id for r in store.list()] == ids
    assert [r.id for r in store.list("created")] == [ids[0], ids[3]]
    assert [r.id for r in store.list({"starting", "running"})] == ids[1:3]
    with pytest.raises(BadRequestError):
        store.list("nonsense")


def test_compare_and_set_state_transitions(store: BoxStore) -> None:
    box = store.insert(record("000000000000000001"))
    with pytest.raises(BadRequestError, match="without an owner"):
        store.update_state(box.id, "starting", expect={"created", "stopped"})
    started = store.claim(box.id, state="starting", expect={"created", "stopped"}, accel="kvm")
    assert (started.state, started.accel, started.revision) == ("starting", "kvm", 2)
    with pytest.raises(InvalidStateError) as info:
        store.update_state(box.id, "starting", expect={"created", "stopped"})
    assert "is starting, expected created or stopped" in info.value.message
    running = store.update_state(box.id, "running", expect={"starting"}, boot_ms=123.5, qemu_pid=42)
    assert running.boot_ms == 123.5 and running.qemu_pid == 42
    # revision CAS: a stale reader loses
    with pytest.raises(InvalidStateError, match="changed since it was read"):
        store.update_state(box.id, "stopping", expect_revision=started.revision)
    with pytest.raises(BadRequestError, match="without an owner"):
        store.update_state(box.id, "stopping", release=True)
    stopped = store.update_state(
        box.id,
        "stopped",
        expect_revision=running.revision,
        release=True,
        qemu_pid=None,
        event=("stop", "bye"),
    )
    assert stopped.qemu_pid is None and stopped.owner is None
    assert stopped.revision == running.revision + 1
    assert store.events(box.id)[-1].kind == "stop"
    with pytest.raises(NotFoundError):
        store.update_state("000000000000000999", "running")
    with pytest.raises(TypeError, match="cannot set"):
        store.update_state(box.id, "running", name="x")
    with pytest.raises(BadRequestError):
        store.update_state(box.id, "exploded")
    # a failed CAS writes nothing (not even its event)
    with pytest.raises(InvalidStateError):
        store.update_state(box.id, "running", expect={"created"}, event=("never", ""))
    assert all(e.kind != "never" for e in store.events(box.id))
    assert store.get(box.id).state == "stopped"


def test_claim_records_identity_and_refuses_live_other_owner(store: BoxStore) -> None:
    box = store.insert(record("000000000000000001"))
    mine = store.claim(box.id, state="starting", expect={"created"})
    me = ProcessIdentity.current()
    assert mine.owner == me and mine.owner_alive() and mine.state == "starting"
    assert store.claim(box.id).owner == me  # re-claiming by the owner is fine
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        other = store.insert(record("000000000000000002"))
        store.claim(other.id, sleeper.pid)
        with pytest.raises(ConflictError, match=f"owned by process {sleeper.pid}"):
            store.claim(other.id)
    finally:
        sleeper.kill()
        sleeper.wait()
    # the owner died: the box may be claimed
    assert store.claim(other.id).owner == me
    released = store.update_state(box.id, "stopped", release=True)
    assert released.owner is None and released.owner_start is None
    with pytest.raises(BadRequestError, match="not running"):
        store.claim(box.id, sleeper.pid)


def test_process_identity_detects_pid_reuse_and_zombies() -> None:
    me = ProcessIdentity.current()
    assert me.alive()
    stat = read_proc_stat(os.getpid())
    assert stat is not None and stat[1] == me.start
    assert not ProcessIdentity(me.pid, (me.start or 0) - 5.0, me.boot).alive()  # reused pid
    assert not ProcessIdentity(me.pid, me.start, "another-boot").alive()
    assert "another process" in ProcessIdentity(me.pid, (me.start or 0) - 5.0).why_dead()
    assert ProcessIdentity.of(0) is None and ProcessIdentity.of(2**22 + 1) is None


def test_zombie_owner_is_dead() -> None:
    child = subprocess.Popen(["true"])
    ident = ProcessIdentity.of(child.pid)
    while (stat := read_proc_stat(child.pid)) is not None and stat[0] != "Z":
        time.sleep(0.001)  # until it has exited (not reaped: we have not called wait)
    assert ProcessIdentity.of(child.pid) is None
    if ident is not None:
        assert not ident.alive()
    assert "exited" in ProcessIdentity(child.pid, None).why_dead()
    child.wait()
    assert not ProcessIdentity(child.pid, None).alive()


def test_events_order_limit_after_and_trim(store: BoxStore) -> None:
    box = store.insert(record("000000000000000001"))
    seqs = [store.add_event(box.id, "log", f"line {i}") for i in range(5)]
    events = store.events(box.id)
    assert [e.kind for e in events] == ["created"] + ["log"] * 5
    assert [e.seq for e in events[1:]] == seqs
    assert [e.detail for e in store.events(box.id, limit=2)] == ["line 3", "line 4"]
    assert [e.detail for e in store.events(box.id, limit=2, after=seqs[1])] == ["line 2", "line 3"]
    with pytest.raises(NotFoundError):
        store.add_event("000000000000000999", "log", "x")
    with pytest.raises(BadRequestError):
        store.add_event(box.id, "", "x")
    for i in range(MAX_EVENTS_PER_BOX + 5):
        store.add_event(box.id, "spam", str(i))
    kept = store.events(box.id, limit=10 * MAX_EVENTS_PER_BOX)
    assert len(kept) == MAX_EVENTS_PER_BOX and kept[-1].detail == str(MAX_EVENTS_PER_BOX + 4)


def test_delete_cascades_to_events(store: BoxStore) -> None:
    a = store.insert(record("000000000000000001"))
    b = store.insert(record("000000000000000002"))
    store.add_event(a.id, "log", "x")
    store.claim(a.id, state="running")
    with pytest.raises(InvalidStateError):
        store.delete(a.id, expect={"created", "stopped", "failed"})
    assert store.delete(a.id)
    assert store.events(a.id) == [] and len(store.events(b.id)) == 1
    with sqlite3.connect(store.path) as raw:
        assert raw.execute("SELECT count(*) FROM events WHERE box_id = ?", (a.id,)).fetchone() == (
            0,
        )
    with pytest.raises(NotFoundError):
        store.delete(a.id)
    assert store.delete(a.id, missing_ok=True) is False


def test_wal_schema_version_and_integrity(store: BoxStore) -> None:
    store.insert(record("000000000000000001"))
    assert store.journal_mode() == "wal"
    assert (store.path.parent / "runtime.db-wal").exists()
    with sqlite3.connect(store.path) as raw:  # a separate connection sees the persistent mode
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert raw.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    assert store.integrity_check() == ["ok"]
    # reopening an existing store migrates nothing and keeps the data
    again = BoxStore(store.path)
    assert [r.id for r in again.list()] == ["000000000000000001"]
    again.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "runtime.db"
    BoxStore(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StorageError, match="schema version") as info:
        BoxStore(path)
    assert "newer hutch" in info.value.hint


def test_corrupt_db_file_is_a_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "runtime.db"
    path.write_bytes(b"this is not a database, just some text that happens to be long enough" * 100)
    with pytest.raises(StorageError) as info:
        BoxStore(path)
    assert str(path) in info.value.message and "corrupt" in info.value.message
    assert "Move it aside" in info.value.hint


def test_damaged_pages_are_a_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "runtime.db"
    with BoxStore(path) as s:
        for i in range(300):
            s.insert(record(f"{i:018x}", name=f"box-{i}", labels={"pad": "x" * 200}))
    with sqlite3.connect(path) as raw:
        raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    page = 4096
    for off in range(2 * page, len(data), page):  # scribble over every page but the header ones
        data[off + 8 : off + 200] = os.urandom(192)
    path.write_bytes(bytes(data))
    with pytest.raises(StorageError) as info:
        s = BoxStore(path)
        s.list()
        s.get("box-299")
        assert s.integrity_check() == ["ok"]
    assert str(path) in info.value.message


def test_unusable_home_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="cannot open the box store"):
        BoxStore(tmp_path / "file" / "runtime.db")


def test_read_only_home_is_a_storage_error(tmp_path: Path) -> None:
    """A folder without write permission; as root (who may write anywhere) the check runs in a
    child process without the capabilities that override file permissions."""
    code = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from hutch.errors import StorageError
        from hutch.runtime.store import BoxStore
        for home in sys.argv[1:]:
            try:
                BoxStore(Path(home) / "runtime.db").list()
            except StorageError as e:
                print("StorageError", e.message, "|", e.hint)
            else:
                print("opened")
        """
    )
    base = Path(tempfile.mkdtemp(prefix="hutch-ro-", dir="/tmp"))
    try:
        empty, existing = base / "empty", base / "existing"
        empty.mkdir()
        BoxStore(existing / "runtime.db").close()
        for p in (base, empty, existing, *existing.iterdir()):
            p.chmod(0o755 if p.is_dir() else 0o644)
        for p in (empty, existing):
            p.chmod(0o555)
        prefix: list[str] = []
        if os.geteuid() == 0:
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("running as root without setpriv: cannot make a folder read-only")
            prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]
        proc = subprocess.run(
            [*prefix, sys.executable, "-c", code, str(empty), str(existing)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        lines = proc.stdout.splitlines()
        assert len(lines) == 2, proc.stderr
        for line in lines:
            assert line.startswith("StorageError"), line
            assert "writable" in line
    finally:
        for p in (base / "empty", base / "existing"):
            if p.exists():
                p.chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)


def test_threads_share_one_store(store: BoxStore) -> None:
    """The async runtime calls the store from to_thread workers."""
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(25):
                rec = store.insert(record(f"{t:09x}{i:09x}", name=f"t{t}-{i}"))
                store.claim(rec.id, state="starting", expect={"created"})
                store.get(f"t{t}-{i}")
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(store.list("starting")) == 100


def test_fork_child_uses_its_own_connection(store: BoxStore) -> None:
    store.insert(record("000000000000000001"))
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            store.insert(record("000000000000000002"))
            code = 0 if len(store.list()) == 2 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(store.list()) == 2
