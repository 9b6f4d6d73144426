"""Boxes against a real QEMU guest (TCG here): commands, streams, limits, failures."""

from __future__ import annotations

import asyncio
import hashlib
import resource
import signal

import pytest

import hutch
from hutch.errors import (
    BadRequestError,
    ExecutionError,
    InvalidStateError,
    NotFoundError,
    TimeoutError,
)

pytestmark = pytest.mark.vm


async def test_uname_is_hutchs_own_kernel(box: hutch.Box) -> None:
    r = (await box.exec("uname", "-a")).assert_success()
    assert "microvm" in r.stdout
    assert box.hello is not None and "microvm" in box.hello.kernel
    assert box.hello.boot_ready_us >= box.hello.boot_start_us > 0
    assert box.boot_ms is not None and box.boot_ms > 0


async def test_stdout_stderr_and_exit_code(box: hutch.Box) -> None:
    r = await box.exec("sh", "-c", "echo out; echo err >&2; exit 7")
    assert (r.stdout, r.stderr, r.exit_code, r.signal) == ("out\n", "err\n", 7, None)
    with pytest.raises(ExecutionError) as ei:
        r.assert_success()
    assert ei.value.exit_code == 7 and ei.value.stderr == "err\n"
    assert ei.value.command == ["sh", "-c", "echo out; echo err >&2; exit 7"]


async def test_env_cwd_and_defaults(box: hutch.Box) -> None:
    r = await box.exec(
        "sh", "-c", 'echo "$FOO|$PWD|$HOME|$PATH"', env={"FOO": "bar baz"}, cwd="/etc"
    )
    foo, pwd, home, path = r.stdout.strip().split("|")
    assert (foo, pwd, home) == ("bar baz", "/etc", "/root")
    assert "/usr/bin" in path


async def test_user_resolved_from_image_passwd(box: hutch.Box) -> None:
    r = (
        await box.exec("sh", "-c", "id -u; id -g; id -G; echo $HOME; pwd", user="hutch")
    ).assert_success()
    uid, gid, groups, home, pwd = r.stdout.split("\n")[:5]
    assert (uid, gid, home, pwd) == ("1000", "1000", "/home/hutch", "/home/hutch")
    assert "10" in groups.split()  # supplementary group wheel from /etc/group
    r = (await box.exec("id", "-u", user="1234:99")).assert_success()
    assert r.stdout.strip() == "1234"
    with pytest.raises(BadRequestError, match="nosuchuser"):
        await box.exec("id", user="nosuchuser")


async def test_timeout_kills_and_raises(box: hutch.Box) -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(TimeoutError, match="timeout"):
        await box.exec("sleep", "30", timeout=0.5)
    assert loop.time() - t0 < 10
    # the process group is gone
    r = await box.exec("sh", "-c", "ps | grep -c '[s]leep 30' || true")
    assert r.stdout.strip() == "0"


async def test_signal_is_reported(box: hutch.Box) -> None:
    r = await box.exec("sh", "-c", "kill -TERM $$")
    assert r.exit_code is None and r.signal == signal.SIGTERM and r.signal_name == "SIGTERM"
    with pytest.raises(ExecutionError, match="signal 15"):
        r.assert_success()


async def test_spawn_signal_kill_and_stdin(box: hutch.Box) -> None:
    ex = await box.spawn(
        "sh", "-c", "trap 'echo got-usr1; exit 3' USR1; echo ready; while :; do sleep 0.05; done"
    )
    assert await ex.stdout.read_chunk() == b"ready\n"
    await ex.signal(signal.SIGUSR1)
    r = await ex.wait()
    assert r.exit_code == 3 and r.stdout == "got-usr1\n"

    ex = await box.spawn("cat")
    await ex.stdin.write(b"hello ")
    assert await ex.stdout.read_chunk() == b"hello "
    await ex.stdin.write(b"world")
    await ex.stdin.close()
    r = await ex.wait()
    assert (r.exit_code, r.stdout) == (0, "world")

    ex = await box.spawn("sleep", "60")
    await ex.kill()
    r = await ex.wait(timeout=10)
    assert r.signal == signal.SIGKILL


async def test_missing_command_is_not_found(box: hutch.Box) -> None:
    with pytest.raises(NotFoundError, match="no-such-program"):
        await box.exec("no-such-program", "x")
    with pytest.raises(BadRequestError, match="working directory"):
        await box.exec("true", cwd="/nonexistent")


async def test_twenty_concurrent_execs(box: hutch.Box) -> None:
    async def one(i: int) -> tuple[int, str, int]:
        r = await box.exec("sh", "-c", f"sleep 0.2; echo {i}; echo e{i} >&2; exit {i % 5}")
        assert r.stderr == f"e{i}\n"
        return i, r.stdout.strip(), r.exit_code or 0

    results = await asyncio.gather(*(one(i) for i in range(20)))
    assert results == [(i, str(i), i % 5) for i in range(20)]


