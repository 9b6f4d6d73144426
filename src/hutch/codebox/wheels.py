"""The host side of :meth:`hutch.CodeBox.install`: wheels for the guest's Python, by the host's pip.

The guest has no network (and the ``debian-python`` image no pip), so the host does the resolving
and downloading: ``python -m pip download --only-binary=:all:`` with the guest's interpreter
version, ABI and platform tags (:func:`pip_download_command`), into a temporary folder. Local
``.whl`` files are taken as they are (no dependency resolution). :func:`wheel_tar` packs the files
into a tar that :mod:`hutch.codebox.installer` unpacks and installs in the guest; the host itself
never extracts a wheel.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import os
import signal
import sys
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from hutch.errors import BadRequestError, HutchError, NetworkError, SetupError, TimeoutError

#: Deadline of one ``CodeBox.install`` (the host's pip download and the guest's installer).
DEFAULT_INSTALL_TIMEOUT = 600.0
#: How many lines of pip's stderr an error carries.
STDERR_TAIL_LINES = 15
#: glibc of the ``debian-python`` image (bookworm), used when the guest does not say.
DEFAULT_GLIBC = (2, 36)

#: Run by the guest's python3 once per box: its version, folders and platform, as JSON.
PROBE_SCRIPT = """\
import json, platform, sys, sysconfig
p = sysconfig.get_paths()
libc, libc_version = platform.libc_ver()
print(json.dumps({
    "implementation": sys.implementation.name,
    "version": "%d.%d" % sys.version_info[:2],
    "executable": sys.executable,
    "machine": platform.machine(),
    "libc": libc,
    "libc_version": libc_version,
    "paths": {k: p[k] for k in ("purelib", "platlib", "scripts", "data", "include")},
}))
"""

_NETWORK_MARKERS = (
    "NewConnectionError",
    "Max retries exceeded",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "Connection refused",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "SSLError",
    "ProxyError",
)


@dataclass(frozen=True)
class PythonTarget:
    """The guest's Python, as :data:`PROBE_SCRIPT` reports it (cached on the box)."""

    version: str  # "3.11"
    executable: str = "/usr/bin/python3"
    machine: str = "x86_64"
    implementation: str = "cpython"
    #: glibc version, or None when the guest's C library is not glibc (e.g. musl).
    glibc: tuple[int, int] | None = DEFAULT_GLIBC
    paths: dict[str, str] = field(default_factory=dict)

    @property
    def abi(self) -> str:
        """The CPython ABI tag, e.g. ``cp311``."""
        return "cp" + self.version.replace(".", "")

    @classmethod
    def from_probe(cls, text: str) -> PythonTarget:
        """Parse :data:`PROBE_SCRIPT`'s output (the last line of ``text``)."""
        try:
            raw = json.loads(text.strip().splitlines()[-1])
            major, minor = (int(x) for x in str(raw["version"]).split("."))
            paths = {str(k): str(v) for k, v in dict(raw["paths"]).items()}
            glibc: tuple[int, int] | None = None
            if raw.get("libc") == "glibc" and raw.get("libc_version"):
                g_major, g_minor = str(raw["libc_version"]).split(".")[:2]
                glibc = (int(g_major), int(g_minor))
            target = cls(
                version=f"{major}.{minor}",
                executable=str(raw["executable"]) or "/usr/bin/python3",
                machine=str(raw["machine"]),
                implementation=str(raw["implementation"]),
                glibc=glibc,
                paths=paths,
            )
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise BadRequestError(
                f"could not read the guest's Python configuration ({e}): {text[-300:]!r}",
                hint="The image needs a working python3 on its PATH.",
            ) from None
        missing = [k for k in ("purelib", "scripts", "data", "include") if not paths.get(k)]
        if missing:
            raise BadRequestError(f"the guest's Python names no folder for {missing}")
        return target

    def installer_paths(self) -> str:
        """PATHS_JSON for :mod:`hutch.codebox.installer`."""
        keys = ("purelib", "scripts", "data", "include")
        return json.dumps({**{k: self.paths[k] for k in keys}, "executable": self.executable})

    def describe(self) -> str:
        libc = f"glibc {self.glibc[0]}.{self.glibc[1]}" if self.glibc else "non-glibc"
        return f"Linux {self.machine} ({libc}) / CPython {self.version}"


def platform_tags(
    machine: str = "x86_64", glibc: tuple[int, int] | None = DEFAULT_GLIBC
) -> list[str]:
    """The ``--platform`` values for a Linux guest, best first.

    pip expands only the legacy ``manylinux2014``/``manylinux2010`` aliases itself, so every
    ``manylinux_2_N`` from the guest's glibc down to 2.17 is listed, then the legacy names the
    architecture has (``manylinux2014`` = 2.17, ``manylinux2010`` = 2.12, ``manylinux1`` = 2.5),
    then plain ``linux_<machine>``. Pure-Python (``py3-none-any``) wheels always match.
    """
    tags: list[str] = []
    if glibc is not None and glibc[0] == 2:
        tags += [f"manylinux_2_{minor}_{machine}" for minor in range(glibc[1], 16, -1)]
        legacy = [("manylinux2014", 17)]
        if machine in ("x86_64", "i686"):
            legacy += [("manylinux2010", 12), ("manylinux1", 5)]
        tags += [f"{name}_{machine}" for name, needs in legacy if glibc[1] >= needs]
    tags.append(f"linux_{machine}")
    return tags


