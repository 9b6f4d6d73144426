"""Volumes: host folders and single files shared with a box over virtio-9p.

**Two 9p devices for any number of volumes.** microvm without ACPI has 8 virtio-mmio slots, three
taken by the portal, the disk and the RNG, one by a NIC: one 9p device per volume would allow 4.
So a box gets at most two exports, ``hutchrw`` (``readonly=off``) and ``hutchro``
(``readonly=on``), each a staging folder in the box's run folder (``RUN/<id>/vols/rw|ro/``) with one
entry per volume: ``N`` (a folder, or an empty file for a single-file volume). QEMU is started in a
**private mount namespace** (``unshare --mount``, plus ``--user --map-root-user`` when not root:
:func:`launcher`), where a small ``sh`` script bind-mounts each volume's host path on its entry
before ``exec``-ing QEMU. The bind mounts exist only in that namespace: the host never sees them
(removing the run folder can never reach into a volume), and they vanish with QEMU.

The list reaches the guest on the kernel command line, one ``hutch.vol=TAG/N:ro|rw:d|f:GUESTPATH``
per volume (the guest path percent-encoded: :func:`encode_guest_path`). The agent mounts each tag
once on a hidden folder (``/run/hutch/vol/TAG``, ``trans=virtio,version=9p2000.L,msize=512000``),
bind-mounts entry ``N`` on the guest path (``mkdir -p`` first, or an empty file for a file), read-only
ones with ``MS_RDONLY``, parents before children, and then detaches the hidden mounts: the guest
sees each volume at its path and nothing else (the virtio 9p transport takes one mount per tag, so
while the volumes hold it nobody can mount an export again: ``EBUSY``). A volume that cannot be mounted is reported in the
agent's ``HELLO`` and fails the start with the guest's reason.

**Read-only is enforced on the host, twice**: the ``hutchro`` export is ``readonly=on`` (QEMU answers
every modifying 9p request with ``EROFS``), and its bind mounts are read-only in QEMU's namespace.
A guest root that remounts its view read-write still cannot write.

**A single host file** is bind-mounted like a folder, so only that file is visible (its siblings
are not), and writes from either side reach the same inode. A host editor that *replaces* the file
(write a new one, rename it over) leaves the box on the old inode until it restarts — as with
Docker's file bind mounts.

**Security model: what a hostile guest can do to the host.** QEMU's ``local`` backend opens every
path relative to the export, one component at a time with ``O_NOFOLLOW`` (the fix for CVE-2016-9602
in QEMU 2.9): a symlink the guest creates inside a share is never followed *on the host*, so the
guest cannot reach outside its volumes; inside them it can do at most what QEMU's user may do.
(Within the guest, 9p2000.L's default ``access=client`` has the guest kernel check permissions
against the owners and modes it is shown.) ``security_model`` decides how ownership maps:

* QEMU **not root** (the normal case) → ``security_model=none``, QEMU in a user namespace that maps
  the user running hutch to root (``--map-root-user``, as rootless Podman does): the guest sees that
  user's files as owned by root (uid 0), other users' as ``nobody``; files the guest creates are
  plain host files owned by the user, with the modes the guest chose; ``chown`` to another uid fails
  (``EINVAL``). Guest root can do what the host user can, nothing more.
* QEMU **as root** → ``security_model=mapped-xattr``: with ``none`` (= ``passthrough`` as root) guest
  root could create root-owned setuid binaries and device nodes *on the host*. Mapped, the guest's
  owners, modes, symlinks and device files are kept in ``user.virtfs.*`` xattrs; the guest sees host
  files with their real owners and modes until it changes them, and on the host every file it
  creates is a plain root-owned file (``0600``, folders ``0700``). The host file system must support
  user xattrs (ext4, xfs, btrfs; tmpfs since Linux 6.6).

Needs: ``unshare`` (util-linux) and, when not root, unprivileged user namespaces (Debian's default).
Boxes with volumes cannot be snapshotted: QEMU refuses to migrate a mounted 9p share.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hutch.errors import ConfigError
from hutch.runtime.options import Volume
from hutch.vm.disk import storage_error

#: 9p message size: the most the guest kernel's virtio transport takes (6.1: 125 pages).
MSIZE = 512000
#: The exports' mount tags (the agent mounts them under /run/hutch/vol/TAG).
TAG_RW = "hutchrw"
TAG_RO = "hutchro"
#: In a box's run folder: the staging folders QEMU exports.
STAGING_DIR = "vols"
#: Characters a guest path keeps on the kernel command line; everything else is %XX.
_SAFE = "/._-+@=,~"

#: Run by ``sh -c`` in QEMU's mount namespace: ``SRC DST ro|rw`` triples, then ``--`` and the
#: command to exec. A failing mount ends it (its message lands in QEMU's log).
MOUNT_SCRIPT = """set -e
while [ "$1" != "--" ]; do
    mount --bind -- "$1" "$2"
    if [ "$3" = ro ]; then mount -o remount,bind,ro -- "$2"; fi
    shift 3