async def test_50mib_stdout_intact_with_bounded_memory(box: hutch.Box) -> None:
    size = 50 << 20
    script = (
        f"head -c {size} /dev/urandom > /dev/shm/blob && sha256sum /dev/shm/blob >&2 "
        "&& cat /dev/shm/blob && rm /dev/shm/blob"
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, peak so far
    ex = await box.spawn("sh", "-c", script, stdin=False)
    h = hashlib.sha256()
    n = 0
    async for chunk in ex.stdout:
        h.update(chunk)
        n += len(chunk)
    r = await ex.wait()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert r.exit_code == 0, r.stderr
    assert n == size
    assert r.stderr.split()[0] == h.hexdigest()
    # Streamed, not buffered: the host's peak RSS grew far less than the 50 MiB that went through.
    assert (after - before) < 24 * 1024, f"peak RSS grew by {(after - before) / 1024:.0f} MiB"


async def test_10mib_stdin_round_trip(box: hutch.Box) -> None:
    data = hashlib.sha256(b"seed").digest() * (10 * 1024 * 1024 // 32)
    r = await box.exec("cat", stdin=data)
    assert r.exit_code == 0
    assert len(r.stdout_bytes) == len(data) and r.stdout_bytes == data


async def test_wait_without_reading_does_not_deadlock(box: hutch.Box) -> None:
    ex = await box.spawn("sh", "-c", "head -c 3000000 /dev/zero; echo done >&2", stdin=False)
    r = await ex.wait(timeout=60)
    assert len(r.stdout_bytes) == 3000000 and r.stderr == "done\n"


async def test_sync_facade_runs_in_a_thread_with_its_own_loop(manifest: object) -> None:
    from hutch.sync import Box as SyncBox

    def work() -> tuple[str, list[bytes]]:
        with SyncBox("busybox") as b:
            r = b.exec("echo", "sync")
            ex = b.spawn("sh", "-c", "echo a; echo b")
            chunks = list(ex.stdout)
            ex.wait()
            return r.stdout, chunks

    out, chunks = await asyncio.to_thread(work)  # called while this thread runs an event loop
    assert out == "sync\n"
    assert b"".join(chunks) == b"a\nb\n"


async def test_exec_on_stopped_box_is_invalid_state(manifest: object) -> None:
    b = hutch.Box("busybox")
    with pytest.raises(InvalidStateError, match="start"):
        await b.exec("true")
    await b.start()
    (await b.exec("sh", "-c", "echo kept > /root/file")).assert_success()
    await b.stop()
    assert b.qemu_pid is None and b.state == "stopped"
    with pytest.raises(InvalidStateError):
        await b.exec("true")
    await b.start()  # the disk overlay survives a stop
    assert (await b.exec("cat", "/root/file")).stdout == "kept\n"
    await b.remove()
    assert not b.box_dir.exists()


async def test_console_log_is_capped_against_a_chatty_guest(
    box: hutch.Box, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hutch.vm.process as proc

    monkeypatch.setattr(proc, "CONSOLE_LOG_MAX", 16 << 10)
    monkeypatch.setattr(proc, "CONSOLE_LOG_KEEP", 4 << 10)
    monkeypatch.setattr(proc, "CONSOLE_CHECK_INTERVAL", 0.2)
    r = await box.exec(
        "sh",
        "-c",
        "i=0; while [ $i -lt 4000 ]; do echo spam-$i; i=$((i+1)); done > /dev/console; echo spam-end > /dev/console",
    )
    assert r.exit_code == 0
    for _ in range(50):
        await asyncio.sleep(0.1)
        data = box.console_log.read_bytes()
        if b"spam-end" in data and len(data) < 16 << 10:
            break
    assert b"spam-end" in data and b"older output dropped" in data and len(data) < 16 << 10


async def test_output_limit_is_a_typed_error_and_kills(box: hutch.Box) -> None:
    with pytest.raises(hutch.OutputLimitError, match="100000"):
        await box.exec("sh", "-c", "head -c 300000 /dev/zero; sleep 30", max_output_bytes=100_000)
    r = await box.exec("sh", "-c", "ps | grep -c '[s]leep 30' || true")
    assert r.stdout.strip() == "0"


async def test_root_disk_is_the_image_mounted_rw_noatime(box: hutch.Box) -> None:
    mounts = (await box.exec("cat", "/proc/mounts")).stdout.splitlines()
    root = next(m.split() for m in mounts if m.split()[1] == "/")
    assert root[0] == "/dev/vda" and root[2] == "ext4"
    assert "rw" in root[3].split(",") and "noatime" in root[3].split(",")
    assert (await box.exec("cat", "/etc/os-release")).stdout.startswith('NAME="hutch busybox"')
