"""Box commands that need a process to keep the VM running: ``hutch start``, ``stop``, ``exec``,
``stats``.

A box's QEMU lives only as long as the process that started it (``--pdeathsig``), and a CLI
command ends. So ``hutch start`` asks the home's server (``hutch serve`` on ``HOME/hutch.sock``)
to start the box, first starting that server in the background if none answers (its own session,
log in ``HOME/serve.log``). ``hutch exec`` then runs commands in the
box through the server, ``hutch stop`` stops it, and ``hutch stop --server`` sends the server (its
pid from ``/v1/version``) SIGTERM: it stops the boxes it runs, keeping their disks, and exits.

``stats`` reads the host side of every running box (QEMU's CPU and resident memory from
``/proc``, the disk overlay's size), whoever owns it; the guest's own memory figures come from the
server for the boxes it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from hutch.cli import (
    EXIT_HUTCH_ERROR,
    EXIT_TIMEOUT,
    _fail,
    _parse_env,
    _report,
    _SplitAtDashDash,
    attach,
    err_console,
    main,
)
from hutch.cli.terminal import attach_terminal, terminal_options
from hutch.errors import (
    ConnectionError,
    EngineError,
    HutchError,
    InvalidStateError,
    NotFoundError,
    TimeoutError,
)
from hutch.paths import HutchPaths
from hutch.runtime.metrics import CpuSampler, qemu_rss_bytes
from hutch.runtime.runtime import Runtime
from hutch.runtime.store import BoxRecord

#: How long `hutch start` waits for a server it started to answer.
SERVER_START_TIMEOUT = 30.0
#: The CPU sampling window of `hutch stats`.
STATS_WINDOW = 0.5


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


async def server(paths: HutchPaths, *, start: bool) -> Any:
    """A connected client of the home's server; with ``start``, one is started if none answers
    (else None)."""
    from hutch.client import connect

    rt = connect(f"unix://{paths.server_socket}")
    try:
        await rt.open()
        return rt
    except ConnectionError:
        if not start:
            return None
    paths.ensure()
    log_path = paths.home / "serve.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hutch", "serve"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # not killed with this terminal or this command
            env={**os.environ, "HUTCH_HOME": str(paths.home)},
        )
    err_console.print(f"[dim]started the hutch server (pid {proc.pid}, log {log_path})[/]")
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while True:
        with contextlib.suppress(ConnectionError):
            await rt.open()
            return rt
        if proc.poll() is not None:
            with contextlib.suppress(ConnectionError):  # another one won the race to start
                await rt.open()
                return rt
            raise EngineError(
                f"the hutch server exited with status {proc.returncode}:\n{_log_tail(log_path)}",
                hint=f"See {log_path}; `hutch serve` in a terminal shows the problem directly.",
            )
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the hutch server (pid {proc.pid}) did not answer within "
                f"{SERVER_START_TIMEOUT:g} s:\n{_log_tail(log_path)}",
                hint=f"See {log_path}.",
            )
        await asyncio.sleep(0.1)


def _run_each(names: tuple[str, ...], each: Any) -> None:
    async def go() -> bool:
        failed = False
        for name in names:
            try:
                await each(name)
                click.echo(name)
            except HutchError as e:
                _report(e)
                failed = True
        return failed

    try:
        if asyncio.run(go()):
            sys.exit(EXIT_HUTCH_ERROR)
    except HutchError as e:
        _fail(e)


@main.command("start")
@click.argument("boxes", nargs=-1, required=True)
def start_cmd(boxes: tuple[str, ...]) -> None:
    """Start boxes in the home's server (started in the background if needed)."""
    paths = HutchPaths.default()
    rt: Any = None

    async def each(name: str) -> None:
        nonlocal rt
        rt = rt or await server(paths, start=True)
        box = await rt.get(name)
        await box.start()

    _run_each(boxes, each)


