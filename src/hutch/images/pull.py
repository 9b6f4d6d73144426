"""From a reference (or an archive's parts) to a stored image with a base disk.

``pull``: resolve the reference at its registry → if the store already has that config digest with
a base disk, only (re)tag it (no blob I/O) → else fetch the config, download the missing layers
into the blob cache concurrently (resumable, digest-checked) → build the base ext4 from the layers
(:mod:`hutch.images.rootfs`, in a thread: it is a fakeroot subprocess) → register it.

``install_image`` is the shared tail used by pulls, archive loads and built-ins. A per-image flock
makes concurrent pulls of the same image build its base disk once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from hutch.config import ImagesConfig
from hutch.errors import ImageError, NetworkError
from hutch.images.blobs import storage_error
from hutch.images.oci import (
    MAX_CONFIG_BYTES,
    Descriptor,
    ImageConfig,
    Manifest,
    Platform,
    verify_bytes,
)
from hutch.images.reference import ImageReference
from hutch.images.store import ImageRecord, ImageStore, LayerRecord
from hutch.paths import HutchPaths
from hutch.vm.disk import ensure_overlay_template

if TYPE_CHECKING:
    from hutch.images.credentials import RegistrySettings

log = logging.getLogger("hutch.images")

#: Bump when the way base disks are built changes (it is stored in each record).
BASE_RECIPE = "hutch-base-1"


@dataclass(frozen=True)
class PullEvent:
    """Progress of a pull or load: a status line, or bytes of one layer."""

    kind: str  # "status" | "layer"
    message: str = ""
    digest: str | None = None
    done: int = 0
    total: int = 0


ProgressCallback = Callable[[PullEvent], None]


def _quiet(_: PullEvent) -> None:
    pass


@contextlib.contextmanager
def _image_lock(store: ImageStore, image_id: str) -> Iterator[None]:
    """Serialise builders of one image's base disk (across processes)."""
    store.records.mkdir(parents=True, exist_ok=True)
    lock = store.records / f".{image_id.split(':', 1)[1]}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise storage_error(lock, e, "opening") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            lock.unlink()


def install_image(
    store: ImageStore,
    *,
    config_bytes: bytes,
    config_digest: str,
    layers: Sequence[tuple[Descriptor, Path]],
    references: Sequence[str],
    source: str,
    progress: ProgressCallback = _quiet,
    manifest_digest: str | None = None,
    index_digest: str | None = None,
    base_size: int | None = None,
) -> ImageRecord:
    """Build the base disk of an image whose blobs are on disk and register it (blocking)."""
    from hutch.images.rootfs import LayerInput, build_base_disk

    config = ImageConfig.parse(config_bytes)
    if len(config.diff_ids) != len(layers):
        raise ImageError(
            f"image config lists {len(config.diff_ids)} layer diff_ids but the manifest has "
            f"{len(layers)} layers",
            hint="The image is malformed; rebuild or re-push it.",
        )
    if base_size is None:
        base_size = ImagesConfig.load(store.paths).base_size
    record = ImageRecord(
        id=config_digest,
        references=tuple(references),
        source=source,
        platform=f"{config.os}/{config.architecture}",
        base="",
        base_size=base_size,
        config=config,
        layers=tuple(
            LayerRecord(d.digest, d.media_type, d.size, diff)
            for (d, _), diff in zip(layers, config.diff_ids, strict=True)
        ),
        manifest_digest=manifest_digest,
        index_digest=index_digest,
        recipe=BASE_RECIPE,
    )
    with _image_lock(store, config_digest):
        existing = store.get(config_digest)
        if existing is not None and existing.base_path.is_file():
            with store.locked():
                return store.add(record, base_file=None)
        out = store.records / f".base-{config_digest.split(':', 1)[1][:16]}-{os.getpid()}.ext4"
        t0 = time.monotonic()

        def status(msg: str) -> None:
            progress(PullEvent("status", msg))

        try:
            info = build_base_disk(
                [
                    LayerInput(p, d.media_type, diff, d.digest)
                    for (d, p), diff in zip(layers, config.diff_ids, strict=True)
                ],
                out,
                size_bytes=base_size,
                progress=status,
                scratch=store.paths.build,
            )
            status(f"base disk built in {time.monotonic() - t0:.1f} s")
            record = replace(record, allocated=info.allocated)
            with store.locked():
                record = store.add(record, base_file=out, files={"config.json": config_bytes})
            ensure_overlay_template(record.base_path)  # per-box overlays become a file copy
            return record
        finally:
            out.unlink(missing_ok=True)


