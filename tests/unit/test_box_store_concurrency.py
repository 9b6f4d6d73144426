"""Several real processes writing one box store at the same time: no lost or corrupted records,
every compare-and-set won by exactly one process, contested names taken exactly once."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

from hutch.runtime.options import BoxOptions
from hutch.runtime.store import BoxRecord, BoxStore

REPO = Path(__file__).resolve().parents[2]
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable))

WORKERS = 4
PER_WORKER = 200
SHARED = 60
CONTESTED_EVERY = 10

WORKER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from hutch.errors import ConflictError, InvalidStateError
    from hutch.runtime.options import BoxOptions
    from hutch.runtime.store import BoxRecord, BoxStore

    db, worker, n, contested_every = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    shared = sys.argv[5].split(",")
    store = BoxStore(db)
    print("ready", flush=True)
    sys.stdin.readline()  # the start line: all workers go at once

    def insert(options):
        while True:
            try:
                return store.insert(BoxRecord.new(options))
            except ConflictError as e:
                if "already exists" not in e.message:  # an id collision: take a new id
                    raise

    out = {"inserted": [], "contested": [], "wins": []}
    for i in range(n):
        rec = insert(BoxOptions(name=f"w{worker}-{i}", labels={"worker": str(worker), "i": str(i)}))
        out["inserted"].append(rec.id)
        if i % contested_every == 0:
            try:
                insert(BoxOptions(name=f"contested-{i}"))
                out["contested"].append(i)
            except ConflictError:
                pass
        if i < len(shared):
            # every worker walks every shared box created -> starting -> running -> stopped
            for j in (i, len(shared) - 1 - i):
                sid = shared[j]
                for old, new in (("created", "starting"), ("starting", "running"), ("running", "stopped")):
                    event = ("won", f"{worker}:{old}->{new}")
                    try:
                        if new == "starting":  # entering an active state: take ownership
                            store.claim(sid, state=new, expect={old}, event=event)
                        else:
                            store.update_state(sid, new, expect={old}, event=event, release=new == "stopped")
                        out["wins"].append([sid, new])
                    except InvalidStateError:
                        pass
    store.close()
    print(json.dumps(out), flush=True)
    """
)


def test_concurrent_processes_lose_nothing(tmp_path: Path) -> None:
    db = tmp_path / "home" / "runtime.db"
    store = BoxStore(db)
    shared = [store.insert(BoxRecord.new(BoxOptions(name=f"shared-{k}"))).id for k in range(SHARED)]

    procs = [
        subprocess.Popen(
            [
                PYTHON,
                "-c",
                WORKER,
                str(db),
                str(w),
                str(PER_WORKER),
                str(CONTESTED_EVERY),
                ",".join(shared),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for w in range(WORKERS)
    ]
    try:
        for p in procs:  # every worker has opened the store
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results: list[dict[str, Any]] = []
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    # every insert is there, exactly once, intact
    rows = {r.id: r for r in store.list()}
    inserted = [i for r in results for i in r["inserted"]]
    assert len(inserted) == len(set(inserted)) == WORKERS * PER_WORKER
    for w, r in enumerate(results):
        for i, box_id in enumerate(r["inserted"]):
            rec = rows[box_id]
            assert rec.name == f"w{w}-{i}" and rec.state == "created"
            assert dict(rec.options.labels) == {"worker": str(w), "i": str(i)}
            assert [e.kind for e in store.events(box_id)] == ["created"]

    # the workers really ran at the same time (their insert periods overlap)
    spans = [
        (rows[r["inserted"][0]].created_at, rows[r["inserted"][-1]].created_at) for r in results
    ]
    assert max(start for start, _ in spans) < min(end for _, end in spans)

    # each contested name went to exactly one worker
    contested = Counter(i for r in results for i in r["contested"])
    assert sorted(contested) == list(range(0, PER_WORKER, CONTESTED_EVERY))
    assert set(contested.values()) == {1}

    # each compare-and-set transition of each shared box was won by exactly one worker
    wins = Counter((sid, new) for r in results for sid, new in r["wins"])
    assert set(wins.values()) == {1}
    assert len(wins) == SHARED * 3
    for sid in shared:
        rec = rows[sid]
        assert rec.state == "stopped" and rec.revision == 4
        assert [e.kind for e in store.events(sid)] == ["created", "won", "won", "won"]
        assert [e.detail.split("->")[1] for e in store.events(sid)[1:]] == [
            "starting",
            "running",
            "stopped",
        ]

    expected = SHARED + WORKERS * PER_WORKER + len(contested)
    assert len(rows) == expected
    assert store.integrity_check() == ["ok"]
    store.close()
    with sqlite3.connect(db) as raw:  # an independent look at the file
        assert raw.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
        assert raw.execute("SELECT count(*) FROM boxes").fetchone() == (expected,)
        assert raw.execute("SELECT count(DISTINCT name) FROM boxes").fetchone() == (expected,)
