"""The guest agent: ``hutch-agent``, a static C binary that runs as PID 1 in every box.

It serves the portal protocol (``docs/PROTOCOL.md``) over the ``hutch.portal`` virtio-serial port.
:func:`build_agent` compiles it with the host's C compiler; :data:`AGENT_SOURCES` lists what goes
into it, for the content hash of the artifact.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from hutch.errors import SetupError

__all__ = ["AGENT_BINARY", "AGENT_SOURCES", "AGENT_VERSION", "build_agent"]

#: Must equal ``#define AGENT_VERSION`` in agent.c (checked by :func:`build_agent`).
AGENT_VERSION = "0.1.0"

#: Name of the built binary inside the output folder.
AGENT_BINARY = "hutch-agent"

_HERE = Path(__file__).resolve().parent

#: Every file the binary is built from, in a fixed order (for content hashing).
AGENT_SOURCES: list[Path] = [_HERE / "agent.c", _HERE / "Makefile"]

_INSTALL_HINT = (
    "Install a C compiler with static glibc and make (Debian: `apt-get install gcc make "
    "libc6-dev`), or run `hutch setup` as root."
)
_TAIL_LINES = 30


def _tail(text: str, lines: int = _TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _check_version() -> None:
    source = AGENT_SOURCES[0].read_text(encoding="utf-8")
    match = re.search(r'^#define AGENT_VERSION "([^"]*)"', source, re.MULTILINE)
    if match is None or match.group(1) != AGENT_VERSION:
        found = match.group(1) if match else "none"
        raise SetupError(
            f"agent.c declares AGENT_VERSION {found!r}, the Python package {AGENT_VERSION!r}",
            hint="Reinstall hutch; the agent sources do not match this package.",
        )


def build_agent(out_dir: Path) -> Path:
    """Compile ``hutch-agent`` into *out_dir* (created if needed) and return the binary's path.

    Raises :class:`~hutch.errors.SetupError` with the tail of the compiler output on failure.
    """
    _check_version()
    make = shutil.which("make")
    if make is None:
        raise SetupError(
            "cannot build the guest agent: `make` is not installed", hint=_INSTALL_HINT
        )
    out_dir = out_dir.absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [make, "--no-print-directory", "-C", str(_HERE), f"OUT={out_dir}"]
    try:
        subprocess.run(
            cmd,
            check=True,
            capture_output=True,
            text=True,
            errors="replace",
            stdin=subprocess.DEVNULL,
        )
    except subprocess.CalledProcessError as exc:
        output = _tail(f"{exc.stdout or ''}\n{exc.stderr or ''}")
        raise SetupError(
            f"building the guest agent failed (exit {exc.returncode}):\n{output}",
            hint=_INSTALL_HINT,
        ) from exc
    except OSError as exc:
        raise SetupError(f"cannot run {make}: {exc}", hint=_INSTALL_HINT) from exc
    binary = out_dir / AGENT_BINARY
    if not binary.is_file():
        raise SetupError(f"building the guest agent produced no {binary}", hint=_INSTALL_HINT)
    return binary
