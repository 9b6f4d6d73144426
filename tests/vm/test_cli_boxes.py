"""`hutch create/start/exec/stats/stop` from separate CLI processes: `start` brings up the home's
server in the background, which keeps the VM between commands."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import hutch_cli
from tests.support.homes import make_home

pytestmark = pytest.mark.vm


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    home = make_home(tmp_path / "home")
    yield home
    # Never leave a background server behind, whatever the test did.
    hutch_cli("stop", "--server", env_extra={"HUTCH_HOME": str(home)})
    for pid in servers_of(home):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def servers_of(home: Path) -> list[int]:
    """Pids of `hutch serve` processes running for ``home``."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if b"serve" in (d / "cmdline").read_bytes().split(b"\0") and (
                f"HUTCH_HOME={home}".encode() in (d / "environ").read_bytes().split(b"\0")
            ):
                found.append(int(d.name))
    return found


def test_start_exec_stats_stop_across_processes(home: Path) -> None:
    env = {"HUTCH_HOME": str(home)}

    def cli(*args: str, **kw: object) -> tuple[int, str, str]:
        p = hutch_cli(*args, env_extra=env, **kw)  # type: ignore[arg-type]
        return p.returncode, p.stdout.decode(), p.stderr.decode()

    assert cli("create", "--name", "w", "-e", "MODE=cli")[0] == 0
    # Not running yet: exec says how to start it, without starting a server.
    code, _, err = cli("exec", "w", "--", "true")
    assert code == 125 and "hutch start w" in err
    assert servers_of(home) == []

    code, out, err = cli("start", "w")
    assert (code, out) == (0, "w\n"), err
    assert "started the hutch server" in err
    [pid] = servers_of(home)

    code, out, err = cli("exec", "w", "--", "sh", "-c", "echo $MODE; echo oops >&2; exit 3")
    assert (code, out, err) == (3, "cli\n", "oops\n")
    code, out, _ = cli(
        "exec", "-i", "-w", "/tmp", "w", "--", "sh", "-c", "pwd; tr a-z A-Z", input=b"hi\n"
    )
    assert (code, out) == (0, "/tmp\nHI\n")
    code, _, err = cli("exec", "--timeout", "1", "w", "--", "sleep", "30")
    assert code == 124, err
    # A second start is a no-op on the running box, through the same server.
    code, _, err = cli("start", "w")
    assert code == 0 and "started the hutch server" not in err

    code, out, err = cli("stats", "--json")
    assert code == 0, err
    [row] = json.loads(out)
    assert row["name"] == "w" and row["owner_pid"] == pid
    assert row["qemu_rss_bytes"] > 10 << 20 and row["memory_limit_bytes"] == 256 << 20
    assert row["guest_memory_bytes"] > 1 << 20 and row["disk_bytes"] > 0

    code, out, err = cli("stop", "w")
    assert (code, out) == (0, "w\n"), err
    listing = json.loads(cli("ps", "-a", "--json")[1])
    assert [(r["name"], r["state"]) for r in listing] == [("w", "stopped")]
    code, out, _ = cli("stop", "--server")
    assert code == 0 and f"pid {pid}" in out
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, "the server did not exit"
        time.sleep(0.05)
    code, _, err = cli("stop", "--server")
    assert code == 125 and "no hutch server runs" in err
    assert cli("rm", "w")[0] == 0


