"""`hutch create/start/exec/stats/stop` from separate CLI processes: `start` brings up the home's
server in the background, which keeps the VM between commands."""

from __future__ import annotations

import contextlib
import json
import os
import signal
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
