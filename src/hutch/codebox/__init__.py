"""``hutch.CodeBox``: a box for running Python code, with packages installed from the host.

``async with CodeBox() as box: (await box.run("print(6 * 7)")).stdout == "42\\n"``.

Code runs with the guest's ``python3``: up to :data:`INLINE_LIMIT` bytes as ``python3 -c CODE``;
larger code (or code the command line cannot carry, with a NUL byte) is first written into a fresh
private folder in the guest (``/tmp/hutch-code-XXXXXXXX/main.py``, by ``sh`` reading it from
stdin) and run as ``python3 /tmp/hutch-code-…/main.py``; the folder is removed afterwards. Either
way the caller's ``stdin`` reaches the program.

:meth:`CodeBox.install` works without network in the guest: the host's pip downloads wheels for
the guest's interpreter (:mod:`hutch.codebox.wheels`) and a small installer run by the guest's
python3 (:mod:`hutch.codebox.installer`) unpacks them there. :func:`install_into` does the same
for any running :class:`~hutch.Box` whose image has a CPython ``python3``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from hutch.box import DEFAULT_BOOT_TIMEOUT, Box
from hutch.errors import BadRequestError, HutchError, TimeoutError
from hutch.execution import ExecResult
from hutch.runtime.options import BoxOptions

from . import wheels
from .wheels import DEFAULT_INSTALL_TIMEOUT, PythonTarget

#: Code up to this many bytes (UTF-8) is passed as ``python3 -c CODE``; larger goes via a file.
INLINE_LIMIT = 64 * 1024
#: Deadline for writing large code into the guest and for the guest's Python probe.
HELPER_TIMEOUT = 60.0


class CodeBox(Box):
    """A :class:`~hutch.Box` for Python code: ``run()``, ``run_file()``, ``install()``.

    Same arguments as :class:`~hutch.Box`; the image defaults to the built-in ``debian-python``
    (any image with ``python3`` and ``sh`` works).
    """

    def __init__(
        self,
        image: str = "debian-python",
        *,
        cpus: int = 1,
        memory_mib: int = 256,
        accel: str = "auto",
        name: str | None = None,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
        home: Path | str | None = None,
        kernel_args: Sequence[str] = (),
        disk_size_mib: int | None = None,
        id: str | None = None,
        _options: BoxOptions | None = None,
    ) -> None:
        super().__init__(
            image,
            cpus=cpus,
            memory_mib=memory_mib,
            accel=accel,
            name=name,
            boot_timeout=boot_timeout,
            home=home,
            kernel_args=kernel_args,
            disk_size_mib=disk_size_mib,
            id=id,
            _options=_options,
        )

    # --- running code ----------------------------------------------------------------------
    async def run(
        self,
        code: str,
        *,
        stdin: bytes | str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        """Run Python ``code`` in the guest and return its :class:`~hutch.ExecResult`.

        A non-zero exit (an uncaught exception: its traceback is in ``stderr``) is returned, not
        raised: call ``assert_success()`` for that. ``timeout`` kills the program and raises
        :class:`~hutch.TimeoutError`.
        """
        if not isinstance(code, str):
            raise BadRequestError(f"code must be a str, not {type(code).__name__}")
        try:
            data = code.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadRequestError(f"code is not valid Unicode text: {e}") from None
        if len(data) <= INLINE_LIMIT and "\0" not in code:
            return await self.exec(
                "python3", "-c", code, stdin=stdin, env=env, cwd=cwd, timeout=timeout
            )
        return await self._run_via_file(
            data, "main.py", stdin=stdin, env=env, cwd=cwd, timeout=timeout
        )

    async def run_file(
        self,
        host_path: str | os.PathLike[str],
        *,
        stdin: bytes | str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        """Copy the host's Python file ``host_path`` into the guest and run it there (tracebacks
        name it by its file name)."""
        path = Path(host_path)
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except OSError as e:
            raise BadRequestError(f"cannot read {path}: {e.strerror or e}") from None
        name = path.name if path.name.endswith(".py") else "main.py"
        return await self._run_via_file(data, name, stdin=stdin, env=env, cwd=cwd, timeout=timeout)

    async def _run_via_file(
        self,
        data: bytes,
        name: str,
        *,
        stdin: bytes | str | None,
        env: Mapping[str, str] | None,
        cwd: str | None,
        timeout: float | None,
    ) -> ExecResult:
        folder = f"/tmp/hutch-code-{secrets.token_hex(4)}"
        script = f"{folder}/{name}"
        # mkdir (not -p) fails if the folder exists: nobody can have planted it for us.
        write = await self.exec(
            "sh",
            "-c",
            'umask 077 && mkdir "$1" && cat > "$2"',
            "sh",
            folder,
            script,
            stdin=data,
            timeout=HELPER_TIMEOUT,
        )
        try:
            write.assert_success()
            return await self.exec(
                "python3", script, stdin=stdin, env=env, cwd=cwd, timeout=timeout
            )
        finally:
            with contextlib.suppress(HutchError):
                await self.exec("rm", "-rf", folder, timeout=HELPER_TIMEOUT)

    # --- packages ---------------------------------------------------------------------------
    async def python_target(self) -> PythonTarget:
        """The guest's Python (version, platform, install folders), asked once and cached."""
        return await python_target(self)

    async def install(
        self, *packages: str | os.PathLike[str], timeout: float = DEFAULT_INSTALL_TIMEOUT
    ) -> list[str]:
        """Install Python packages into the guest and return the installed distribution names.

        Each package is a requirement (``"six"``, ``"requests>=2"``) or a local ``.whl`` file.
        Requirements are resolved and downloaded as wheels, with their dependencies, by the
        **host's** pip for the guest's Python and platform; local wheels are copied as they are
        (their dependencies are not resolved). The guest needs no network, but every package must
        exist as a wheel for it (pure-Python or manylinux): source-only packages cannot be
        installed. Errors: :class:`~hutch.BadRequestError` (no wheel, unknown package, with pip's
        messages), :class:`~hutch.NetworkError`, :class:`~hutch.SetupError` (no pip on the host),
        :class:`~hutch.TimeoutError` (``timeout`` seconds for the whole install),
        :class:`~hutch.ExecutionError` (the guest's installer refused a wheel or failed).
        """
        return await install_into(self, packages, timeout=timeout)

    async def install_package(
        self, package: str | os.PathLike[str], *, timeout: float = DEFAULT_INSTALL_TIMEOUT
    ) -> list[str]:
        """``install(package)``."""
        return await self.install(package, timeout=timeout)

    async def install_packages(
        self, *packages: str | os.PathLike[str], timeout: float = DEFAULT_INSTALL_TIMEOUT
    ) -> list[str]:
        """``install(*packages)``."""
        return await self.install(*packages, timeout=timeout)