def test_snapshot_clone_and_rmsnap_across_processes(home: Path) -> None:
    env = {"HUTCH_HOME": str(home)}

    def cli(*args: str, **kw: object) -> tuple[int, str, str]:
        p = hutch_cli(*args, env_extra=env, **kw)  # type: ignore[arg-type]
        return p.returncode, p.stdout.decode(), p.stderr.decode()

    assert cli("create", "--name", "src")[0] == 0
    # Not running in a server: the same advice as exec, and no server is started for it.
    for args in (("snapshot", "src"), ("clone", "src")):
        code, _, err = cli(*args)
        assert code == 125 and "hutch start src" in err, err
    assert servers_of(home) == []
    assert json.loads(cli("snapshots", "--json")[1]) == []  # no server needed to list

    assert cli("start", "src")[0] == 0
    assert cli("exec", "src", "--", "sh", "-c", "echo frozen > /root/f && sync")[0] == 0
    code, out, err = cli("snapshot", "src", "--name", "warm", "--json")
    assert code == 0, err
    warm = json.loads(out)
    assert (warm["name"], warm["image"], warm["users"], warm["auto_remove"]) == (
        "warm",
        "busybox",
        [],
        False,
    )
    code, out, err = cli("snapshot", "src")  # unnamed: prints the id
    assert code == 0, err
    unnamed = out.strip()
    code, _, err = cli("snapshot", "src", "--name", "warm")
    assert code == 125 and "already taken" in err

    code, out, err = cli("create", "--snapshot", "warm", "--name", "fromsnap", "-l", "k=v")
    assert code == 0, err
    from_snap = out.strip()
    code, _, err = cli("create", "--snapshot", "warm", "--memory", "512")
    assert code == 125 and "memory_mib" in err  # the machine is the snapshot's
    code, _, err = cli("create", "--snapshot", "nothing-here")
    assert code == 125 and "nothing-here" in err
    assert cli("start", "fromsnap")[0] == 0  # restores, in the server
    assert cli("exec", "fromsnap", "--", "sh", "-c", "cat /root/f; hostname")[1] == (
        "frozen\nfromsnap\n"
    )
    code, out, err = cli("clone", "src", "--name", "twin", "--json")
    assert code == 0, err
    twin = json.loads(out)
    assert (twin["name"], twin["state"], twin["options"]["image"]) == ("twin", "running", "busybox")
    assert cli("exec", "twin", "--", "sh", "-c", "cat /root/f; hostname")[1] == "frozen\ntwin\n"

    listing = {s["id"]: s for s in json.loads(cli("snapshots", "--json")[1])}
    assert listing[warm["id"]]["users"] == [from_snap] and listing[unnamed]["users"] == []
    [clone_snap] = [s for s in listing.values() if s["auto_remove"]]
    assert clone_snap["users"] == [twin["id"]] and clone_snap["source_box"] == warm["source_box"]
    code, out, _ = cli("snapshots")
    assert code == 0 and out.split()[:8] == "ID NAME IMAGE CPUS MEMORY SIZE CREATED USERS".split()
    [row] = [line.split() for line in out.splitlines() if line.startswith(warm["id"])]
    assert row[1:5] == ["warm", "busybox", "1", "256MiB"] and row[-1] == "1"

    code, out, err = cli("rmsnap", "warm")
    assert code == 125 and "used by" in err and from_snap in err
    assert cli("stop", "fromsnap")[0] == 0 and cli("rm", "fromsnap")[0] == 0
    code, out, err = cli("rmsnap", "warm", unnamed[:8])
    assert (code, out) == (0, f"warm\n{unnamed[:8]}\n"), err
    assert [s["id"] for s in json.loads(cli("snapshots", "--json")[1])] == [clone_snap["id"]]
    # the clone's snapshot goes with the clone
    assert cli("stop", "twin")[0] == 0 and cli("rm", "twin")[0] == 0
    assert json.loads(cli("snapshots", "--json")[1]) == []


