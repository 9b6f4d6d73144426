"""``hutch serve``: run the HTTP API (see :mod:`hutch.server.serve` and docs/API.md)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import click

from hutch.cli import _fail, err_console, main
from hutch.errors import ConfigError, HutchError
from hutch.paths import HutchPaths
from hutch.runtime.pool import PoolSpec


@main.command("serve")
@click.option(
    "--listen",
    metavar="ADDR",
    help="unix:///PATH, HOST:PORT or tcp://HOST:PORT (default: unix socket HUTCH_HOME/hutch.sock).",
)
@click.option(
    "--token-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Bearer token for TCP (made, mode 0600, if missing). Default: HUTCH_HOME/server.token.",
)
@click.option(
    "--no-token",
    is_flag=True,
    help="Serve TCP without a token (loopback addresses only: every local user can use it).",
)
@click.option(
    "--pool",
    "pool",
    multiple=True,
    metavar="IMAGE[:CPUS:MEMORY]=SIZE",
    help="Keep SIZE restored boxes of IMAGE ready (repeatable; added to config.toml's [pool]).",
)
@click.option(
    "--max-upload-mib",
    type=click.IntRange(min=1),
    help="Largest file a client may upload (PUT …/files/content), in MiB. Default 16384.",
)
def serve_cmd(
    listen: str | None,
    token_file: Path | None,
    no_token: bool,
    pool: tuple[str, ...],
    max_upload_mib: int | None,
) -> None:
    """Serve the runtime over HTTP/WebSocket until SIGTERM or Ctrl-C (then stop its boxes)."""
    from hutch.server.serve import Listen, serve

    try:
        pools = [parse_pool(p) for p in pool]
    except HutchError as e:
        _fail(e)

    def ready(where: Listen) -> None:
        token_path = token_file or HutchPaths.default().server_token
        note = "" if where.kind == "unix" or no_token else f" (bearer token in {token_path})"
        err_console.print(f"hutch serve: listening on {where.url}{note}", highlight=False)

    verbose = logging.getLogger().getEffectiveLevel() <= logging.INFO
    try:
        asyncio.run(
            serve(
                listen,
                token_file=token_file,
                require_token=not no_token,
                access_log=verbose,
                on_ready=ready,
                pools=pools,
                max_upload=max_upload_mib << 20 if max_upload_mib else None,
            )
        )
    except HutchError as e:
        _fail(e)
    err_console.print("hutch serve: stopped", highlight=False)


def parse_pool(text: str) -> PoolSpec:
    """``IMAGE[:CPUS:MEMORY]=SIZE`` (``busybox=2``, ``busybox:2:512=1``) as a PoolSpec. The image
    may carry a tag (``alpine:3.20=2``): CPUS and MEMORY are read only when the last two
    ``:`` fields are both numbers."""
    image, sep, size = text.rpartition("=")
    hint = "e.g. --pool busybox=2 or --pool alpine:3.20:2:512=1 (IMAGE[:CPUS:MEMORY]=SIZE)"
    if not sep or not image or not size.strip().isdigit():
        raise ConfigError(f"--pool {text!r}: expected IMAGE[:CPUS:MEMORY]=SIZE", hint=hint)
    cpus, memory = PoolSpec.cpus, PoolSpec.memory_mib
    parts = image.split(":")
    if len(parts) >= 3 and parts[-1].isdigit() and parts[-2].isdigit():
        image, cpus, memory = ":".join(parts[:-2]), int(parts[-2]), int(parts[-1])
    try:
        return PoolSpec(image=image, cpus=cpus, memory_mib=memory, size=int(size))
    except ConfigError as e:
        raise ConfigError(f"--pool {text!r}: {e.message}", hint=e.hint or hint) from None


__all__ = ["parse_pool", "serve_cmd"]
