"""Build hutch's guest kernel: a minimal, all-built-in ``vmlinux`` from ``linux-source-6.1``.

Recipe (field notes §2): extract the source tarball into ``HOME/build/linux-<version>``
(kept for fast incremental rebuilds), apply ``lapic-timer-period.patch``, ``make tinyconfig``,
merge ``microvm.config``, ``make olddefconfig``, check that the fragment survived, ``make vmlinux``.
The result is an uncompressed ELF ``vmlinux`` with a PVH entry note, which QEMU's ``microvm``
machine boots directly with ``-kernel`` (no bzImage decompression, no firmware).

The artifact ``kernel-<key>`` holds ``vmlinux``, ``config`` (the final .config) and ``info.json``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from hutch.artifacts import ProgressFn, build_cached, hash_inputs
from hutch.errors import SetupError
from hutch.paths import HutchPaths

#: Bump whenever the build steps below change in a way that changes the output.
RECIPE_VERSION = "hutch-kernel-recipe-1"

SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
ARCH = "x86_64"

_HERE = Path(__file__).resolve().parent
FRAGMENT = _HERE / "microvm.config"
PATCH = _HERE / "lapic-timer-period.patch"


def _fragment_hz() -> int:
    """The kernel's tick rate, read from the fragment (``CONFIG_HZ_<n>=y``) so the two cannot
    disagree."""
    m = re.search(r"^CONFIG_HZ_(\d+)=y$", FRAGMENT.read_text(), re.M)
    if m is None:
        raise SetupError(f"{FRAGMENT} must select a tick rate (a CONFIG_HZ_<n>=y line)")
    return int(m.group(1))


HZ = _fragment_hz()
#: QEMU's emulated local APIC (TCG, and KVM's in-kernel one) counts at 1 GHz, so one jiffy is
#: 10^9 / HZ bus clocks. Used by the ``lapic_timer_period=`` patch; a wrong value would make every
#: kernel timer fire early or late.
LAPIC_TIMER_PERIOD = 1_000_000_000 // HZ

#: Parameters that keep a TCG boot fast and robust (field notes §2). ``tsc_early_khz`` is added by
#: :func:`kernel_cmdline` from the host's TSC frequency.
#:  - ``console=ttyS0 quiet``: the ISA UART is the console; quiet keeps the emulated UART (slow,
#:    one exit per byte) from dominating boot time.
#:  - ``reboot=t panic=-1``: reboot via triple fault; with QEMU ``-no-reboot`` a guest ``reboot -f``
#:    or a panic makes QEMU exit (there is no ACPI power-off on ``microvm,acpi=off``).
#:  - ``tsc=reliable``: no clocksource watchdog (it drops to jiffies under host load).
#:  - ``no_timer_check``: skip the IO-APIC timer check that sporadically panics under TCG.
#:  - ``lapic_timer_period=``: skip the ~0.25 s local-APIC timer calibration (our patch).
KERNEL_CMDLINE_BASE: tuple[str, ...] = (
    "console=ttyS0",
    "reboot=t",
    "panic=-1",
    "quiet",
    "tsc=reliable",
    "no_timer_check",
    f"lapic_timer_period={LAPIC_TIMER_PERIOD}",
)

_BUILD_HINT = (
    "The full build log is at {log}. Make sure the build tools are installed: "
    "apt-get install linux-source-6.1 gcc make bc bison flex libelf-dev libssl-dev xz-utils patch; "
    "delete {tree} to force a clean rebuild."
)
_TOOLS = ("tar", "xz", "patch", "make", "gcc", "bc", "bison", "flex", "perl")


# --------------------------------------------------------------------------------------------
# command line


@functools.cache
def host_tsc_khz() -> int | None:
    """The host TSC frequency in kHz, from ``/proc/cpuinfo``'s "cpu MHz" (None if unknown).

    Under TCG the guest's TSC is the host's TSC, so passing this as ``tsc_early_khz`` spares the
    guest its TSC calibration against the emulated PIT (which fails ~1 boot in 10).

    "cpu MHz" is the TSC frequency only where the host kernel has no cpufreq driver (VMs, like
    the machines hutch was measured on). With cpufreq it is the core's *current* clock, which
    would give the guest a wrong clock: then use the nominal "@ x.xxGHz" of the model name
    (Intel; the TSC runs at nominal speed) or nothing (the guest calibrates by itself).
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    if Path("/sys/devices/system/cpu/cpu0/cpufreq").exists():
        m = re.search(r"^model name\s*:.*@\s*([0-9.]+)\s*GHz", text, re.MULTILINE)
        return int(float(m.group(1)) * 1_000_000) if m else None
    m = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", text, re.MULTILINE)
    if not m:
        return None
    khz = int(float(m.group(1)) * 1000)
    return khz if khz > 0 else None