@main.command("stop")
@click.argument("boxes", nargs=-1)
@click.option("--server", "stop_server", is_flag=True, help="Stop the background hutch server.")
def stop_cmd(boxes: tuple[str, ...], stop_server: bool) -> None:
    """Stop boxes (their disks are kept); --server stops the server (and the boxes it runs)."""
    paths = HutchPaths.default()
    if stop_server:
        _stop_server(paths)
    if not boxes:
        if not stop_server:
            raise click.UsageError("name a box to stop, or --server")
        return

    async def go() -> bool:
        failed = False
        remote = await server(paths, start=False)
        async with Runtime() as local:
            for name in boxes:
                try:
                    # The server stops what it runs, and refuses boxes other processes run.
                    box = await (remote.get(name) if remote is not None else local.get(name))
                    await box.stop()
                    click.echo(name)
                except HutchError as e:
                    _report(e)
                    failed = True
        return failed

    try:
        if asyncio.run(go()):
            sys.exit(EXIT_HUTCH_ERROR)
    except HutchError as e:
        _fail(e)


def _stop_server(paths: HutchPaths) -> None:
    async def pid_of_server() -> int | None:
        remote = await server(paths, start=False)
        if remote is None:
            return None
        try:
            pid: int = (await remote.version())["pid"]
            return pid
        finally:
            await remote.close()

    pid = asyncio.run(pid_of_server())
    if pid is None or not _is_server(pid, paths):
        _fail(NotFoundError("no hutch server runs for this home"))
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while _is_server(pid, paths):
        if time.monotonic() > deadline:
            _fail(TimeoutError(f"the hutch server (pid {pid}) did not stop within 60 s"))
        time.sleep(0.1)
    click.echo(f"stopped the hutch server (pid {pid})")


def _is_server(pid: int, paths: HutchPaths) -> bool:
    """Is ``pid`` a live `hutch serve` (not a reused pid)?"""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"serve" in cmdline and f"HUTCH_HOME={paths.home}".encode() in environ


@main.command(
    "exec",
    cls=_SplitAtDashDash,
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
@click.option("-i", "--interactive", is_flag=True, help="Forward our stdin to the command.")
@click.option("-t", "--tty", is_flag=True, help="Run it on a terminal (with -i: interactively).")
@click.option("-e", "--env", "env", multiple=True, help="K=V (or K to pass ours).")
@click.option("-w", "--workdir", help="Working directory in the guest.")
@click.option("-u", "--user", help="User in the guest: name, uid or uid:gid.")
@click.option("--timeout", type=float, help="Kill the command after this many seconds.")
def exec_cmd(
    ctx: click.Context,
    args: tuple[str, ...],
    interactive: bool,
    tty: bool,
    env: tuple[str, ...],
    workdir: str | None,
    user: str | None,
    timeout: float | None,
) -> None:
    """Run CMD in a running box: hutch exec [OPTIONS] BOX [--] CMD [ARG...].

    `hutch exec -it BOX sh` gives an interactive shell. Exits with the command's status (128+N
    if killed by signal N, 124 on --timeout)."""
    if "hutch_cmd" in ctx.meta:
        head, cmd = list(args), list(ctx.meta["hutch_cmd"])
    else:
        head, cmd = list(args[:1]), list(args[1:])
    if len(head) != 1 or not cmd:
        raise click.UsageError("usage: hutch exec [OPTIONS] BOX [--] CMD [ARG...]")
    paths = HutchPaths.default()

    async def go() -> int:
        box = await running_box(paths, head[0])
        spawn_args = terminal_options(_parse_env(env)) if tty else {"env": _parse_env(env)}
        execution = await box.spawn(
            cmd, cwd=workdir, user=user, timeout=timeout, stdin=interactive, **spawn_args
        )
        code: int = await (attach_terminal if tty else attach)(execution, interactive)
        return code

    try:
        code = asyncio.run(go())
    except TimeoutError as e:
        _fail(e, EXIT_TIMEOUT)
    except HutchError as e:
        _fail(e)
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


async def running_box(paths: HutchPaths, name: str) -> Any:
    """The box ``name`` as the home's server runs it (a RemoteBox); InvalidStateError saying how
    to start it when no server answers (none is started) or the box is not running."""
    remote = await server(paths, start=False)
    if remote is None:
        rec = await _record(name)
        raise InvalidStateError(
            f"box {name} is {rec.state}"
            + (f" in process {rec.owner_pid}" if rec.owner_pid else ""),
            hint=f"Start it with `hutch start {name}`; a box started by a program is "
            "driven from that program.",
        )
    box = await remote.get(name)
    if box.state != "running":
        raise InvalidStateError(
            f"box {name} is {box.state}", hint=f"Start it with `hutch start {name}`."
        )
    return box


async def _record(name: str) -> BoxRecord:
    async with Runtime() as rt:
        return await asyncio.to_thread(rt.store.get, name)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}GiB"