async def pull(
    reference: str,
    *,
    paths: HutchPaths | None = None,
    platform: Platform | str | None = None,
    progress: ProgressCallback = _quiet,
    store: ImageStore | None = None,
) -> ImageRecord:
    """Pull ``reference`` from its registry into the local store; returns the stored image."""
    from hutch.images.credentials import RegistrySettings

    paths = paths or HutchPaths.default()
    store = store or ImageStore(paths)
    ref = ImageReference.parse(reference)
    want = Platform.parse(platform) if isinstance(platform, str) else platform or Platform.host()
    settings = RegistrySettings.load(paths)
    progress(PullEvent("status", f"resolving {ref.familiar()} at {ref.api_host}"))
    try:
        return await _pull(ref, want, store, settings, progress)
    except NetworkError as e:  # after the client's retries: the pull as a whole failed
        raise ImageError(
            f"pulling {ref.familiar()} failed: {e.message}",
            hint=(e.hint + " " if e.hint else "")
            + "Downloaded data is kept: pulling again resumes where this one stopped.",
        ) from e


async def _pull(
    ref: ImageReference,
    want: Platform,
    store: ImageStore,
    settings: RegistrySettings,
    progress: ProgressCallback,
) -> ImageRecord:
    from hutch.images.registry import RegistryClient

    async with RegistryClient(settings) as client:
        resolved = await client.resolve(ref, want)
        manifest: Manifest = resolved.manifest
        config_digest = manifest.config.digest
        names = [str(ref)]  # a digest-only pull keeps NAME@DIGEST as its name
        existing = store.get(config_digest)
        if existing is not None and existing.base_path.is_file():
            progress(PullEvent("status", f"{ref.familiar()} is up to date ({existing.short_id})"))
            with store.locked():
                return store.add(replace(existing, references=tuple(names)), base_file=None)
        config_bytes = store.blobs.read_bytes(config_digest, MAX_CONFIG_BYTES)
        if config_bytes is None:
            config_bytes = await client.fetch_blob_bytes(ref, manifest.config, MAX_CONFIG_BYTES)
            verify_bytes(config_bytes, config_digest, "image config")
            store.blobs.put_bytes(config_bytes, config_digest)
        ImageConfig.parse(config_bytes)  # reject a bad config before downloading gigabytes
        total = sum(d.size for d in manifest.layers)
        progress(
            PullEvent(
                "status",
                f"{len(manifest.layers)} layer(s), {total / 1e6:.1f} MB, platform {resolved.platform}",
            )
        )

        async def fetch(desc: Descriptor) -> Path:
            async with store.blobs.slot(desc.digest) as slot:
                if slot.present:
                    store.blobs.get(desc.digest)
                    progress(PullEvent("layer", "cached", desc.digest, desc.size, desc.size))
                    return slot.final

                def on_bytes(done: int, size: int) -> None:
                    progress(PullEvent("layer", "downloading", desc.digest, done, size))

                progress(PullEvent("layer", "waiting", desc.digest, 0, desc.size))
                await client.download_blob(ref, desc, slot.partial, on_bytes)
                path = store.blobs.commit(slot)
                progress(PullEvent("layer", "done", desc.digest, desc.size, desc.size))
                return path

        tasks = [asyncio.create_task(fetch(d)) for d in manifest.layers]
        try:
            blob_paths = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
    progress(PullEvent("status", "building the base disk"))
    record = await asyncio.to_thread(
        install_image,
        store,
        config_bytes=config_bytes,
        config_digest=config_digest,
        layers=list(zip(manifest.layers, blob_paths, strict=True)),
        references=names,
        source=f"registry {ref.api_host}",
        progress=progress,
        manifest_digest=resolved.manifest_digest,
        index_digest=resolved.index_digest,
    )
    store.blobs.prune(keep={d.digest for d in manifest.layers} | {config_digest})
    return record


async def ensure_image(
    name: str,
    *,
    paths: HutchPaths,
    progress: ProgressCallback = _quiet,
) -> ImageRecord:
    """The stored image for ``name``, pulling it first when it is not here (like ``docker run``)."""
    store = ImageStore(paths)
    rec = await asyncio.to_thread(store.lookup, name)
    if rec is not None and rec.base_path.is_file():
        return rec
    ref = str(ImageReference.parse(name))
    from hutch.images import debian

    if ref == debian.REFERENCE:  # a built-in made on first use, not pulled
        log.info("building the built-in %s image (first use)", debian.NAME)
        return await asyncio.to_thread(
            debian.build_debian_python, paths, progress=progress, store=store
        )
    if ref == "docker.io/library/busybox:latest" and (paths.artifacts / "manifest.json").exists():
        from hutch.images.builtin import ensure_busybox_image, register_busybox

        base = await asyncio.to_thread(ensure_busybox_image, paths, lambda _: None)
        await asyncio.to_thread(register_busybox, paths, base)
        if (rec := await asyncio.to_thread(store.lookup, name)) is not None:
            return rec
    log.info("image %s is not in the local store; pulling it", name)
    return await pull(name, paths=paths, progress=progress, store=store)


__all__ = [
    "BASE_RECIPE",
    "ProgressCallback",
    "PullEvent",
    "ensure_image",
    "install_image",
    "pull",
]