_TARGETS: weakref.WeakKeyDictionary[Box, PythonTarget] = weakref.WeakKeyDictionary()


async def python_target(box: Box) -> PythonTarget:
    """The Python of ``box``'s guest (version, platform, install folders); probed once per box."""
    target = _TARGETS.get(box)
    if target is None:
        r = await box.exec("python3", "-c", wheels.PROBE_SCRIPT, timeout=HELPER_TIMEOUT)
        if r.exit_code != 0:
            raise BadRequestError(
                f"the guest's python3 does not run: {r.stderr.strip()[-300:]}",
                hint=f"Installing packages needs python3 on the image's PATH; {box.image!r} "
                "has none.",
            )
        target = _TARGETS[box] = PythonTarget.from_probe(r.stdout)
    return target


async def install_into(
    box: Box,
    packages: Iterable[str | os.PathLike[str]],
    *,
    timeout: float = DEFAULT_INSTALL_TIMEOUT,
) -> list[str]:
    """:meth:`CodeBox.install` for any running box whose image has a CPython ``python3``."""
    requirements, local = wheels.split_packages(packages)
    target = await python_target(box)
    if target.implementation != "cpython":
        raise BadRequestError(
            f"install supports CPython guests, not {target.implementation}",
            hint="Use an image whose python3 is CPython (e.g. debian-python).",
        )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    tmp = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="hutch-wheels-"))
    try:
        files: list[Path] = []
        if requirements:
            download_dir = tmp / "download"
            download_dir.mkdir()
            files += await wheels.download(requirements, download_dir, target, timeout=timeout)
        files += local  # local wheels win over downloaded files of the same name
        tar = await asyncio.to_thread(wheels.wheel_tar, files, tmp / "wheels.tar")
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError(f"install did not finish within {timeout:g} s")
        result = await _run_installer(box, tar, target, remaining)
    finally:
        await asyncio.to_thread(shutil.rmtree, tmp, True)
    result.assert_success()
    return wheels.parse_installed(result.stdout)


async def _run_installer(box: Box, tar: Path, target: PythonTarget, timeout: float) -> ExecResult:
    """Stream ``tar`` into the guest's installer (chunk by chunk, as credit allows)."""
    paths = target.installer_paths()
    execution = await box.spawn(
        target.executable, "-c", wheels.installer_source(), paths, timeout=timeout
    )

    async def feed() -> None:
        with tar.open("rb") as f:
            while chunk := await asyncio.to_thread(f.read, 1 << 20):
                await execution.stdin.write(chunk)
        await execution.stdin.close()

    feeder = asyncio.get_running_loop().create_task(feed())
    try:
        result = await execution.wait()
    finally:
        if not feeder.done():
            feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError, HutchError):
            await feeder
    # The installer's source is not worth repeating in every error message.
    command = [target.executable, "-c", "<hutch wheel installer>", paths]
    return dataclasses.replace(result, command=command)


__all__ = ["INLINE_LIMIT", "CodeBox", "PythonTarget", "install_into", "python_target"]