def kernel_cmdline(extra: Sequence[str] = ()) -> str:
    """The guest kernel command line: the TCG-safe base, ``tsc_early_khz``, then *extra*."""
    parts = list(KERNEL_CMDLINE_BASE)
    khz = host_tsc_khz()
    if khz is not None:
        parts.append(f"tsc_early_khz={khz}")
    parts.extend(extra)
    return " ".join(parts)


# --------------------------------------------------------------------------------------------
# key


@functools.cache
def source_version() -> str:
    """The Debian version of the installed ``linux-source-6.1`` package (e.g. ``6.1.192-2``)."""
    try:
        proc = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError as e:
        raise SetupError(
            "dpkg-query not found: cannot tell which kernel source is installed",
            hint="hutch builds its guest kernel from Debian's linux-source-6.1 package.",
        ) from e
    version = proc.stdout.strip()
    if proc.returncode != 0 or not version or not SOURCE_TARBALL.is_file():
        raise SetupError(
            f"the kernel source package {SOURCE_PACKAGE} is not installed "
            f"({SOURCE_TARBALL} missing)",
            hint=f"apt-get install {SOURCE_PACKAGE}",
        )
    return version


def kernel_key() -> str:
    """Content key of the kernel artifact: source version, fragment, patch and recipe.

    The fragment counts by its settings only (in order), so editing its comments keeps the key.
    """
    settings = parse_fragment(FRAGMENT.read_text())
    fragment = "\n".join(f"{k}={'n' if v is None else v}" for k, v in settings.items())
    return hash_inputs([RECIPE_VERSION, ARCH, source_version(), fragment, PATCH])


# --------------------------------------------------------------------------------------------
# build


def ensure_kernel(paths: HutchPaths, progress: ProgressFn) -> Path:
    """Return the path of the guest ``vmlinux``, building it first if it is not cached."""
    key = kernel_key()
    version = source_version()

    def build(out: Path) -> None:
        _Builder(paths, version, progress).build(out)

    return build_cached(paths, "kernel", key, build) / "vmlinux"


