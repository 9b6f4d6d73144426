"""Box commands over the runtime store: ``hutch create``, ``ps``, ``rm``, ``logs``.

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

from hutch.cli import _box_io, _fail, _report, box_io_options, main
from hutch.errors import BadRequestError, HutchError
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
        click.echo(json.dumps([_record_json(r) for r in records], indent=2))
        return
    table = Table(box=None, pad_edge=False)
    for col in ("ID", "NAME", "IMAGE", "STATE", "CREATED", "OWNER"):
        table.add_column(col)
    for r in records:
        table.add_row(*_row(r))
    Console(soft_wrap=True).print(table)


@main.command("create")
@click.argument("image", default="busybox")
@click.option("--name", help="A unique name: [a-z0-9][a-z0-9_.-]{0,62}.")
@click.option("--cpus", type=int, default=1, show_default=True)
@click.option("--memory", type=int, default=256, show_default=True, help="Guest memory in MiB.")
@click.option("--disk-size", type=int, help="Root disk size in MiB (default: the image's).")
@click.option("-e", "--env", "env", multiple=True, help="K=V (or K to pass ours).")
@click.option("-w", "--workdir", help="Default working directory of commands.")
@click.option("-u", "--user", help="Default user of commands: name, uid or uid:gid.")
@click.option("-l", "--label", "labels", multiple=True, help="A label K=V.")
@click.option("--rm", "auto_remove", is_flag=True, help="Remove the box when it stops.")
@click.option(
    "--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto", show_default=True
)
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
@box_io_options
@click.option(
    "--snapshot",
    help="Make the box from this snapshot, in the home's server (`hutch start` resumes it).",
)
@click.pass_context
def create_cmd(
    ctx: click.Context,
    image: str,
    name: str | None,
    cpus: int,
    memory: int,
    disk_size: int | None,
    env: tuple[str, ...],
    workdir: str | None,
    user: str | None,
    labels: tuple[str, ...],
    auto_remove: bool,
    accel: str,
    as_json: bool,
    publish: tuple[str, ...],
    volumes: tuple[str, ...],
    network: str | None,
    allow: tuple[str, ...],
    snapshot: str | None,
) -> None:
    """Create a box from IMAGE (default: busybox) without starting it; print its id.

    With --snapshot the box is made from a snapshot (its options; only those given here change)."""
    from hutch.cli import _parse_env
    from hutch.runtime.options import BoxOptions

    if snapshot is not None:
        from hutch.cli.snapshots import create_from_snapshot

        create_from_snapshot(ctx, snapshot, as_json)
        return

    async def go() -> BoxRecord:
        label_map: dict[str, str] = {}
        for item in labels:
            key, sep, value = item.partition("=")
            if not sep:
                raise BadRequestError(f"label {item!r} is not K=V")
            label_map[key] = value
        options = BoxOptions(
            image=image,
            name=name,
            cpus=cpus,
            memory_mib=memory,
            disk_size_mib=disk_size,
            env=_parse_env(env),
            workdir=workdir,
            user=user,
            labels=label_map,
            auto_remove=auto_remove,
            accel=accel,
            **_box_io(publish, volumes, network, allow),
        )
        async with Runtime() as rt:
            box = await rt.create(options)
            return await asyncio.to_thread(rt.store.get, box.id)

    try:
        rec = asyncio.run(go())
    except HutchError as e:
        _fail(e)
    click.echo(json.dumps(_record_json(rec), indent=2) if as_json else rec.id)


def _record_json(r: BoxRecord) -> dict[str, object]:
    return {
        "id": r.id,
        "name": r.name,
        "image": r.image,
        "state": r.state,
        "owner_pid": r.owner_pid,
        "created_at": r.created_at,
        "failure": r.failure,
        "ports": published_ports(r),
        "options": r.options.to_json(),
    }


def published_ports(r: BoxRecord) -> list[dict[str, object]]:
    """The ports a running box publishes, as bound (host port 0 resolved); [] otherwise."""
    from hutch.paths import HutchPaths
    from hutch.vm.attach import read_ports

    if r.state != "running":
        return []
    return read_ports(HutchPaths.default().boxes / r.id)


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


__all__ = ["create_cmd", "logs_cmd", "ps_cmd", "rm_cmd"]
main.add_command(ps_cmd, name="ls")  # docker-style alias
