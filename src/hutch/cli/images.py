"""Image commands: ``hutch pull``, ``images``, ``inspect``, ``rmi``, ``load``, ``prune``."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from types import TracebackType

import click
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from hutch.cli import _fail, _report, err_console, main
from hutch.errors import HutchError, NotFoundError
from hutch.images.oci import Platform
from hutch.images.pull import PullEvent, ensure_image, pull
from hutch.images.reference import ImageReference
from hutch.images.store import ImageRecord, ImageStore
from hutch.paths import HutchPaths


class PullDisplay:
    """Renders :class:`PullEvent`s: a bar per layer on a terminal, plain lines in logs."""

    def __init__(self) -> None:
        self.live = err_console.is_terminal
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=err_console,
            transient=False,
        )
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> PullDisplay:
        if self.live:
            self.progress.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.live:
            self.progress.stop()

    def __call__(self, ev: PullEvent) -> None:
        if ev.kind == "status":
            if self.live:
                self.progress.console.print(f"[dim]{ev.message}[/]", highlight=False)
            else:
                err_console.print(ev.message, highlight=False)
            return
        digest = ev.digest or "?"
        short = digest.split(":", 1)[-1][:12]
        if self.live:
            task = self.tasks.get(digest)
            if task is None:
                task = self.tasks[digest] = self.progress.add_task(short, total=ev.total or None)
            self.progress.update(
                task, completed=ev.done, description=f"{short} {ev.message}", total=ev.total or None
            )
        elif ev.message in ("done", "cached"):
            err_console.print(f"{short}: {ev.message} ({ev.total / 1e6:.1f} MB)", highlight=False)


def _row(rec: ImageRecord) -> list[str]:
    names = [ImageReference.parse(r).familiar() for r in rec.references] or ["<none>"]
    return [
        ", ".join(names),
        rec.short_id,
        rec.source.split(" ")[0],
        f"{rec.allocated / 1e6:.0f} MB",
        time.strftime("%Y-%m-%d %H:%M", time.localtime(rec.added)),
    ]


@main.command("pull")
@click.argument("image")
@click.option("--platform", help="OS/ARCH[/VARIANT] to pull (default: this host's).")
def pull_cmd(image: str, platform: str | None) -> None:
    """Pull IMAGE from its registry and build its base disk."""
    paths = HutchPaths.default()
    try:
        plat = Platform.parse(platform) if platform else None
        with PullDisplay() as show:
            rec = asyncio.run(pull(image, paths=paths, platform=plat, progress=show))
    except HutchError as e:
        _fail(e)
    except KeyboardInterrupt:
        err_console.print("interrupted; a later pull resumes the downloads")
        raise SystemExit(130) from None
    click.echo(f"{ImageReference.parse(image).familiar()} {rec.id}")


@main.command("images")
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Only print image ids.")
def images_cmd(as_json: bool, quiet: bool) -> None:
    """List the images in the local store."""
    try:
        records = ImageStore(HutchPaths.default()).list()
    except HutchError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps([r.to_json() for r in records], indent=2))
        return
    if quiet:
        for r in records:
            click.echo(r.id)
        return
    table = Table(box=None, pad_edge=False)
    for col in ("IMAGE", "ID", "SOURCE", "DISK", "ADDED"):
        table.add_column(col)
    for r in records:
        table.add_row(*_row(r))
    from rich.console import Console

    Console(soft_wrap=True).print(table)


@main.command("inspect")
@click.argument("name")
def inspect_cmd(name: str) -> None:
    """Print a box's record and recent events, or an image's record, as JSON (boxes first)."""
    from hutch.box import store_for
    from hutch.cli.boxes import published_ports

    paths = HutchPaths.default()
    try:
        store = store_for(paths)
        box = store.find(name)
        if box is not None:
            doc = {
                "kind": "box",
                "id": box.id,
                "name": box.name,
                "image": box.image,
                "image_id": box.image_id,
                "state": box.state,
                "failure": box.failure,
                "owner_pid": box.owner_pid,
                "qemu_pid": box.qemu_pid,
                "accel": box.accel,
                "boot_ms": box.boot_ms,
                "created_at": box.created_at,
                "started_at": box.started_at,
                "stopped_at": box.stopped_at,
                "ports": published_ports(box),
                "options": box.options.to_json(),
                "events": [
                    {"at": e.at, "kind": e.kind, "detail": e.detail}
                    for e in store.events(box.id, limit=20)
                ],
            }
        else:
            image = ImageStore(paths).lookup(name)
            if image is None:
                raise NotFoundError(
                    f"no box or image named {name!r}",
                    hint="`hutch ps -a` lists boxes, `hutch images` images.",
                )
            doc = {"kind": "image", **image.to_json()}
    except HutchError as e:
        _fail(e)
    click.echo(json.dumps(doc, indent=2))


@main.command("rmi")
@click.argument("images", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Delete even if boxes still use the image.")
def rmi_cmd(images: tuple[str, ...], force: bool) -> None:
    """Remove IMAGE names; an image is deleted when its last name goes."""
    store = ImageStore(HutchPaths.default())
    failed = False
    for name in images:
        try:
            for line in store.remove(name, force=force):
                click.echo(line)
        except HutchError as e:
            _report(e)
            failed = True
    if failed:
        raise SystemExit(125)


@main.command("load")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-t", "--tag", help="Name the loaded image (default: the archive's own tags).")
@click.option("--platform", help="OS/ARCH[/VARIANT] to take from a multi-platform archive.")
def load_cmd(source: Path, tag: str | None, platform: str | None) -> None:
    """Import a `docker save` tar, an OCI archive or layout, or a root filesystem (tar or folder)."""
    from hutch.images.sources import load

    paths = HutchPaths.default()
    try:
        plat = Platform.parse(platform) if platform else None
        with PullDisplay() as show:
            rec = load(source, store=ImageStore(paths), tag=tag, platform=plat, progress=show)
    except HutchError as e:
        _fail(e)
    names = ", ".join(ImageReference.parse(r).familiar() for r in rec.references)
    click.echo(f"loaded {names} {rec.id}")


@main.command("prune")
def prune_cmd() -> None:
    """Delete images no name points at and no box uses, and the cached layer blobs."""
    try:
        deleted, freed = ImageStore(HutchPaths.default()).prune()
    except HutchError as e:
        _fail(e)
    for d in deleted:
        click.echo(f"deleted: {d}")
    click.echo(f"freed {freed / 1e6:.1f} MB")


def ensure_with_progress(image: str, paths: HutchPaths) -> ImageRecord:
    """Resolve ``image`` locally, pulling (or building a built-in) with progress when missing."""
    with PullDisplay() as show:
        return asyncio.run(ensure_image(image, paths=paths, progress=show))


__all__ = ["PullDisplay", "ensure_with_progress"]