done
shift
exec "$@"
"""


def security_model(euid: int | None = None) -> str:
    """``none`` for an unprivileged QEMU, ``mapped-xattr`` for one running as root (see the
    module docstring)."""
    return "mapped-xattr" if (os.geteuid() if euid is None else euid) == 0 else "none"


def encode_guest_path(path: str) -> str:
    """Percent-encode a guest path for the kernel command line: no spaces, quotes, ``:`` or
    ``%`` survive, and non-ASCII names travel as their UTF-8 bytes."""
    return urllib.parse.quote(path, safe=_SAFE)


def _qemu_value(text: str) -> str:
    """Escape a value for QEMU's ``key=value,…`` option syntax (a comma is doubled)."""
    return text.replace(",", ",,")


@dataclass(frozen=True)
class VolumeMount:
    """One volume: where its host path is bound, and where the guest mounts it."""

    index: int
    host_path: Path
    guest_path: str
    read_only: bool
    #: A single file (not a folder).
    file: bool = False

    @property
    def tag(self) -> str:
        return TAG_RO if self.read_only else TAG_RW

    def entry(self, staging: Path) -> Path:
        """Its mount point in the export's staging folder."""
        return staging / ("ro" if self.read_only else "rw") / str(self.index)

    def kernel_arg(self) -> str:
        mode = "ro" if self.read_only else "rw"
        kind = "f" if self.file else "d"
        return (
            f"hutch.vol={self.tag}/{self.index}:{mode}:{kind}:"
            f"{encode_guest_path(self.guest_path)}"
        )


def _depth(path: str) -> int:
    return len([p for p in path.split("/") if p])


def plan(volumes: Sequence[Volume]) -> list[VolumeMount]:
    """Check every volume's host path again (it may have gone since the box was created) and
    return the mounts in the order the guest must make them (parents before what is mounted
    inside them). ConfigError names the volume."""
    mounts: list[VolumeMount] = []
    for i, vol in enumerate(volumes):
        vol.validate(f"volumes[{i}]")  # absolute, exists, a folder or a regular file
        host = Path(os.path.realpath(vol.host_path))
        guest = posixpath.normpath(vol.guest_path)
        mounts.append(VolumeMount(i, host, guest, vol.read_only, file=not host.is_dir()))
    mounts.sort(key=lambda m: (_depth(m.guest_path), m.index))
    return mounts


def stage(mounts: Sequence[VolumeMount], staging: Path) -> None:
    """Make the exports' staging folders and one mount point per volume (host side, empty)."""
    if staging.exists():
        shutil.rmtree(staging)  # only empty mount points: the binds live in QEMU's namespace
    try:
        for sub in ("rw", "ro"):
            (staging / sub).mkdir(parents=True, mode=0o700)
        for m in mounts:
            entry = m.entry(staging)
            if m.file:
                entry.touch(mode=0o600)
            else:
                entry.mkdir(mode=0o700)
    except OSError as e:
        raise storage_error(Path(e.filename or staging), e) from e


def qemu_args(mounts: Sequence[VolumeMount], staging: Path, model: str | None = None) -> list[str]:
    """``-fsdev`` + ``-device virtio-9p-device`` for each export the volumes need."""
    model = model or security_model()
    args: list[str] = []
    for tag, sub, ro in ((TAG_RW, "rw", False), (TAG_RO, "ro", True)):
        if not any(m.read_only == ro for m in mounts):
            continue
        path = _qemu_value(str(staging / sub))
        args += [
            "-fsdev",
            f"local,id={tag},path={path},security_model={model},"
            f"readonly={'on' if ro else 'off'},multidevs=remap",
            "-device",
            f"virtio-9p-device,fsdev={tag},mount_tag={tag}",
        ]
    return args


def launcher(mounts: Sequence[VolumeMount], staging: Path, euid: int | None = None) -> list[str]:
    """The argv prefix that starts QEMU in its own mount namespace with the volumes bound (the
    QEMU command follows it); [] without volumes."""
    if not mounts:
        return []
    unshare = shutil.which("unshare") or "unshare"
    ns = (
        ["--mount"]
        if (os.geteuid() if euid is None else euid) == 0
        else [
            "--user",
            "--map-root-user",
            "--mount",
        ]
    )
    # The rw export's own folder is bound read-only first: the guest can write in its volumes,
    # never create entries next to them (on the host's tmpfs).
    rw_root = str(staging / "rw")
    triples = [rw_root, rw_root, "ro"]
    for m in mounts:
        triples += [str(m.host_path), str(m.entry(staging)), "ro" if m.read_only else "rw"]
    return [unshare, *ns, "--", "sh", "-c", MOUNT_SCRIPT, "hutch-volumes", *triples, "--"]


def kernel_args(mounts: Sequence[VolumeMount]) -> list[str]:
    return [m.kernel_arg() for m in mounts]


def check_unshare() -> None:
    if shutil.which("unshare") is None:  # pragma: no cover - util-linux is essential on Debian
        raise ConfigError(
            "volumes need `unshare` (util-linux), which is not installed",
            hint="apt-get install util-linux",
        )


__all__ = [
    "MSIZE",
    "STAGING_DIR",
    "TAG_RO",
    "TAG_RW",
    "VolumeMount",
    "check_unshare",
    "encode_guest_path",
    "kernel_args",
    "launcher",
    "plan",
    "qemu_args",
    "security_model",
    "stage",
]
