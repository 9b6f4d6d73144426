"""Box commands over the runtime store: ``hutch ps``, ``rm``, ``logs``.

(``create``/``start``/``exec`` on a stored box need a process that keeps its VM: that is
``hutch serve``'s job, as a box's QEMU dies with the process that started it.)
"""

from __future__ import annotations

import asyncio
import json
import time

import click
from rich.console import Console
from rich.table import Table

from hutch.cli import _fail, _report, main
from hutch.errors import HutchError
from hutch.runtime.runtime import Runtime
from hutch.runtime.store import BoxRecord


def _age(t: float | None) -> str:
    if not t:
        return "-"
    s = time.time() - t
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{int(s // n)}{unit} ago"
    return f"{int(s)}s ago"


def _row(r: BoxRecord) -> list[str]:
    owner = f"pid {r.owner_pid}" if r.owner_pid else "-"
    return [r.id, r.name or "-", r.image, r.state, _age(r.created_at), owner]


@main.command("ps")
@click.option("-a", "--all", "show_all", is_flag=True, help="Also boxes that are not running.")
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON.")
def ps_cmd(show_all: bool, as_json: bool) -> None:
    """List boxes (running ones; -a for all)."""

    async def go() -> list[BoxRecord]:
        async with Runtime() as rt:
            return await rt.list(None if show_all else ("starting", "running", "stopping"))

    try:
        records = asyncio.run(go())
    except HutchError as e:
        _fail(e)
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "id": r.id,
                        "name": r.name,
                        "image": r.image,
                        "state": r.state,
                        "owner_pid": r.owner_pid,
                        "created_at": r.created_at,
                        "failure": r.failure,
                        "options": r.options.to_json(),
                    }
                    for r in records
                ],
                indent=2,
            )
        )
        return
    table = Table(box=None, pad_edge=False)
    for col in ("ID", "NAME", "IMAGE", "STATE", "CREATED", "OWNER"):
        table.add_column(col)
    for r in records:
        table.add_row(*_row(r))
    Console(soft_wrap=True).print(table)


@main.command("rm")
@click.argument("boxes", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Also running boxes (their VM is stopped).")
def rm_cmd(boxes: tuple[str, ...], force: bool) -> None:
    """Remove boxes (disk, logs and record)."""

    async def go() -> bool:
        failed = False
        async with Runtime() as rt:
            for name in boxes:
                try:
                    await rt.remove(name, force=force)
                    click.echo(name)
                except HutchError as e:
                    _report(e)
                    failed = True
        return failed

    if asyncio.run(go()):
        raise SystemExit(125)


@main.command("logs")
@click.argument("box")
def logs_cmd(box: str) -> None:
    """Print a box's console log (kernel and agent messages)."""

    async def go() -> bytes:
        async with Runtime() as rt:
            b = await rt.get(box)
            try:
                return b.console_log.read_bytes()
            except FileNotFoundError:
                return b""

    try:
        data = asyncio.run(go())
    except HutchError as e:
        _fail(e)
    click.echo(data.decode(errors="replace"), nl=False)


__all__ = ["logs_cmd", "ps_cmd", "rm_cmd"]
