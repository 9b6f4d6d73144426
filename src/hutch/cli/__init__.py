"""The ``hutch`` command line.

Exit codes: a command run in a box passes its own exit status through (128+N when killed by signal
N); a command killed for its ``--timeout`` exits 124 (like ``timeout``); hutch's own failures exit
125 (bad usage 2), like ``docker run``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from hutch import __version__
from hutch.box import Box
from hutch.errors import BadRequestError, HutchError, TimeoutError
from hutch.execution import ExecResult
from hutch.paths import HutchPaths
from hutch.setup import load_manifest, missing_packages, outdated_artifacts, run_setup
from hutch.vm.accel import resolve_accel

EXIT_HUTCH_ERROR = 125
EXIT_TIMEOUT = 124
err_console = Console(stderr=True, soft_wrap=True)  # never break messages mid-line


def _report(e: HutchError) -> None:
    """Print an error and its hint to stderr."""
    # Messages quote user input and option syntax ("[host_ip:]host:guest[/tcp|udp]"): not markup.
    err_console.print(f"[bold red]error:[/] {escape(e.message)}", highlight=False, markup=True)
    if e.hint:
        err_console.print(f"[yellow]hint:[/] {escape(e.hint)}", highlight=False)


def _fail(e: HutchError, code: int = EXIT_HUTCH_ERROR) -> NoReturn:
    _report(e)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hutch")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """hutch: micro-VM sandboxes for Python."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(
        level=level,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)],
    )


@main.command()
@click.option(
    "--kernel", type=click.Path(path_type=Path), help="Use this vmlinux instead of building one."
)
@click.option("--no-install", is_flag=True, help="Never run apt-get; fail if packages are missing.")
@click.option(
    "--debian", is_flag=True, help="Also build the debian-python image now (else on first use)."
)
def setup(kernel: Path | None, no_install: bool, debian: bool) -> None:
    """Install packages and build the guest kernel, agent, initramfs and built-in image (cached)."""
    paths = HutchPaths.default()
    t0 = time.monotonic()
    with err_console.status("hutch setup: checking…") as status:
        last_step, last_at = [""], [0.0]

        def progress(msg: str) -> None:
            status.update(f"hutch setup: {msg}")
            if err_console.is_terminal:
                return
            # Logs (CI): a line per new step, and for long steps one line every 15 s.
            step = msg.split("(")[0]
            now = time.monotonic()
            if step != last_step[0] or now - last_at[0] >= 15:
                last_step[0], last_at[0] = step, now
                err_console.print(f"  {msg}", highlight=False)

        try:
            manifest = run_setup(paths, progress, kernel=kernel, install=not no_install)
            if debian:
                from hutch.images.debian import NAME, build_debian_python
                from hutch.images.store import ImageStore

                if ImageStore(paths).lookup(NAME) is None:
                    build_debian_python(paths, progress=lambda ev: progress(ev.message))
        except HutchError as e:
            status.stop()
            _fail(e)
    err_console.print(
        f"hutch is set up in {paths.home} ({time.monotonic() - t0:.2f} s)\n"
        f"  kernel     {manifest.kernel} ({manifest.kernel_source})\n"
        f"  initramfs  {manifest.initramfs}\n"
        f"  images     {', '.join(manifest.images)}",
        highlight=False,
    )