@main.command("stats")
@click.argument("boxes", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def stats_cmd(boxes: tuple[str, ...], as_json: bool) -> None:
    """CPU, memory and disk of running boxes (all, or those named)."""
    paths = HutchPaths.default()

    async def go() -> list[dict[str, Any]]:
        async with Runtime() as rt:
            running = await rt.list("running")
            if boxes:
                wanted = {(await asyncio.to_thread(rt.store.get, b)).id for b in boxes}
                running = [r for r in running if r.id in wanted]
        sampler = CpuSampler()
        before = {r.id: sampler.sample(r.qemu_pid) for r in running if r.qemu_pid}
        await asyncio.sleep(STATS_WINDOW)
        guest: dict[str, Any] = {}
        remote = await server(paths, start=False)
        spid = (await remote.version())["pid"] if remote is not None else None
        rows = []
        for r in running:
            after = sampler.sample(r.qemu_pid) if r.qemu_pid else None
            b = before.get(r.id)
            cpu = sampler.percent(b, after) if b and after else 0.0
            if remote is not None and r.owner_pid == spid:
                with contextlib.suppress(HutchError):
                    guest[r.id] = await (await remote.get(r.id)).metrics()
            disk = paths.boxes / r.id / "disk.qcow2"
            try:
                disk_bytes = disk.stat().st_blocks * 512
            except OSError:
                disk_bytes = 0
            m = guest.get(r.id)
            rows.append(
                {
                    "id": r.id,
                    "name": r.name,
                    "cpu_percent": round(cpu, 1),
                    "qemu_rss_bytes": qemu_rss_bytes(r.qemu_pid) if r.qemu_pid else 0,
                    "memory_limit_bytes": r.options.memory_mib << 20,
                    "guest_memory_bytes": m.memory_bytes if m else None,
                    "disk_bytes": disk_bytes,
                    "uptime_s": round(time.time() - r.started_at, 1) if r.started_at else None,
                    "owner_pid": r.owner_pid,
                }
            )
        return rows

    try:
        rows = asyncio.run(go())
    except HutchError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(box=None, pad_edge=False)
    for col in ("ID", "NAME", "CPU %", "QEMU RSS / LIMIT", "GUEST MEM", "DISK", "UP", "OWNER"):
        table.add_column(col)
    for row in rows:
        table.add_row(
            row["id"],
            row["name"] or "-",
            f"{row['cpu_percent']:.1f}",
            f"{_size(row['qemu_rss_bytes'])} / {_size(row['memory_limit_bytes'])}",
            _size(row["guest_memory_bytes"]) if row["guest_memory_bytes"] is not None else "-",
            _size(row["disk_bytes"]),
            f"{row['uptime_s']:.0f}s" if row["uptime_s"] is not None else "-",
            f"pid {row['owner_pid']}" if row["owner_pid"] else "-",
        )
    Console(soft_wrap=True).print(table)


__all__ = ["exec_cmd", "running_box", "server", "start_cmd", "stats_cmd", "stop_cmd"]
