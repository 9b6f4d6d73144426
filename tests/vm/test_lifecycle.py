"""Boot failures, process ownership and the CLI, each with its own real QEMU guest."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

import hutch
from hutch.errors import ConfigError, TimeoutError

from ..conftest import REPO, hutch_cli

pytestmark = pytest.mark.vm


def qemu_children_of(pid: int) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if "qemu" in p.name()]
    except psutil.NoSuchProcess:
        return []


def wait_gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.05)
    return False


async def test_guest_that_never_answers_times_out_with_console_tail(manifest: object) -> None:
    # rdinit points nowhere, so the kernel finds no init and panics; panic=0 makes it hang forever.
    b = hutch.Box("busybox", boot_timeout=4, kernel_args=["rdinit=/does-not-exist", "panic=0"])
    before = {p.pid for p in qemu_children_of(os.getpid())}  # e.g. the shared session box
    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as ei:
        await b.start()
    elapsed = time.monotonic() - t0
    assert elapsed < 4 + 8, elapsed  # inside the deadline plus the kill escalation
    msg = str(ei.value)
    assert "console tail" in msg and "panic" in msg.lower(), msg
    assert b.qemu_pid is None and b.state == "failed"
    assert {p.pid for p in qemu_children_of(os.getpid())} <= before
    await b.remove()


def test_qemu_dies_with_its_owner_on_sigkill(manifest: object) -> None:
    script = textwrap.dedent(
        """
        import asyncio, sys, hutch
        async def main():
            box = hutch.Box("busybox")
            await box.start()
            print(box.qemu_pid, box.box_dir, flush=True)
            await asyncio.sleep(3600)
        asyncio.run(main())
        """
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    box_dir = ""
    try:
        assert owner.stdout is not None
        pid_text, box_dir = owner.stdout.readline().split()
        qemu_pid = int(pid_text)
        assert psutil.pid_exists(qemu_pid)
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        assert wait_gone(qemu_pid, 5.0), f"QEMU {qemu_pid} outlived its SIGKILLed owner"
        # The next box start sweeps the dead owner's run folder (sockets, guest RAM on tmpfs).
        run_dir = hutch.Box().paths.run / Path(box_dir).name
        assert run_dir.exists()
        hutch.box.sweep_stale_run_dirs(hutch.Box().paths)
        assert not run_dir.exists()
    finally:
        if owner.poll() is None:
            owner.kill()
        if box_dir:  # the dead owner's box stays recorded (stopped, disk kept): remove it
            paths = hutch.Box().paths
            hutch.box.store_for(paths).delete(Path(box_dir).name, missing_ok=True)
            shutil.rmtree(box_dir, ignore_errors=True)


def test_cli_run_streams_and_exit_code(manifest: object) -> None:
    p = hutch_cli("run", "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert p.stdout == b"out\n"
    assert b"err\n" in p.stderr
    assert p.returncode == 7


def test_cli_run_image_stdin_and_signal_status(manifest: object) -> None:
    p = hutch_cli(
        "run", "-i", "busybox", "--", "sh", "-c", "tr a-z A-Z; kill -KILL $$", input=b"shout\n"
    )
    assert p.stdout == b"SHOUT\n"
    assert p.returncode == 128 + 9


def test_cli_errors_are_typed_not_tracebacks(manifest: object) -> None:
    p = hutch_cli("run", "no-such-image", "--", "true")
    assert p.returncode == 125
    assert b"Traceback" not in p.stderr and b"no-such-image" in p.stderr and b"hint" in p.stderr
    p = hutch_cli("run", "--", "no-such-program")
    assert p.returncode == 125 and b"no-such-program" in p.stderr


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="memory_mib"):
        hutch.Box(memory_mib=64)
    with pytest.raises(ConfigError, match="cpus"):
        hutch.Box(cpus=0)


def test_demo_script_prints_uname_and_boot_time(manifest: object) -> None:
    p = subprocess.run(
        [sys.executable, str(REPO / "examples" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert "microvm" in p.stdout and "booted box" in p.stdout and " ms" in p.stdout


async def test_boxes_boot_concurrently(manifest: object) -> None:
    boxes = [hutch.Box("busybox") for _ in range(3)]
    try:
        await asyncio.gather(*(b.start() for b in boxes))
        outs = await asyncio.gather(*(b.exec("hostname") for b in boxes))
        assert sorted(o.stdout.strip() for o in outs) == sorted(b.name for b in boxes)
    finally:
        await asyncio.gather(*(b.remove() for b in boxes))


async def test_vm_dying_under_a_box_fails_it_cleanly(manifest: object) -> None:
    b = hutch.Box("busybox")
    await b.start()
    try:
        running = await b.spawn("sleep", "60")
        assert b.qemu_pid is not None
        os.kill(b.qemu_pid, signal.SIGKILL)
        with pytest.raises(hutch.PortalError):
            await asyncio.wait_for(running.wait(), 10)
        for _ in range(100):
            if b.state == "failed":
                break
            await asyncio.sleep(0.05)
        assert b.state == "failed"
        with pytest.raises(hutch.InvalidStateError, match="exited unexpectedly"):
            await b.exec("true")
        await b.start()  # a failed box can be started again, from its kept disk
        assert (await b.exec("echo", "back")).stdout == "back\n"
    finally:
        await b.remove()


def test_cli_timeout_and_closed_reader(manifest: object) -> None:
    p = hutch_cli("run", "--timeout", "1", "--", "sleep", "30")
    assert p.returncode == 124 and b"timeout" in p.stderr
    # `hutch run -- yes | head -c 5`: the reader goes away; hutch stops the command, exit 141
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "hutch"), "run", "--", "yes"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.read(4) == b"y\ny\n"
    proc.stdout.close()
    assert proc.wait(60) == 128 + 13
    assert proc.stderr is not None and b"Traceback" not in proc.stderr.read()


async def test_unwritable_home_is_a_storage_error_with_path_and_free_space(
    manifest: object, tmp_path: Path
) -> None:
    from hutch.paths import HutchPaths

    home = tmp_path / "home"
    (home / "artifacts").mkdir(parents=True)
    src = HutchPaths.default().artifacts / "manifest.json"
    (home / "artifacts" / "manifest.json").write_bytes(src.read_bytes())
    (home / "boxes").write_text("not a folder")  # boxes/<id> cannot be created
    box = hutch.Box("busybox", home=home, accel="tcg")
    with pytest.raises(hutch.StorageError, match="MiB free") as ei:
        await box.start()
    assert str(home / "boxes") in ei.value.message and "HUTCH_HOME" in ei.value.hint
    assert box.state == "failed" and box.qemu_pid is None


async def test_frozen_vm_neither_hangs_ping_nor_stop(manifest: object) -> None:
    b = hutch.Box("busybox")
    await b.start()
    pid = b.qemu_pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # the whole VM freezes: no guest, no QMP
    try:
        with pytest.raises(hutch.TimeoutError, match="ping"):
            await b.ping(timeout=1.0)
        t0 = time.monotonic()
        await b.remove()  # SHUTDOWN unanswered → QMP unanswered → SIGTERM pending → SIGKILL
        assert time.monotonic() - t0 < 30
        assert wait_gone(pid, 5.0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