def _check(rows: list[dict[str, str]], name: str, ok: bool, detail: str, fix: str = "") -> None:
    rows.append(
        {"check": name, "ok": "yes" if ok else "no", "detail": detail, "fix": "" if ok else fix}
    )


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@click.option(
    "--reprobe", is_flag=True, help="Probe KVM again instead of using the cached verdict."
)
def doctor(as_json: bool, reprobe: bool) -> None:
    """Check QEMU, the accelerator, set-up artifacts and disk space; say what to fix."""
    paths = HutchPaths.default()
    rows: list[dict[str, str]] = []
    qemu = shutil.which("qemu-system-x86_64")
    if qemu:
        out = subprocess.run(
            [qemu, "--version"], capture_output=True, text=True, check=False
        ).stdout
        _check(rows, "qemu", True, out.splitlines()[0] if out else qemu)
    else:
        _check(
            rows,
            "qemu",
            False,
            "qemu-system-x86_64 not found",
            "hutch setup (or apt-get install qemu-system-x86)",
        )
    missing = missing_packages()
    _check(
        rows,
        "packages",
        not missing,
        "all installed" if not missing else "missing: " + " ".join(missing),
        "hutch setup (as root) installs them",
    )
    manifest = None
    try:
        manifest = load_manifest(paths)
    except HutchError as e:
        _check(rows, "artifacts", False, e.message, "hutch setup")
    if manifest is not None:
        for label, p in (
            ("kernel", manifest.kernel_path),
            ("initramfs", manifest.initramfs_path),
            ("agent", Path(manifest.agent)),
        ):
            extra = f" ({manifest.kernel_source})" if label == "kernel" else ""
            _check(rows, label, True, f"{p} {p.stat().st_size / 1e6:.1f} MB{extra}")
        for name, img in manifest.images.items():
            _check(rows, f"image {name}", True, img)
        stale = outdated_artifacts(paths, manifest)
        _check(
            rows,
            "up to date",
            not stale,
            "artifacts match this hutch's sources"
            if not stale
            else f"built from older sources: {', '.join(stale)}",
            "hutch setup (rebuilds what changed)",
        )
        try:
            verdict = asyncio.run(
                resolve_accel(
                    "auto", paths, manifest.kernel_path, manifest.initramfs_path, reprobe=reprobe
                )
            )
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(verdict.probed_at))
            _check(
                rows,
                "accelerator",
                True,
                f"{verdict.accel.upper()}: {verdict.reason} (probed {when})",
            )
        except HutchError as e:
            _check(rows, "accelerator", False, e.message, "hutch doctor --reprobe")
    try:
        from hutch.images.store import ImageStore

        store = ImageStore(paths)
        records = store.list()
        used = store.blobs.usage()
        _check(
            rows,
            "image store",
            True,
            f"{len(records)} image(s); blob cache {used / 1e6:.0f} MB of "
            f"{store.blobs.max_bytes / 1e9:.0f} GB",
        )
    except HutchError as e:
        _check(rows, "image store", False, e.message, e.hint or "hutch prune")
    for label, where in (
        ("disk", paths.home if paths.home.exists() else Path.home()),
        ("run dir", paths.run.parent),
    ):
        du = shutil.disk_usage(where)
        free_gib = du.free / 2**30
        _check(
            rows,
            f"{label} space",
            free_gib >= 2,
            f"{free_gib:.1f} GiB free in {where}",
            f"free space in {where} (boxes need disk overlays and RAM files)",
        )
    _check(
        rows,
        "setpriv",
        shutil.which("setpriv") is not None,
        "util-linux setpriv (QEMU dies with its owner)",
        "apt-get install util-linux",
    )
    problems = [r for r in rows if r["ok"] == "no"]
    if as_json:
        click.echo(json.dumps({"ok": not problems, "checks": rows}, indent=2))
    else:
        table = Table(title=f"hutch doctor — {paths.home}")
        for col in ("check", "ok", "detail", "fix"):
            table.add_column(col, overflow="fold")
        for r in rows:
            table.add_row(
                r["check"],
                "[green]✓[/]" if r["ok"] == "yes" else "[red]✗[/]",
                r["detail"],
                r["fix"],
            )
        Console().print(table)
    sys.exit(1 if problems else 0)


def box_io_options(f: Any) -> Any:
    """``-p/--publish``, ``-v/--volume`` and ``--network`` (for ``run`` and ``create``)."""
    f = click.option(
        "--allow",
        "allow",
        multiple=True,
        metavar="CIDR|HOST",
        help="With --network allowlist (implied): a CIDR, host name or *.suffix it may reach.",
    )(f)
    f = click.option(
        "--network",
        type=click.Choice(["none", "outbound", "allowlist"]),
        default=None,
        help="none (default): no network (published ports still work); outbound: user-mode "
        "NAT; allowlist: only what --allow lists, through an HTTP proxy.",
    )(f)
    f = click.option(
        "-v",
        "--volume",
        "volumes",
        multiple=True,
        help="Share a host folder or file: /host/path:/guest/path[:ro].",
    )(f)
    return click.option(
        "-p",
        "--publish",
        "publish",
        multiple=True,
        help="Publish a guest port: [host_ip:]host:guest[/tcp|udp], or guest (a free host port).",
    )(f)


def _box_io(
    publish: Sequence[str],
    volumes: Sequence[str],
    network: str | None,
    allow: Sequence[str] = (),
) -> dict[str, Any]:
    """BoxOptions keywords from the ``box_io_options`` flags (ConfigError for a bad spec)."""
    from hutch.runtime.options import Port, Volume

    return {
        "ports": [Port.parse(p) for p in publish],
        "volumes": [Volume.parse(v) for v in volumes],
        "network": network or ("allowlist" if allow else "none"),
        "allow": list(allow),
    }


def _parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep:
            value = os.environ.get(key, "")
        env[key] = value
    return env


