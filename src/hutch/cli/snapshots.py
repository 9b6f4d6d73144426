"""Snapshot commands: ``hutch snapshot``, ``snapshots``, ``rmsnap``, ``clone``, and the box
``hutch create --snapshot`` makes (:func:`create_from_snapshot`, called by ``create``).

Taking a snapshot and cloning need the box's VM, which lives in the home's server (see
:mod:`hutch.cli.remote`): they go through that server, and the box must be running there
(``hutch start``), else the same :class:`~hutch.errors.InvalidStateError` as ``hutch exec``. A box
made from a snapshot is created in the server too (started in the background if none answers), so
that ``hutch start`` restores it there. Listing and removing snapshots only read and change the
home's store: no server is needed.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from hutch.cli import _fail, _report, main
from hutch.cli.boxes import _age, _record_json
from hutch.cli.remote import _size, running_box, server
from hutch.errors import BadRequestError, HutchError
from hutch.paths import HutchPaths
from hutch.runtime.runtime import Runtime
from hutch.runtime.snapshots import Snapshot
from hutch.runtime.store import BoxRecord
from hutch.server.wire import snapshot_to_json


@main.command("snapshot")
@click.argument("box")
@click.option("--name", help="A unique snapshot name: [a-z0-9][a-z0-9_.-]{0,62}.")
@click.option("--json", "as_json", is_flag=True, help="Print the snapshot's record as JSON.")
def snapshot_cmd(box: str, name: str | None, as_json: bool) -> None:
    """Snapshot a box the home's server runs (RAM, device state, disk); print the snapshot's id.

    The box runs on. `hutch create --snapshot SNAP` or `hutch clone` make boxes that resume it."""
    paths = HutchPaths.default()

    async def go() -> Snapshot:
        b = await running_box(paths, box)
        snap: Snapshot = await b.snapshot(name)
        return snap

    try:
        snap = asyncio.run(go())
    except HutchError as e:
        _fail(e)
    click.echo(json.dumps(snapshot_to_json(snap, []), indent=2) if as_json else snap.id)


@main.command("snapshots")
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON.")
def snapshots_cmd(as_json: bool) -> None:
    """List the home's snapshots, oldest first; USERS: how many boxes were made from each (their
    ids with --json)."""

    async def go() -> list[tuple[Snapshot, list[str]]]:
        async with Runtime() as rt:
            snaps = await rt.snapshots()

            def users() -> list[tuple[Snapshot, list[str]]]:
                return [(s, rt.store.snapshot_users(s.id)) for s in snaps]

            return await asyncio.to_thread(users)

    try:
        rows = asyncio.run(go())
    except HutchError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps([snapshot_to_json(s, u) for s, u in rows], indent=2))
        return
    table = Table(box=None, pad_edge=False)
    table.add_column("ID", no_wrap=True, min_width=max((len(s.id) for s, _ in rows), default=2))
    for col in ("NAME", "IMAGE", "CPUS", "MEMORY", "SIZE", "CREATED", "USERS"):
        table.add_column(col)
    for s, users in rows:
        table.add_row(
            s.id,
            s.name or "-",
            s.image,
            str(s.cpus),
            f"{s.memory_mib}MiB",
            _size(s.size_bytes),
            _age(s.created_at),
            str(len(users)),
        )
    Console(soft_wrap=True).print(table)


@main.command("rmsnap")
@click.argument("snapshots", nargs=-1, required=True)
def rmsnap_cmd(snapshots: tuple[str, ...]) -> None:
    """Remove snapshots (by id, id prefix or name) and their files.

    Refused while boxes made from a snapshot exist: remove those first (`hutch rm`)."""

    async def go() -> bool:
        failed = False
        async with Runtime() as rt:
            for snap in snapshots:
                try:
                    await rt.remove_snapshot(snap)
                    click.echo(snap)
                except HutchError as e:
                    _report(e)
                    failed = True
        return failed

    try:
        if asyncio.run(go()):
            raise SystemExit(125)
    except HutchError as e:
        _fail(e)


@main.command("clone")
@click.argument("box")
@click.option("--name", help="The clone's name: [a-z0-9][a-z0-9_.-]{0,62}.")
@click.option("--json", "as_json", is_flag=True, help="Print the clone's record as JSON.")
def clone_cmd(box: str, name: str | None, as_json: bool) -> None:
    """A running copy of a box the home's server runs, started there; print its id.

    The clone resumes where the box was (processes, files) with its own name, hostname, RNG seed
    and disk. The snapshot this takes is removed with its last clone."""
    paths = HutchPaths.default()

    async def go() -> BoxRecord:
        b = await running_box(paths, box)
        clone = await b.clone(name=name)
        rec: BoxRecord = clone.record
        return rec

    try:
        rec = asyncio.run(go())
    except HutchError as e:
        _fail(e)
    click.echo(json.dumps(_record_json(rec), indent=2) if as_json else rec.id)


#: `hutch create` parameters → BoxOptions fields (env, labels, ports and volumes are parsed).
_CREATE_OPTIONS = {
    "image": "image",
    "name": "name",
    "cpus": "cpus",
    "memory": "memory_mib",
    "disk_size": "disk_size_mib",
    "workdir": "workdir",
    "user": "user",
    "auto_remove": "auto_remove",
    "accel": "accel",
}


def _given(ctx: click.Context) -> dict[str, Any]:
    """The `hutch create` parameters given on the command line (not left at their defaults)."""
    source = click.core.ParameterSource
    return {
        key: value
        for key, value in ctx.params.items()
        if ctx.get_parameter_source(key) not in (source.DEFAULT, source.DEFAULT_MAP, None)
    }


def clone_overrides(ctx: click.Context) -> dict[str, Any]:
    """``Runtime.create(snapshot=…)`` keywords from `hutch create`'s given options only: the
    rest is the snapshot's. Machine options given anyway are checked against it (ConfigError)."""
    from hutch.cli import _parse_env
    from hutch.runtime.options import Port, Volume

    given = _given(ctx)
    out = {field: given[key] for key, field in _CREATE_OPTIONS.items() if key in given}
    if "env" in given:
        out["env"] = _parse_env(given["env"])
    if "labels" in given:
        labels: dict[str, str] = {}
        for item in given["labels"]:
            key, sep, value = item.partition("=")
            if not sep:
                raise BadRequestError(f"label {item!r} is not K=V")
            labels[key] = value
        out["labels"] = labels
    if "publish" in given:
        out["ports"] = [Port.parse(p) for p in given["publish"]]
    if "volumes" in given:
        out["volumes"] = [Volume.parse(v) for v in given["volumes"]]
    if "network" in given:
        out["network"] = given["network"]
    if "allow" in given:
        out["allow"] = list(given["allow"])
    return out


def create_from_snapshot(ctx: click.Context, snapshot: str, as_json: bool) -> None:
    """`hutch create --snapshot SNAP`: a box made from the snapshot, in the home's server
    (started if none answers); not started (`hutch start` restores it there)."""
    paths = HutchPaths.default()

    async def go() -> BoxRecord:
        overrides = clone_overrides(ctx)
        rt = await server(paths, start=True)
        try:
            box = await rt.create(snapshot=snapshot, **overrides)
        finally:
            await rt.close()
        rec: BoxRecord = box.record
        return rec

    try:
        rec = asyncio.run(go())
    except HutchError as e:
        _fail(e)
    click.echo(json.dumps(_record_json(rec), indent=2) if as_json else rec.id)


__all__ = [
    "clone_cmd",
    "clone_overrides",
    "create_from_snapshot",
    "rmsnap_cmd",
    "snapshot_cmd",
    "snapshots_cmd",
]
