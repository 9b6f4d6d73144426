"""``-t`` for ``hutch run`` and ``hutch exec``: the command runs on a terminal in the guest, sized
like ours, and (with ``-i``) our terminal is put in raw mode, so every key — Ctrl-C, arrows, Tab —
goes to the guest as typed, and our window size follows ours (``SIGWINCH`` → ``resize``).

Our terminal's settings are restored however the command ends; only a kill of this process
skips that (run ``reset`` then).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import termios
import tty as tty_mod
from collections.abc import Iterator
from typing import Any

from hutch.execution import DEFAULT_TERMINAL_SIZE

__all__ = ["attach_terminal", "terminal_options"]


def _our_size() -> tuple[int, int] | None:
    """(rows, columns) of the terminal we run in (stdout, else stdin), or None."""
    for stream in (sys.stdout, sys.stdin):
        with contextlib.suppress(OSError, ValueError):
            size = os.get_terminal_size(stream.fileno())
            if size.lines > 0 and size.columns > 0:
                return size.lines, size.columns
    return None


def terminal_options(env: dict[str, str]) -> dict[str, Any]:
    """``spawn()`` arguments for ``-t``: a terminal sized like ours, and our ``TERM`` unless
    ``-e`` set one."""
    term = os.environ.get("TERM")
    if term and "TERM" not in env:
        env = {**env, "TERM": term}
    return {"tty": True, "term_size": _our_size() or DEFAULT_TERMINAL_SIZE, "env": env}


@contextlib.contextmanager
def _raw(fd: int) -> Iterator[None]:
    """Our terminal in raw mode (no echo, no line editing, no signals from keys) meanwhile."""
    saved = termios.tcgetattr(fd)
    tty_mod.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def attach_terminal(execution: Any, interactive: bool) -> int:
    """:func:`hutch.cli.attach` for a process on a terminal: raw mode for our terminal while
    ``interactive``, and window-size changes forwarded."""
    from hutch.cli import attach  # hutch.cli imports this module's users

    loop = asyncio.get_running_loop()
    resizes: set[asyncio.Task[None]] = set()

    def on_winch() -> None:
        size = _our_size()
        if size is not None:
            task = loop.create_task(execution.resize(*size))
            resizes.add(task)
            task.add_done_callback(resizes.discard)

    raw: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if interactive and sys.stdin.isatty():
        raw = _raw(sys.stdin.fileno())
    loop.add_signal_handler(signal.SIGWINCH, on_winch)
    try:
        with raw:
            return await attach(execution, interactive)
    finally:
        loop.remove_signal_handler(signal.SIGWINCH)
        for task in resizes:
            task.cancel()