async def _run(
    image: str,
    cmd: list[str],
    env: dict[str, str],
    workdir: str | None,
    user: str | None,
    timeout: float | None,
    interactive: bool,
    cpus: int,
    memory: int,
    accel: str,
    show_boot: bool,
    entrypoint: str | None,
    name: str | None,
    rm: bool,
    io: dict[str, Any] | None = None,
    tty: bool = False,
) -> int:
    from hutch.cli.images import PullDisplay
    from hutch.images.pull import ensure_image
    from hutch.runtime.options import BoxOptions
    from hutch.runtime.runtime import Runtime

    with PullDisplay() as show:  # pulls (with progress) only when the image is not here
        await ensure_image(image, paths=HutchPaths.default(), progress=show)
    remove = rm or name is None  # an unnamed box could only be found again by its id
    options = BoxOptions(
        image=image,
        name=name,
        cpus=cpus,
        memory_mib=memory,
        accel=accel,
        auto_remove=remove,
        **(io or {}),
    )
    async with Runtime() as rt:
        box = await rt.create(options)
        try:
            await box.start()
            for p in box.ports:  # a picked host port is only known now
                err_console.print(
                    f"published {p.host_ip}:{p.host} -> {p.guest}/{p.protocol}", highlight=False
                )
            return await _run_in(
                box,
                image,
                cmd,
                env,
                workdir,
                user,
                timeout,
                interactive,
                show_boot,
                entrypoint,
                tty,
            )
        finally:
            if remove:
                await rt.remove(box.id, force=True)
            else:
                await box.stop()


async def _run_in(
    box: Box,
    image: str,
    cmd: list[str],
    env: dict[str, str],
    workdir: str | None,
    user: str | None,
    timeout: float | None,
    interactive: bool,
    show_boot: bool,
    entrypoint: str | None,
    tty: bool = False,
) -> int:
    from hutch.cli.terminal import attach_terminal, terminal_options

    if show_boot:
        err_console.print(f"[dim]booted {box.id} in {box.boot_ms:.0f} ms ({box.accel})[/]")
    # Like `docker run`: the image's Entrypoint stays and CMD replaces its Cmd;
    # --entrypoint replaces the Entrypoint and drops the image's Cmd.
    config = box.image_record.config if box.image_record else None
    if entrypoint is not None:
        entry, default_cmd = ([entrypoint] if entrypoint else []), []
    else:
        entry = list(config.entrypoint) if config else []
        default_cmd = list(config.cmd) if config else []
    argv = entry + (cmd or default_cmd)
    if not argv:
        raise BadRequestError(
            f"image {image!r} has no default command",
            hint="Give one: hutch run IMAGE -- CMD [ARG...]",
        )
    spawn_args = terminal_options(env) if tty else {"env": env}
    execution = await box.spawn(
        argv, cwd=workdir, user=user, timeout=timeout, stdin=interactive, **spawn_args
    )
    return await (attach_terminal if tty else attach)(execution, interactive)


async def attach(execution: Any, interactive: bool) -> int:
    """Copy a running command's output to ours (and, if ``interactive``, our stdin to it) until
    it ends; its exit status for ours (128+N when killed by signal N). ``execution`` is a
    :class:`hutch.Execution` or a server's ``RemoteExecution`` (the same interface)."""

    async def pump(stream: Any, out: Any) -> None:
        async for chunk in stream:
            try:
                out.write(chunk)
                out.flush()
            except BrokenPipeError:  # our reader went away (`| head`): like SIGPIPE
                await execution.kill()
                raise _ReaderGone() from None
            except OSError as e:
                await execution.kill()
                raise HutchError(f"cannot write the command's output: {e}") from None

    async def feed() -> None:
        # Readiness-driven, not a blocked thread: when the command ends we just cancel this.
        fd = sys.stdin.fileno()
        loop = asyncio.get_running_loop()
        if stat.S_ISREG(os.fstat(fd).st_mode):  # files are always "ready" and never block
            while data := os.read(fd, 65536):
                await execution.stdin.write(data)
        else:
            ready = asyncio.Event()
            loop.add_reader(fd, ready.set)
            try:
                while True:
                    await ready.wait()
                    ready.clear()
                    # The readiness callback may be stale (queued before the last read took
                    # the data): check again, or os.read() would block the whole loop.
                    if not select.select([fd], [], [], 0)[0]:
                        continue
                    if not (data := os.read(fd, 65536)):
                        break
                    await execution.stdin.write(data)
            finally:
                loop.remove_reader(fd)
        await execution.stdin.close()

    feeder = asyncio.create_task(feed()) if interactive else None
    try:
        await asyncio.gather(
            pump(execution.stdout, sys.stdout.buffer), pump(execution.stderr, sys.stderr.buffer)
        )
    except _ReaderGone:
        # Python would complain again when flushing stdout at exit: point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    finally:
        if feeder:
            feeder.cancel()
    result: ExecResult = await execution.wait()
    if result.signal is not None:
        return 128 + result.signal
    return result.exit_code or 0


