"""The built-in ``debian-python`` image: Debian bookworm (minbase) with python3, made by mmdebstrap.

It needs Debian's package mirror, not a container registry, so hutch can run Python code on a machine
that reaches no registry at all. ``mmdebstrap`` writes a root filesystem tarball (≈30 s, ≈216 MB;
as root it uses chroot mode, otherwise ``--mode=unshare``), which is then loaded like any rootfs
tarball (:func:`hutch.images.sources.load`): one layer, digest-checked, applied in fakeroot.
Built on request (``hutch setup --debian``) or on first use (``Box("debian-python")``).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from hutch.errors import SetupError
from hutch.images.pull import ProgressCallback, PullEvent
from hutch.images.store import ImageRecord, ImageStore
from hutch.paths import HutchPaths

NAME = "debian-python"
REFERENCE = "docker.io/library/debian-python:latest"
SUITE = "bookworm"
PACKAGES = ("python3", "ca-certificates")
#: Generous: mirrors can be slow; mmdebstrap itself retries downloads.
MMDEBSTRAP_TIMEOUT = 900.0


def _quiet(_: PullEvent) -> None:
    pass


def build_debian_python(
    paths: HutchPaths, *, progress: ProgressCallback = _quiet, store: ImageStore | None = None
) -> ImageRecord:
    """Bootstrap the image with mmdebstrap and register it as ``debian-python``."""

    if shutil.which("mmdebstrap") is None:
        raise SetupError(
            "mmdebstrap is needed to build the debian-python image",
            hint="apt-get install mmdebstrap",
        )
    store = store or ImageStore(paths)
    paths.build.mkdir(parents=True, exist_ok=True)
    # One bootstrap at a time per home: a second first-use waits and then finds the image.
    lock_fd = os.open(paths.build / "debian-python.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        existing = store.lookup(REFERENCE)
        if existing is not None and existing.base_path.is_file():
            return existing
        return _bootstrap(paths, store, progress)
    finally:
        os.close(lock_fd)


def _bootstrap(paths: HutchPaths, store: ImageStore, progress: ProgressCallback) -> ImageRecord:
    from hutch.images.sources import load

    with tempfile.TemporaryDirectory(prefix="debian-python-", dir=paths.build) as tmp:
        out = Path(tmp) / "rootfs.tar"
        cmd = [
            "mmdebstrap",
            "--quiet",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            '--aptopt=Acquire::Languages "none"',  # no translation lists in the image
        ]
        if os.geteuid() != 0:
            cmd.append("--mode=unshare")
        cmd += [SUITE, str(out)]
        progress(PullEvent("status", f"mmdebstrap {SUITE} + {' '.join(PACKAGES)} (about 30 s)"))
        t0 = time.monotonic()
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=MMDEBSTRAP_TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired:
            raise SetupError(
                f"mmdebstrap did not finish within {MMDEBSTRAP_TIMEOUT:g} s",
                hint="Check that the Debian mirror (deb.debian.org) is reachable.",
            ) from None
        if proc.returncode != 0:
            raise SetupError(
                f"mmdebstrap failed ({proc.returncode}):\n{proc.stderr.strip()[-1500:]}",
                hint="Check that the Debian mirror is reachable; as non-root, mmdebstrap needs "
                "unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1).",
            )
        progress(PullEvent("status", f"bootstrapped in {time.monotonic() - t0:.0f} s"))
        return load(
            out,
            store=store,
            tag=REFERENCE,
            progress=progress,
            source=f"builtin mmdebstrap {SUITE} {'+'.join(PACKAGES)}",
        )


__all__ = ["NAME", "REFERENCE", "build_debian_python"]
