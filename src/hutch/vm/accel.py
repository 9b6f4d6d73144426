"""Choosing the accelerator: KVM when a guest really boots under it, else TCG (software).

``/dev/kvm`` existing proves nothing — on nested "PVM" hosts every standard guest hangs or dies under
``-accel kvm`` (notes §1). So KVM is *probed*: a tiny guest (hutch's kernel and initramfs, with
``hutch.probe=1`` so the agent prints a marker and resets at once) must print the marker within a
short deadline. The verdict is cached in ``HOME/cache/accel.json``, keyed by everything that could
change it (QEMU binary, kernel, host kernel release, /dev/kvm identity).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hutch.artifacts import hash_inputs
from hutch.errors import BadRequestError, UnsupportedEngineError
from hutch.paths import HutchPaths
from hutch.vm.cmdline import BASE_OPTIONS, MICROVM, accel_options

log = logging.getLogger("hutch.vm")

PROBE_DEADLINE = 6.0
PROBE_MARKER = b"HUTCH-PROBE-OK"
ACCELS = ("auto", "kvm", "tcg")


@dataclass(frozen=True)
class AccelVerdict:
    accel: str  # "kvm" | "tcg"
    reason: str
    key: str
    probed_at: float
    probe_seconds: float = 0.0


def _probe_key(kernel: Path, initramfs: Path) -> str:
    qemu = shutil.which("qemu-system-x86_64") or ""
    parts: list[str] = [qemu, os.uname().release, str(kernel), str(initramfs)]
    with contextlib.suppress(OSError):
        st = os.stat(qemu)
        parts.append(f"{st.st_size}:{st.st_mtime_ns}")
    with contextlib.suppress(OSError):
        st = os.stat("/dev/kvm")
        parts.append(f"kvm:{st.st_rdev}")
    return hash_inputs(parts)[:24]


def _cache_file(paths: HutchPaths) -> Path:
    return paths.cache / "accel.json"


def cached_verdict(paths: HutchPaths, kernel: Path, initramfs: Path) -> AccelVerdict | None:
    try:
        data = json.loads(_cache_file(paths).read_text())
        verdict = AccelVerdict(**data)
    except (OSError, ValueError, TypeError):
        return None
    return verdict if verdict.key == _probe_key(kernel, initramfs) else None


def _kvm_unusable_reason() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return (
            "/dev/kvm does not exist (no hardware virtualisation, or the kvm module is not loaded)"
        )
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no permission to open /dev/kvm (add your user to the 'kvm' group)"
    return None


async def probe_kvm(
    kernel: Path, initramfs: Path, deadline: float = PROBE_DEADLINE
) -> tuple[bool, str]:
    """Boot a tiny guest under KVM; (works, reason)."""
    if (reason := _kvm_unusable_reason()) is not None:
        return False, reason
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return False, "qemu-system-x86_64 is not installed"
    argv = [
        qemu, "-M", MICROVM, *accel_options("kvm"), "-m", "128M", "-smp", "1", *BASE_OPTIONS,
        "-kernel", str(kernel), "-initrd", str(initramfs),
        "-append", "console=ttyS0 reboot=t panic=-1 quiet hutch.probe=1",
        "-serial", "stdio",
    ]  # fmt: skip
    setpriv = shutil.which("setpriv")
    if setpriv:
        argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    seen = b""

    async def read_marker() -> bool:
        nonlocal seen
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(4096):
            seen = (seen + chunk)[-65536:]
            if PROBE_MARKER in seen:
                return True
        return False

    try:
        ok = await asyncio.wait_for(read_marker(), deadline)
    except TimeoutError:
        ok = False
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        err = b""
        with contextlib.suppress(asyncio.TimeoutError):
            err = await asyncio.wait_for(proc.stderr.read(65536), 2.0)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(proc.wait(), 5.0)
    if ok:
        return True, "a probe guest booted under KVM"
    errline = next((ln for ln in err.decode("utf-8", "replace").splitlines() if ln.strip()), "")
    why = errline or f"the probe guest did not reach init within {deadline:g} s"
    if os.path.isdir("/sys/module/kvm_pvm"):
        why += (
            " (this host's /dev/kvm is a nested PVM hypervisor, which cannot run standard guests)"
        )
    return False, f"KVM is present but unusable: {why}"


async def resolve_accel(
    requested: str, paths: HutchPaths, kernel: Path, initramfs: Path, *, reprobe: bool = False
) -> AccelVerdict:
    """The accelerator to use for ``requested`` (``auto``, ``kvm`` or ``tcg``)."""
    if requested not in ACCELS:
        raise BadRequestError(
            f"accel must be one of {', '.join(ACCELS)}, not {requested!r}",
            hint="Use accel='auto' to let hutch pick KVM when it works.",
        )
    if requested == "tcg":
        return AccelVerdict("tcg", "requested", "", time.time())
    verdict = None if reprobe else cached_verdict(paths, kernel, initramfs)
    if verdict is None:
        t0 = time.monotonic()
        works, reason = await probe_kvm(kernel, initramfs)
        verdict = AccelVerdict(
            "kvm" if works else "tcg",
            reason,
            _probe_key(kernel, initramfs),
            time.time(),
            round(time.monotonic() - t0, 3),
        )
        paths.cache.mkdir(parents=True, exist_ok=True)
        tmp = _cache_file(paths).with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(verdict)))
        tmp.replace(_cache_file(paths))
        if not works:
            log.warning("KVM not usable, falling back to TCG (software emulation): %s", reason)
    if requested == "kvm" and verdict.accel != "kvm":
        raise UnsupportedEngineError(
            f"accel='kvm' was requested but {verdict.reason}",
            hint="Use accel='auto' or 'tcg' (software emulation, slower), or fix KVM on this host.",
        )
    return verdict