class _Builder:
    def __init__(self, paths: HutchPaths, version: str, progress: ProgressFn) -> None:
        self.paths = paths
        self.version = version
        self.progress = progress
        self.tree = paths.build / f"linux-{version}"
        self.log_path = paths.build / "kernel-build.log"
        self._log: IO[str] | None = None

    # -- helpers ----------------------------------------------------------------------------

    def _fail(self, message: str) -> SetupError:
        if self._log is not None:
            self._log.flush()
        tail = ""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
            tail = "\n".join("  " + line for line in lines[-25:])
        except OSError:
            pass
        msg = f"kernel build failed: {message}"
        if tail:
            msg += f"\nlast lines of {self.log_path}:\n{tail}"
        return SetupError(msg, hint=_BUILD_HINT.format(log=self.log_path, tree=self.tree))

    def _run(self, argv: list[str], cwd: Path, what: str) -> None:
        """Run *argv*, appending its output to the build log; SetupError on failure."""
        assert self._log is not None
        self._log.write(f"\n$ {' '.join(argv)}   (in {cwd})\n")
        self._log.flush()
        proc = subprocess.run(
            argv,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            check=False,
            env=self._env(),
        )
        if proc.returncode != 0:
            raise self._fail(f"{what} exited with {proc.returncode}")

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            LC_ALL="C",
            ARCH=ARCH,
            # Reproducible version string (only init/version.o depends on these).
            KBUILD_BUILD_USER="hutch",
            KBUILD_BUILD_HOST="hutch",
            KBUILD_BUILD_TIMESTAMP="1970-01-01",
            KBUILD_BUILD_VERSION="1",  # not the relink count of this tree
        )
        for var in ("CROSS_COMPILE", "KCONFIG_CONFIG", "O", "KBUILD_OUTPUT"):
            env.pop(var, None)
        return env

    # -- steps ------------------------------------------------------------------------------

    def build(self, out: Path) -> None:
        missing = [t for t in _TOOLS if shutil.which(t) is None]
        if missing:
            raise SetupError(
                f"kernel build tools missing: {', '.join(missing)}",
                hint="apt-get install gcc make bc bison flex libelf-dev libssl-dev xz-utils "
                "patch perl",
            )
        self.paths.build.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("w") as log:
            self._log = log
            try:
                self._extract()
                self._patch()
                self._configure()
                self._compile()
                self._collect(out)
            finally:
                self._log = None

    def _extract(self) -> None:
        marker = self.tree / ".hutch-extracted"
        if marker.is_file():
            self.progress(f"kernel: reusing source tree {self.tree}")
            return
        # Other versions' trees are 1.5-2 GB each and useless now.
        for old in self.paths.build.glob("linux-*"):
            if old.is_dir() and old != self.tree:
                shutil.rmtree(old, ignore_errors=True)
        if self.tree.exists():  # a half-extracted tree from an interrupted run
            shutil.rmtree(self.tree)
        self.progress(f"kernel: extracting {SOURCE_TARBALL.name} ({self.version})")
        tmp = Path(tempfile.mkdtemp(prefix=".linux-extract-", dir=self.paths.build))
        try:
            self._run(["tar", "-xJf", str(SOURCE_TARBALL), "-C", str(tmp)], tmp, "tar")
            # The tarball's single top-level folder is "linux-source-6.1", not "linux-<version>".
            tops = [p for p in tmp.iterdir() if p.is_dir()]
            if len(tops) != 1 or not (tops[0] / "Makefile").is_file():
                raise self._fail(f"unexpected layout of {SOURCE_TARBALL}: {tops}")
            os.rename(tops[0], self.tree)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        marker.write_text(self.version + "\n")

    def _patch(self) -> None:
        """Apply the patch once; if a different version of it was applied before, revert that."""
        applied = self.tree / ".hutch-applied.patch"
        want = PATCH.read_bytes()
        if applied.is_file():
            if applied.read_bytes() == want:
                return
            self.progress("kernel: reverting the previously applied patch")
            self._run(["patch", "-p1", "-R", "-f", "-i", str(applied)], self.tree, "patch -R")
            applied.unlink()
        already = subprocess.run(  # applied, but the marker was not written (interrupted run)
            ["patch", "-p1", "-R", "--dry-run", "-s", "-f", "-i", str(PATCH)],
            cwd=self.tree,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        if already.returncode != 0:
            self.progress(f"kernel: applying {PATCH.name}")
            self._run(["patch", "-p1", "-N", "-f", "-i", str(PATCH)], self.tree, "patch")
        applied.write_bytes(want)

    def _configure(self) -> None:
        self.progress("kernel: configuring (tinyconfig + microvm.config)")
        make = ["make", f"ARCH={ARCH}"]
        self._run([*make, "tinyconfig"], self.tree, "make tinyconfig")
        self._run(
            ["sh", "scripts/kconfig/merge_config.sh", "-m", ".config", str(FRAGMENT)],
            self.tree,
            "merge_config.sh",
        )
        self._run([*make, "olddefconfig"], self.tree, "make olddefconfig")
        bad = check_config(
            parse_fragment(FRAGMENT.read_text()), parse_config((self.tree / ".config").read_text())
        )
        if bad:
            assert self._log is not None
            self._log.write("\nconfig options that did not survive olddefconfig:\n")
            self._log.write("".join(f"  {b}\n" for b in bad))
            raise SetupError(
                "kernel config: these options of microvm.config did not survive "
                f"`make olddefconfig` (a dependency is missing): {'; '.join(bad)}",
                hint=f"Add the missing dependencies to {FRAGMENT}; see "
                f"{self.tree}/.config and `make menuconfig` (search with /) for what they "
                "depend on.",
            )

    def _compile(self) -> None:
        assert self._log is not None
        jobs = len(os.sched_getaffinity(0)) or 1
        argv = ["make", f"ARCH={ARCH}", f"-j{jobs}", "vmlinux"]
        self._log.write(f"\n$ {' '.join(argv)}   (in {self.tree})\n")
        self._log.flush()
        self.progress(f"kernel: compiling with {jobs} jobs (a clean build takes minutes)")
        step = re.compile(r"^\s+([A-Z][A-Z0-9_]*)\s+\S")
        compiled = 0
        last = time.monotonic()
        proc = subprocess.Popen(
            argv,
            cwd=self.tree,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self._env(),
            text=True,
            errors="replace",
            bufsize=1,
        )
        assert proc.stdout is not None
        with proc:
            for line in proc.stdout:
                self._log.write(line)
                m = step.match(line)
                if m is None:
                    continue
                if m.group(1) in ("CC", "AS"):
                    compiled += 1
                if m.group(1) == "LD" and line.split()[-1] in (
                    "vmlinux",
                    ".tmp_vmlinux.kallsyms1",
                    "vmlinux.o",
                ):
                    self.progress(f"kernel: linking {line.split()[-1]}")
                    last = time.monotonic()
                elif time.monotonic() - last >= 2.0:
                    last = time.monotonic()
                    self.progress(f"kernel: compiling ({compiled} files)")
        if proc.returncode != 0:
            raise self._fail(f"make vmlinux exited with {proc.returncode}")
        self.progress(f"kernel: built ({compiled} files compiled)")

    def _collect(self, out: Path) -> None:
        vmlinux = self.tree / "vmlinux"
        if not has_pvh_note(vmlinux):
            raise self._fail(f"{vmlinux} has no PVH entry note (is CONFIG_PVH on?)")
        shutil.copyfile(vmlinux, out / "vmlinux")
        shutil.copyfile(self.tree / ".config", out / "config")
        (out / "info.json").write_text(
            json.dumps(
                {
                    "source_package": SOURCE_PACKAGE,
                    "source_version": self.version,
                    "recipe": RECIPE_VERSION,
                    "size": (out / "vmlinux").stat().st_size,
                    "cmdline_base": list(KERNEL_CMDLINE_BASE),
                },
                indent=2,
            )
            + "\n"
        )


# --------------------------------------------------------------------------------------------
# config checking


def parse_fragment(text: str) -> dict[str, str | None]:
    """``CONFIG_X=v`` → ``{"CONFIG_X": "v"}``; ``# CONFIG_X is not set`` → ``{"CONFIG_X": None}``."""
    wanted: dict[str, str | None] = {}
    for raw in text.splitlines():
        line = raw.strip()
        m = re.fullmatch(r"# (CONFIG_\w+) is not set", line)
        if m:
            wanted[m.group(1)] = None
        elif line.startswith("CONFIG_") and "=" in line:
            name, _, value = line.partition("=")
            wanted[name] = value
    return wanted


def parse_config(text: str) -> dict[str, str]:
    """The enabled (set) options of a ``.config``."""
    have: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            name, _, value = line.partition("=")
            have[name] = value
    return have


def check_config(wanted: dict[str, str | None], have: dict[str, str]) -> list[str]:
    """Describe each option of *wanted* whose value in *have* differs (empty list: all good)."""
    bad = []
    for name, value in wanted.items():
        got = have.get(name)
        if value is None:
            if got is not None and got != "n":
                bad.append(f"{name} should be off but is {got}")
        elif got != value:
            bad.append(f"{name}={value} wanted, got {'unset' if got is None else got}")
    return bad


def has_pvh_note(vmlinux: Path) -> bool:
    """True if *vmlinux* is an ELF64 file with a ``Xen`` note of type 18 (PHYS32_ENTRY)."""
    try:
        data = vmlinux.read_bytes()
    except OSError:
        return False
    if data[:5] != b"\x7fELF\x02" or data[5] != 1:  # 64-bit little-endian
        return False
    (e_phoff,) = struct.unpack_from("<Q", data, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(e_phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, e_phoff + i * e_phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
            name = data[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:
                return True
            pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False