def split_packages(packages: Iterable[str | os.PathLike[str]]) -> tuple[list[str], list[Path]]:
    """Separate requirement strings (for pip) from local wheel files (copied in as they are)."""
    requirements: list[str] = []
    wheels: list[Path] = []
    for p in packages:
        if isinstance(p, os.PathLike) or (isinstance(p, str) and p.strip().endswith(".whl")):
            path = Path(os.fspath(p).strip()).expanduser()
            if not path.is_file():
                raise BadRequestError(
                    f"no such wheel file: {path}",
                    hint="Pass an existing .whl file, or a requirement such as 'six==1.16.0'.",
                )
            wheels.append(path.absolute())
            continue
        if not isinstance(p, str):
            raise BadRequestError(f"a package must be a string or a path, not {p!r}")
        req = p.strip()
        if not req or req.startswith("-") or any(c in req for c in "\0\r\n"):
            raise BadRequestError(
                f"invalid package {p!r}",
                hint="Pass requirement strings such as 'six' or 'requests>=2'; pip options are "
                "not accepted.",
            )
        requirements.append(req)
    if not requirements and not wheels:
        raise BadRequestError("no packages given", hint="e.g. await box.install('six')")
    return requirements, wheels


def pip_download_command(
    requirements: Sequence[str], dest: Path, target: PythonTarget, *, python: str | None = None
) -> list[str]:
    """The host's ``pip download`` of wheels for ``target`` (never source distributions)."""
    cmd = [python or sys.executable, "-m", "pip", "download", "--only-binary=:all:"]
    for tag in platform_tags(target.machine, target.glibc):
        cmd += ["--platform", tag]
    cmd += [
        "--python-version",
        target.version,
        "--implementation",
        "cp",
        "--abi",
        target.abi,
        "-d",
        str(dest),
        "--disable-pip-version-check",
        "--no-input",
        "-q",
        "--",
        *requirements,
    ]
    return cmd


def _tail(stderr: str) -> str:
    return "\n".join(stderr.strip().splitlines()[-STDERR_TAIL_LINES:])


def pip_error(
    returncode: int, stderr: str, requirements: Sequence[str], target: PythonTarget
) -> HutchError:
    """The typed error for a failed ``pip download``."""
    tail = _tail(stderr)
    what = " ".join(requirements)
    if "No module named pip" in stderr:
        return SetupError(
            f"pip is not installed for the host's Python ({sys.executable})",
            hint="CodeBox.install downloads wheels with the host's pip: install it "
            f"({sys.executable} -m ensurepip, or apt-get install python3-pip).",
        )
    needs = (
        f"install needs wheels for {target.describe()}; packages published only as source "
        "distributions cannot be installed (the guest has no network and no compiler)."
    )
    if any(m in stderr for m in _NETWORK_MARKERS):
        return NetworkError(
            f"pip could not reach the package index for {what}:\n{tail}",
            hint="Check the host's network or proxy settings (pip runs on the host; the guest "
            "needs no network).",
        )
    return BadRequestError(
        f"pip download failed for {what} (exit {returncode}):\n{tail}",
        hint=f"{needs} Check the names and versions on the index, or pass a local .whl file.",
    )


async def download(
    requirements: Sequence[str],
    dest: Path,
    target: PythonTarget,
    *,
    timeout: float = DEFAULT_INSTALL_TIMEOUT,
    python: str | None = None,
) -> list[Path]:
    """Download wheels for ``requirements`` (and their dependencies) into ``dest`` with the pip
    of ``python`` (default: the interpreter hutch runs under), within ``timeout`` seconds."""
    cmd = pip_download_command(requirements, dest, target, python=python)
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as e:
        raise SetupError(f"could not run the host's pip ({cmd[0]}): {e}") from None
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    except builtins.TimeoutError:
        raise TimeoutError(
            f"pip download of {' '.join(requirements)} did not finish within {timeout:g} s",
            hint="Pass a larger timeout= to install(), or check the host's network.",
        ) from None
    finally:
        if proc.returncode is None:  # timed out or cancelled: end pip and what it started
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise pip_error(proc.returncode or 1, err.decode("utf-8", "replace"), requirements, target)
    return sorted(p for p in dest.iterdir() if p.is_file() and p.name.endswith(".whl"))


def wheel_tar(wheels: Iterable[Path], out: Path) -> Path:
    """Pack ``wheels`` into the tar file ``out`` (one member per file name; later ones win)."""
    by_name = {w.name: w for w in wheels}
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, path in sorted(by_name.items()):
            info = tarfile.TarInfo(name)
            info.size = path.stat().st_size
            info.mode = 0o644
            with path.open("rb") as f:
                tar.addfile(info, f)
    return out


def installer_source() -> str:
    """The source of :mod:`hutch.codebox.installer`, which the guest's python3 runs."""
    return resources.files("hutch.codebox").joinpath("installer.py").read_text(encoding="utf-8")


def parse_installed(stdout: str) -> list[str]:
    """The distribution names from the installer's last stdout line."""
    for line in reversed(stdout.strip().splitlines()):
        with contextlib.suppress(ValueError):
            data = json.loads(line)
            if isinstance(data, dict) and isinstance(data.get("installed"), list):
                return [str(n) for n in data["installed"]]
    return []
