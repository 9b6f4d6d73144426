"""hutch.Runtime over a real SQLite store, real guests and real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import hutch
from hutch.errors import ConflictError, InvalidStateError, NotFoundError
from hutch.paths import HutchPaths
from hutch.runtime.store import BoxStore
from tests.support.homes import make_home

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_home(tmp_path_factory.mktemp("rt") / "home")


def child(home: Path, body: str) -> subprocess.Popen[str]:
    """A separate Python process running ``body`` inside ``async with Runtime(home) as rt``."""
    script = "import asyncio, sys, hutch\nasync def main():\n"
    script += f"    async with hutch.Runtime({str(home)!r}) as rt:\n"
    script += textwrap.indent(textwrap.dedent(body), " " * 8)
    script += "\nasyncio.run(main())\n"
    return subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


async def test_stopped_box_is_started_by_another_process(home: Path) -> None:
    async with hutch.Runtime(home) as rt:
        box = await rt.create(image="busybox", name="persist")
        await box.start()
        r = await box.exec("sh", "-c", "echo kept > /root/note")
        r.assert_success()
        await box.stop()
        [rec] = await rt.list()
        assert (rec.name, rec.state, rec.owner_pid) == ("persist", "stopped", None)
    p = child(
        home,
        """
        box = await rt.get("persist")
        await box.start()
        print((await box.exec("cat", "/root/note")).stdout, end="")
        await box.stop()
        """,
    )
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert out == "kept\n"
    async with hutch.Runtime(home) as rt:
        events = rt.store.events((await rt.get("persist")).id)
        assert [e.kind for e in events].count("start") == 2
        await rt.remove("persist")
        with pytest.raises(NotFoundError, match="persist"):
            await rt.get("persist")
        assert not (HutchPaths(home).boxes / events[0].box_id).exists()


async def test_sigkilled_owner_is_recovered(home: Path) -> None:
    p = child(
        home,
        """
        box = await rt.create(image="busybox", name="doomed")
        await box.start()
        print(box.id, box.qemu_pid, flush=True)
        await asyncio.sleep(3600)
        """,
    )
    assert p.stdout is not None
    box_id, qemu_pid = p.stdout.readline().split()
    async with hutch.Runtime(home) as rt:
        other = await rt.get("doomed")  # running in the child: visible, not drivable
        assert other.state == "running"
        with pytest.raises(InvalidStateError, match=f"pid {p.pid}"):
            await other.exec("true")
        with pytest.raises(InvalidStateError, match="force"):
            await rt.remove("doomed")
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=10)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{qemu_pid}") and time.monotonic() < deadline:
        time.sleep(0.1)  # QEMU dies with its owner (pdeathsig)
    async with hutch.Runtime(home) as rt:
        box = await rt.get("doomed")
        assert box.state == "stopped" and box.id == box_id
        assert rt.last_recovery is not None
        assert [b.id for b in rt.last_recovery.boxes] == [box_id]
        assert not (HutchPaths(home).run / box_id).exists()
        kinds = [e.kind for e in rt.store.events(box_id)]
        assert "recovered" in kinds
        # the disk survived: it starts again here
        await box.start()
        assert (await box.exec("true")).exit_code == 0
        await rt.remove("doomed", force=True)
    assert BoxStore.for_home(HutchPaths(home)).find("doomed") is None


async def test_force_remove_of_a_box_another_process_runs(home: Path) -> None:
    p = child(
        home,
        """
        box = await rt.create(image="busybox", name="theirs")
        await box.start()
        print(box.qemu_pid, flush=True)
        await asyncio.sleep(3600)
        """,
    )
    try:
        assert p.stdout is not None
        qemu_pid = int(p.stdout.readline())
        async with hutch.Runtime(home) as rt:
            await rt.remove("theirs", force=True)
            assert [r.name for r in await rt.list()] == []
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{qemu_pid}") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{qemu_pid}")
    finally:
        p.kill()
        p.wait()


async def test_names_ids_and_ephemeral_run(home: Path) -> None:
    async with hutch.Runtime(home) as rt:
        a = await rt.create(image="busybox", name="alpha")
        with pytest.raises(ConflictError, match="alpha"):
            await rt.create(image="busybox", name="alpha")
        assert (await rt.get(a.id)) is a and (await rt.get("alpha")) is a
        assert [r.id for r in await rt.list(state="created")] == [a.id]
        r = await rt.run("busybox", "sh", "-c", "echo $X", env={"X": "from options"})
        assert r.stdout == "from options\n"
        assert [x.name for x in await rt.list()] == ["alpha"]  # the ephemeral box is gone
        await rt.remove("alpha")
    with pytest.raises(hutch.ConfigError, match="name"):
        hutch.BoxOptions(name="Bad Name")


async def test_cli_ps_logs_rm(home: Path) -> None:
    from tests.conftest import hutch_cli

    env = {"HUTCH_HOME": str(home)}
    async with hutch.Runtime(home) as rt:
        box = await rt.create(image="busybox", name="cli-box")
        await box.start()
        running = hutch_cli("ps", "--json", env_extra=env)
        [row] = [r for r in json.loads(running.stdout) if r["name"] == "cli-box"]
        assert row["state"] == "running" and row["owner_pid"] == os.getpid()
        await box.stop()
    assert hutch_cli("ps", "--json", env_extra=env).stdout.strip() == b"[]"
    listing = json.loads(hutch_cli("ps", "-a", "--json", env_extra=env).stdout)
    assert [(r["name"], r["state"]) for r in listing] == [("cli-box", "stopped")]
    doc = json.loads(hutch_cli("inspect", "cli-box", env_extra=env).stdout)
    assert (doc["kind"], doc["state"], doc["options"]["image"]) == ("box", "stopped", "busybox")
    assert [e["kind"] for e in doc["events"]][:2] == ["created", "start"]
    nothing = hutch_cli("inspect", "no-such-thing", env_extra=env)
    assert nothing.returncode == 125 and b"no box or image" in nothing.stderr
    logs = hutch_cli("logs", "cli-box", env_extra=env)
    assert logs.returncode == 0 and b"reboot" in logs.stdout  # the quiet kernel's last words
    rm = hutch_cli("rm", "cli-box", "nope", env_extra=env)
    assert rm.returncode == 125 and rm.stdout == b"cli-box\n" and b"nope" in rm.stderr
    assert json.loads(hutch_cli("ps", "-a", "--json", env_extra=env).stdout) == []


async def test_disk_size_grows_the_root_filesystem(home: Path) -> None:
    async with hutch.Runtime(home) as rt:
        small = await rt.create(image="busybox", disk_size_mib=256)
        with pytest.raises(hutch.ConfigError, match="disk_size_mib must be at least"):
            await small.start()
        await rt.remove(small.id, force=True)
        box = await rt.create(image="busybox", disk_size_mib=12 * 1024)
        try:
            await box.start()
            r = await box.exec("df", "-k", "/")
            r.assert_success()
            total_kib = int(r.stdout.splitlines()[1].split()[1])
            assert 11.5 * 2**20 < total_kib <= 12 * 2**20, r.stdout
            # The grown space is usable, and a restart keeps the size.
            await box.exec("sh", "-c", "echo x > /big && sync")
            await box.stop()
            await box.start()
            r = await box.exec("df", "-k", "/")
            assert int(r.stdout.splitlines()[1].split()[1]) == total_kib
        finally:
            await rt.remove(box.id, force=True)


async def test_host_facts_are_rechecked_before_a_start_is_claimed(
    home: Path, tmp_path: Path
) -> None:
    """Ports and volumes are applied (tests/vm/test_box_io.py); what they rely on on the host is
    checked again at start, and a refused start leaves the box as it was."""
    import socket

    folder = tmp_path / "data"
    folder.mkdir()
    async with hutch.Runtime(home) as rt:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            box = await rt.create(
                image="busybox",
                ports=[hutch.Port(host=port, guest=80)],
                volumes=[hutch.Volume(host_path=str(folder), guest_path="/data")],
            )
            with pytest.raises(ConflictError, match=f"127.0.0.1:{port}/tcp"):
                await box.start()
            assert (await rt.get(box.id)).state == "created"
        folder.rmdir()
        with pytest.raises(hutch.ConfigError, match="does not exist"):
            await box.start()
        assert (await rt.get(box.id)).state == "created"
        await rt.remove(box.id)


async def test_cli_create_and_run_keep_or_remove(home: Path) -> None:
    from tests.conftest import hutch_cli

    env = {"HUTCH_HOME": str(home)}
    made = hutch_cli(
        "create",
        "--name",
        "made",
        "--cpus",
        "1",
        "--memory",
        "300",
        "-e",
        "K=V",
        "-l",
        "team=a",
        "--json",
        "busybox",
        env_extra=env,
    )
    assert made.returncode == 0, made.stderr
    doc = json.loads(made.stdout)
    assert (doc["name"], doc["state"], doc["options"]["memory_mib"]) == ("made", "created", 300)
    assert doc["options"]["env"] == {"K": "V"} and doc["options"]["labels"] == {"team": "a"}
    dup = hutch_cli("create", "--name", "made", env_extra=env)
    assert dup.returncode == 125 and b"made" in dup.stderr
    bad = hutch_cli("create", "--cpus", "999", env_extra=env)
    assert bad.returncode == 125 and b"cpus" in bad.stderr
    # `run --name` keeps the box (stopped) with its files; `--rm` removes even a named one.
    kept = hutch_cli("run", "--name", "kept", "--", "sh", "-c", "echo hi > /root/f", env_extra=env)
    assert kept.returncode == 0, kept.stderr
    gone = hutch_cli("run", "--name", "gone", "--rm", "--", "true", env_extra=env)
    assert gone.returncode == 0, gone.stderr
    listing = json.loads(hutch_cli("ls", "-a", "--json", env_extra=env).stdout)
    assert sorted((r["name"], r["state"]) for r in listing) == [
        ("kept", "stopped"),
        ("made", "created"),
    ]
    async with hutch.Runtime(home) as rt:
        box = await rt.get("kept")
        await box.start()
        assert (await box.exec("cat", "/root/f")).stdout == "hi\n"
        await rt.remove("kept", force=True)
        await rt.remove("made")
