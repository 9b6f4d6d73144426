"""``hutch serve``: run the HTTP API (see :mod:`hutch.server.serve` and docs/API.md)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import click

from hutch.cli import _fail, err_console, main
from hutch.errors import HutchError
from hutch.paths import HutchPaths


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
def serve_cmd(listen: str | None, token_file: Path | None, no_token: bool) -> None:
    """Serve the runtime over HTTP/WebSocket until SIGTERM or Ctrl-C (then stop its boxes)."""
    from hutch.server.serve import Listen, serve

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
            )
        )
    except HutchError as e:
        _fail(e)
    err_console.print("hutch serve: stopped", highlight=False)


__all__ = ["serve_cmd"]