def test_pool_status_and_set_across_processes(home: Path) -> None:
    env = {"HUTCH_HOME": str(home)}

    def cli(*args: str, **kw: object) -> tuple[int, str, str]:
        p = hutch_cli(*args, env_extra=env, **kw)  # type: ignore[arg-type]
        return p.returncode, p.stdout.decode(), p.stderr.decode()

    # No server: status says so and starts none.
    code, out, _ = cli("pool")
    assert code == 0 and "no hutch server answers" in out
    assert json.loads(cli("pool", "--json")[1]) == []
    assert servers_of(home) == []
    code, _, err = cli("pool", "set", "busybox", "--size", "65")
    assert code != 0 and "--size" in err
    assert servers_of(home) == []

    # set: through a server started on demand; --wait until the pool is full
    code, out, err = cli("pool", "set", "busybox", "--size", "1", "--memory", "224", "--wait")
    assert code == 0, err
    assert "started the hutch server" in err
    assert "size 1, 1 ready" in out
    [pid] = servers_of(home)
    code, out, err = cli("pool", "--json")
    assert code == 0, err
    [p] = json.loads(out)
    assert (p["image"], p["cpus"], p["memory_mib"], p["size"], p["ready"]) == (
        "busybox",
        1,
        224,
        1,
        1,
    )
    code, out, _ = cli("pool")
    assert code == 0 and out.split()[:3] == ["IMAGE", "CPUS", "MEMORY"]
    assert "224 MiB" in out
    # pool boxes are invisible to ps
    assert json.loads(cli("ps", "-a", "--json")[1]) == []

    code, out, err = cli("pool", "set", "busybox", "--size", "0", "--memory", "224")
    assert (code, out) == (0, "removed the warm pool of busybox\n"), err
    assert json.loads(cli("pool", "--json")[1]) == []
    code, out, _ = cli("pool")
    assert "no warm pools" in out and servers_of(home) == [pid]


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _read_until(
    fd: int, buf: bytearray, marker: bytes, start: int = 0, timeout: float = 30
) -> None:
    """Read the terminal into ``buf`` until ``marker`` shows up after ``buf[start:]``."""
    deadline = time.monotonic() + timeout
    while marker not in buf[start:]:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} in {bytes(buf)!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                buf.extend(os.read(fd, 65536))
            except OSError:  # EIO: the other side closed
                raise AssertionError(f"terminal closed before {marker!r}: {bytes(buf)!r}") from None


def test_exec_it_is_an_interactive_shell_in_a_real_terminal(home: Path) -> None:
    """`hutch exec -it BOX sh` run on a real pseudo-terminal, as a user types into it: the
    guest's terminal has our size and follows our window's resize, Ctrl-C interrupts the
    foreground job in the guest (not hutch), and our terminal's settings come back after."""
    env = {"HUTCH_HOME": str(home)}
    assert hutch_cli("create", "--name", "t", env_extra=env).returncode == 0
    assert hutch_cli("start", "t", env_extra=env).returncode == 0
    master, slave = os.openpty()
    _set_size(master, 30, 100)
    before = termios.tcgetattr(master)  # a pty master reports its terminal's settings

    def take_terminal() -> None:  # after setsid: the pty becomes our controlling terminal
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "hutch"), "exec", "-it", "t", "sh"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**os.environ, **env, "TERM": "xterm"},
        start_new_session=True,
        preexec_fn=take_terminal,
    )
    os.close(slave)
    out = bytearray()
    try:
        _read_until(master, out, b"# ")  # the guest shell's prompt
        os.write(master, b"stty size; echo $TERM\r")
        _read_until(master, out, b"30 100\r\nxterm\r\n")
        _set_size(master, 40, 120)  # the kernel sends hutch SIGWINCH
        for _ in range(20):  # the resize travels hutch → server → guest meanwhile
            mark = len(out)
            os.write(master, b"stty size\r")
            _read_until(master, out, b"# ", start=mark)
            if b"40 120" in out[mark:]:
                break
            time.sleep(0.1)
        assert b"40 120\r\n" in out
        os.write(master, b"sleep 60; echo slept\r")
        time.sleep(0.5)
        os.write(master, b"\x03")  # Ctrl-C, typed
        os.write(master, b"echo status=$?\r")
        _read_until(master, out, b"status=130\r\n")
        os.write(master, b"exit 3\r")
        assert proc.wait(timeout=30) == 3
        assert b"\nslept" not in out
        after = termios.tcgetattr(master)
        assert after == before, "hutch did not restore the terminal's settings"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
