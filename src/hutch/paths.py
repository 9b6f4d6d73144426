"""Where hutch keeps its files (the *hutch home*) and how that folder is laid out.

``HUTCH_HOME`` overrides the location; the default follows the XDG base-directory spec
(``$XDG_DATA_HOME/hutch`` or ``~/.local/share/hutch``).

Layout::

    HOME/
      artifacts/<name>-<hash>/   content-keyed build outputs (kernel, agent, initramfs, images)
      build/                     scratch trees for slow builds (kernel source); safe to delete
      boxes/<box-id>/            per-box files that outlive the VM: disk overlay, console log
      cache/                     small cached verdicts (accelerator probe)
      snapshots/<snapshot-id>/   frozen RAM, device state and disk of a snapshot
      hutch.sock                 ``hutch serve``'s default Unix socket (0600)
      server.token               the bearer token ``hutch serve`` requires on TCP (0600)

Sockets and guest RAM live in a per-user run directory on tmpfs (see :func:`run_root`), because Unix
socket paths are limited to 107 bytes and RAM files belong in memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def default_home() -> Path:
    env = os.environ.get("HUTCH_HOME")
    if env:
        return Path(env).expanduser().absolute()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return (base / "hutch").absolute()


def run_root() -> Path:
    """Per-user folder for sockets and RAM files: ``/dev/shm/hutch-<uid>`` (tmpfs) when it exists."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path("/tmp")
    return base / f"hutch-{os.getuid()}"


@dataclass(frozen=True)
class HutchPaths:
    home: Path

    @classmethod
    def default(cls) -> HutchPaths:
        return cls(default_home())

    @property
    def artifacts(self) -> Path:
        return self.home / "artifacts"

    @property
    def build(self) -> Path:
        return self.home / "build"

    @property
    def boxes(self) -> Path:
        return self.home / "boxes"

    @property
    def cache(self) -> Path:
        return self.home / "cache"

    @property
    def run(self) -> Path:
        return run_root()

    @property
    def snapshots(self) -> Path:
        """Snapshot folders (``snapshots/<id>/``: RAM, device state, frozen disk, image.id)."""
        return self.home / "snapshots"

    @property
    def server_socket(self) -> Path:
        """Where ``hutch serve`` listens by default (a Unix socket, mode 0600)."""
        return self.home / "hutch.sock"

    @property
    def server_token(self) -> Path:
        """The bearer token ``hutch serve`` requires on TCP (mode 0600; made on first start)."""
        return self.home / "server.token"

    def ensure(self) -> None:
        for p in (self.artifacts, self.build, self.boxes, self.cache):
            p.mkdir(parents=True, exist_ok=True)
        self.run.mkdir(mode=0o700, parents=True, exist_ok=True)
