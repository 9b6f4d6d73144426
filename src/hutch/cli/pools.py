"""Warm pool commands: ``hutch pool`` (status) and ``hutch pool set`` (create, resize, remove).

A warm pool belongs to the process that keeps its boxes running: for the CLI, the home's server
(see :mod:`hutch.cli.remote`). ``hutch pool`` asks that server, if one answers, and says so when
none does; ``hutch pool set`` goes through it, starting it in the background if needed (as
``hutch start`` does). Pools set this way last as long as that server; ``[pool]`` in config.toml
or ``hutch serve --pool`` make them at every server start.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from hutch.cli import _fail, main
from hutch.cli.remote import server
from hutch.errors import HutchError
from hutch.paths import HutchPaths
from hutch.runtime.pool import MAX_POOL_SIZE, PoolStatus


def _status_json(p: PoolStatus) -> dict[str, Any]:
    return dataclasses.asdict(p)


def _print_table(pools: list[PoolStatus]) -> None:
    table = Table(box=None, pad_edge=False)
    for col in ("IMAGE", "CPUS", "MEMORY", "SIZE", "READY", "RESTORING", "HANDED OUT", "MISSES"):
        table.add_column(col)
    table.add_column("LAST ERROR", overflow="fold")
    for p in pools:
        accel = "" if p.accel == "auto" else f" ({p.accel})"
        table.add_row(
            p.image + accel,
            str(p.cpus),
            f"{p.memory_mib} MiB",
            str(p.size),
            str(p.ready),
            str(p.restoring),
            str(p.handed_out),
            str(p.misses),
            p.last_error or "",
        )
    Console(soft_wrap=True).print(table)


@main.group("pool", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print the pools' status as JSON.")
@click.pass_context
def pool_cmd(ctx: click.Context, as_json: bool) -> None:
    """The home server's warm pools: restored boxes kept ready, so that `create` with their
    image, cpus and memory hands one out at once. `hutch pool set` configures one."""
    if ctx.invoked_subcommand is not None:
        return
    paths = HutchPaths.default()

    async def go() -> list[PoolStatus] | None:
        rt = await server(paths, start=False)
        if rt is None:
            return None
        try:
            pools: list[PoolStatus] = await rt.pool_status()
            return pools
        finally:
            await rt.close()

    try:
        pools = asyncio.run(go())
    except HutchError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps([_status_json(p) for p in pools or []], indent=2))
        return
    if pools is None:
        click.echo("no warm pools: no hutch server answers (`hutch pool set` starts one)")
    elif not pools:
        click.echo("no warm pools (`hutch pool set IMAGE --size N` makes one)")
    else:
        _print_table(pools)


@pool_cmd.command("set")
@click.argument("image")
@click.option(
    "--size",
    type=click.IntRange(0, MAX_POOL_SIZE),
    required=True,
    help=f"Ready boxes to keep (0 to {MAX_POOL_SIZE}; 0 drains and removes the pool).",
)
@click.option("--cpus", type=int, default=1, show_default=True, help="The boxes' vCPUs.")
@click.option(
    "--memory", "memory", type=int, default=256, show_default=True, help="The boxes' RAM in MiB."
)
@click.option("--accel", default="auto", show_default=True, help="kvm, tcg or auto.")
@click.option("--wait", is_flag=True, help="Wait until the pool is full (at most 5 minutes).")
@click.option("--json", "as_json", is_flag=True, help="Print the pool's status as JSON.")
def pool_set_cmd(
    image: str, size: int, cpus: int, memory: int, accel: str, wait: bool, as_json: bool
) -> None:
    """Keep SIZE restored boxes of IMAGE (with --cpus and --memory) ready in the home's server
    (started in the background if needed); it fills in the background unless --wait."""
    paths = HutchPaths.default()

    async def go() -> PoolStatus:
        rt = await server(paths, start=True)
        try:
            status: PoolStatus = await rt.configure_pool(
                image, cpus=cpus, memory_mib=memory, size=size, accel=accel
            )
            if wait and size > 0:
                await rt.wait_pool(300.0)
                for p in await rt.pool_status():
                    if (p.image, p.cpus, p.memory_mib, p.accel) == (
                        status.image,
                        status.cpus,
                        status.memory_mib,
                        status.accel,
                    ):
                        status = p
            return status
        finally:
            await rt.close()

    try:
        status = asyncio.run(go())
    except HutchError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(_status_json(status), indent=2))
    elif size == 0:
        click.echo(f"removed the warm pool of {status.image}")
    else:
        click.echo(
            f"warm pool of {status.image} ({status.cpus} cpus, {status.memory_mib} MiB): "
            f"size {status.size}, {status.ready} ready"
        )


__all__ = ["pool_cmd", "pool_set_cmd"]