class _ReaderGone(Exception):
    """Whoever reads our stdout has gone away."""


class _SplitAtDashDash(click.Command):
    """Keeps everything after the first ``--`` away from click: it is the guest command, verbatim."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            i = args.index("--")
            args, ctx.meta["hutch_cmd"] = args[:i], args[i + 1 :]
        return super().parse_args(ctx, args)


@main.command(
    cls=_SplitAtDashDash,
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
@click.option(
    "-e",
    "--env",
    "env",
    multiple=True,
    help="Set an environment variable (K=V, or K to pass ours).",
)
@click.option("-w", "--workdir", help="Working directory in the guest.")
@click.option("-u", "--user", help="User in the guest: name, uid or uid:gid.")
@click.option("-i", "--interactive", is_flag=True, help="Forward our stdin to the command.")
@click.option("-t", "--tty", is_flag=True, help="Run it on a terminal (with -i: interactively).")
@click.option("--timeout", type=float, help="Kill the command after this many seconds.")
@click.option("--cpus", type=int, default=1, show_default=True)
@click.option("--memory", type=int, default=256, show_default=True, help="Guest memory in MiB.")
@click.option(
    "--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto", show_default=True
)
@click.option("--show-boot", is_flag=True, help="Print the boot time to stderr.")
@click.option("--entrypoint", help="Override the image's Entrypoint ('' clears it).")
@click.option("--name", help="Name the box and keep it (stopped) after the command.")
@click.option("--rm", is_flag=True, help="Remove the box afterwards even when it has a name.")
@box_io_options
def run(
    ctx: click.Context,
    args: tuple[str, ...],
    env: tuple[str, ...],
    workdir: str | None,
    user: str | None,
    interactive: bool,
    tty: bool,
    timeout: float | None,
    cpus: int,
    memory: int,
    accel: str,
    show_boot: bool,
    entrypoint: str | None,
    name: str | None,
    rm: bool,
    publish: tuple[str, ...],
    volumes: tuple[str, ...],
    network: str | None,
    allow: tuple[str, ...],
) -> None:
    """Boot a box from IMAGE (default: busybox), run CMD in it, then remove the box — or, with
    --name (and without --rm), keep it stopped, for `hutch start`/`exec` later.

    Without CMD, runs the image's default command (Entrypoint + Cmd); with CMD, the image's
    Entrypoint (if any) is kept and CMD replaces its Cmd, like `docker run`. The image is pulled
    first when it is not in the local store.

    \b
    hutch run -- uname -a
    hutch run busybox -- sh -c 'echo out; echo err >&2; exit 7'
    hutch run debian-python -- python3 -c 'print(6 * 7)'
    hutch run -p 8080:80 -v /srv/www:/www:ro busybox -- httpd -f -p 80 -h /www
    hutch run -it busybox -- sh
    """
    if "hutch_cmd" in ctx.meta:
        image_part, cmd = list(args), list(ctx.meta["hutch_cmd"])
    else:
        image_part, cmd = list(args[:1]), list(args[1:])
    if len(image_part) > 1:
        raise click.UsageError("usage: hutch run [OPTIONS] [IMAGE] [-- CMD [ARG...]]")
    image = image_part[0] if image_part else "busybox"
    try:
        code = asyncio.run(
            _run(
                image,
                cmd,
                _parse_env(env),
                workdir,
                user,
                timeout,
                interactive,
                cpus,
                memory,
                accel,
                show_boot,
                entrypoint,
                name,
                rm,
                _box_io(publish, volumes, network, allow),
                tty,
            )
        )
    except TimeoutError as e:  # the command outlived --timeout: exit 124, like timeout(1)
        _fail(e, EXIT_TIMEOUT)
    except HutchError as e:
        _fail(e)
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


@main.command()
def version() -> None:
    """Print hutch's version."""
    click.echo(__version__)


from hutch.cli import boxes as _boxes  # noqa: E402  (registers the box commands)
from hutch.cli import images as _images  # noqa: E402  (registers the image commands)
from hutch.cli import pools as _pools  # noqa: E402  (registers `hutch pool`)
from hutch.cli import remote as _remote  # noqa: E402  (registers start/stop/exec/stats)
from hutch.cli import serve as _serve  # noqa: E402  (registers `hutch serve`)
from hutch.cli import snapshots as _snapshots  # noqa: E402  (snapshot, snapshots, rmsnap, clone)

__all__ = ["_boxes", "_images", "_pools", "_remote", "_serve", "_snapshots", "err_console", "main"]

if __name__ == "__main__":  # pragma: no cover
    main()
