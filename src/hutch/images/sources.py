"""Local image sources: ``docker save`` tars, OCI archives, OCI layout folders, plain root filesystems.

``load(path)`` recognises the source by its shape:

- a **folder** with an ``oci-layout`` file → OCI image layout; any other folder → a root filesystem
  (packed into one layer with GNU tar, keeping numeric owners, modes, xattrs, devices and links);
- a **tar** holding ``manifest.json`` → ``docker save`` (classic and Docker ≥ 25 OCI-style);
  holding ``oci-layout`` + ``index.json`` → OCI archive; anything else → a root filesystem tarball
  (e.g. the output of ``mmdebstrap``), used as the image's single layer.

Every blob is copied into the blob cache with its digest checked (or computed, for formats that
don't name digests), then the shared :func:`~hutch.images.pull.install_image` builds the base disk.
Archive member names are only ever *looked up*, never extracted to the host, so hostile names in an
archive cannot write anywhere; layer contents go through the safe applier like pulled layers.
"""

from __future__ import annotations

import gzip
import io
import json
import platform as _platform
import re
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from hutch.errors import BadRequestError, ImageError, NotFoundError
from hutch.images.oci import (
    DOCKER_LAYER,
    DOCKER_LAYER_GZIP,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    OCI_LAYER,
    OCI_LAYER_ZSTD,
    Descriptor,
    Index,
    Manifest,
    Platform,
    check_digest,
    load_json,
    media_type_of,
    sha256_digest,
    verify_bytes,
)
from hutch.images.pull import ProgressCallback, PullEvent, install_image
from hutch.images.reference import ImageReference
from hutch.images.store import ImageRecord, ImageStore

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_OCI_REF_NAME = "org.opencontainers.image.ref.name"


def _quiet(_: PullEvent) -> None:
    pass


def rootfs_config(
    diff_id: str, *, cmd: tuple[str, ...] = ("/bin/sh",), env: dict[str, str] | None = None
) -> bytes:
    """An image config for a single-layer root filesystem (canonical JSON: stable digest)."""
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(_platform.machine(), _platform.machine())
    doc = {
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": [f"{k}={v}" for k, v in {"PATH": DEFAULT_PATH, **(env or {})}.items()],
            "Cmd": list(cmd),
            # no WorkingDir: commands start in the user's home, as everywhere in hutch
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _sniff_media_type(head: bytes) -> str:
    if head.startswith(b"\x1f\x8b"):
        return DOCKER_LAYER_GZIP
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return OCI_LAYER_ZSTD
    return DOCKER_LAYER


@dataclass
class _Parts:
    config_bytes: bytes
    config_digest: str
    layers: list[tuple[Descriptor, Path]]
    references: list[str]
    source: str
    manifest_digest: str | None = None


# --- readers: a uniform view of a tar archive or a folder -----------------------------------
class _Reader:
    def names(self) -> set[str]:
        raise NotImplementedError

    def open(self, name: str) -> IO[bytes]:
        raise NotImplementedError

    def size(self, name: str) -> int:
        raise NotImplementedError

    def read(self, name: str, limit: int) -> bytes:
        if self.size(name) > limit:
            raise ImageError(f"{name} in the archive is larger than {limit} bytes")
        with self.open(name) as f:
            return f.read(limit + 1)[:limit]


class _TarReader(_Reader):
    def __init__(self, tf: tarfile.TarFile, label: str) -> None:
        self.tf = tf
        self.label = label
        self._members = {m.name.removeprefix("./"): m for m in tf.getmembers()}

    def names(self) -> set[str]:
        return set(self._members)

    def _member(self, name: str) -> tarfile.TarInfo:
        m = self._members.get(name.removeprefix("./"))
        if m is None:
            raise ImageError(f"{self.label} has no {name}", hint="The archive is incomplete.")
        return m

    def open(self, name: str) -> IO[bytes]:
        f = self.tf.extractfile(self._member(name))  # resolves in-archive links; no host writes
        if f is None:
            raise ImageError(f"{name} in {self.label} is not a regular file")
        return f

    def size(self, name: str) -> int:
        m = self._member(name)
        if m.issym() or m.islnk():
            with self.open(name) as f:
                f.seek(0, io.SEEK_END)
                return f.tell()
        return m.size


class _DirReader(_Reader):
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, name: str) -> Path:
        if name.startswith("/") or ".." in Path(name).parts:
            raise ImageError(f"refusing path {name!r} outside the image folder")
        return self.root / name

    def names(self) -> set[str]:
        return {p.name for p in self.root.iterdir()}

    def open(self, name: str) -> IO[bytes]:
        try:
            return self._path(name).open("rb")
        except FileNotFoundError:
            raise ImageError(
                f"{self.root} has no {name}", hint="The image folder is incomplete."
            ) from None

    def size(self, name: str) -> int:
        try:
            return self._path(name).stat().st_size
        except FileNotFoundError:
            raise ImageError(f"{self.root} has no {name}") from None


def _blob_name(digest: str) -> str:
    algo, hexpart = check_digest(digest).split(":", 1)
    return f"blobs/{algo}/{hexpart}"


# --- formats ------------------------------------------------------------------------------
def _oci_layout(
    reader: _Reader, store: ImageStore, label: str, platform: Platform, progress: ProgressCallback
) -> _Parts:
    index_doc = load_json(reader.read("index.json", MAX_MANIFEST_BYTES), f"{label} index.json")
    index = Index.parse(
        index_doc, media_type_of(index_doc, "application/vnd.oci.image.index.v1+json")
    )
    entries = [m for m in index.manifests if m.media_type in MANIFEST_TYPES | INDEX_TYPES]
    if not entries:
        raise ImageError(f"{label}: index.json lists no image manifests")
    # A layout may hold several images (each tagged by an annotation) or one multi-arch image.
    desc = entries[0]
    if len(entries) > 1 or desc.platform is not None:
        with_platform = [m for m in entries if m.platform is not None]
        if with_platform:
            desc = Index(index.media_type, tuple(with_platform)).select(platform)
    refs = [m.annotations[_OCI_REF_NAME] for m in entries if _OCI_REF_NAME in m.annotations]
    for _ in range(2):  # at most one nested index
        data = reader.read(_blob_name(desc.digest), MAX_MANIFEST_BYTES)
        verify_bytes(data, desc.digest, "manifest")
        doc = load_json(data, f"manifest {desc.digest}")
        mt = media_type_of(doc, desc.media_type)
        if mt in INDEX_TYPES:
            desc = Index.parse(doc, mt).select(platform)
            continue
        manifest = Manifest.parse(doc, mt)
        break
    else:
        raise ImageError(f"{label}: image indexes nested more than once")
    return _ingest(reader, store, label, manifest, desc.digest, refs, progress)


def _ingest(
    reader: _Reader,
    store: ImageStore,
    label: str,
    manifest: Manifest,
    manifest_digest: str | None,
    refs: list[str],
    progress: ProgressCallback,
) -> _Parts:
    config_bytes = reader.read(_blob_name(manifest.config.digest), MAX_CONFIG_BYTES)
    verify_bytes(config_bytes, manifest.config.digest, "image config")
    store.blobs.put_bytes(config_bytes, manifest.config.digest)
    layers: list[tuple[Descriptor, Path]] = []
    for i, d in enumerate(manifest.layers, 1):
        progress(PullEvent("status", f"layer {i}/{len(manifest.layers)} {d.digest[:19]}: copying"))
        with reader.open(_blob_name(d.digest)) as f:
            path = store.blobs.ingest(f, d.digest, size=d.size)
        layers.append((d, path))
    return _Parts(config_bytes, manifest.config.digest, layers, refs, label, manifest_digest)


def _docker_save(
    reader: _Reader, store: ImageStore, label: str, progress: ProgressCallback
) -> _Parts:
    data = reader.read("manifest.json", MAX_MANIFEST_BYTES)
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise ImageError(f"{label}: manifest.json is not JSON: {e}") from None
    if not isinstance(doc, list) or not doc or not isinstance(doc[0], dict):
        raise ImageError(f"{label}: manifest.json is not a list of images")
    if len(doc) > 1:
        raise ImageError(
            f"{label} holds {len(doc)} images; hutch loads one archive per image",
            hint="Save one image per file: docker save IMAGE -o FILE.tar",
        )
    entry: dict[str, Any] = doc[0]
    config_name = entry.get("Config")
    layer_names = entry.get("Layers")
    if not isinstance(config_name, str) or not isinstance(layer_names, list):
        raise ImageError(f"{label}: manifest.json lacks Config or Layers")
    config_bytes = reader.read(config_name, MAX_CONFIG_BYTES)
    config_digest = sha256_digest(config_bytes)
    named = re.fullmatch(r"(?:blobs/sha256/)?([0-9a-f]{64})(?:\.json)?", config_name)
    if named and f"sha256:{named.group(1)}" != config_digest:
        raise ImageError(f"{label}: config {config_name} does not match its digest")
    store.blobs.put_bytes(config_bytes, config_digest)
    layers: list[tuple[Descriptor, Path]] = []
    for i, name in enumerate(layer_names, 1):
        if not isinstance(name, str):
            raise ImageError(f"{label}: manifest.json layer {i} is not a path")
        progress(PullEvent("status", f"layer {i}/{len(layer_names)} {name}: copying"))
        with reader.open(name) as f:
            head = f.read(4)
            digest, size = store.blobs.ingest_unknown(_Chain(head, f))
        layers.append(
            (Descriptor(_sniff_media_type(head), digest, size), store.blobs.final_path(digest))
        )
    tags = entry.get("RepoTags") or []
    refs = [t for t in tags if isinstance(t, str)]
    return _Parts(config_bytes, config_digest, layers, refs, label)


class _Chain(io.RawIOBase):
    """``head`` followed by the rest of ``f`` (we peeked at the first bytes)."""

    def __init__(self, head: bytes, f: IO[bytes]) -> None:
        self.head = head
        self.f = f

    def read(self, n: int = -1) -> bytes:
        if self.head:
            out, self.head = self.head, b""
            return out
        return self.f.read(n)


def _rootfs_layer(
    store: ImageStore, opener: Callable[[], IO[bytes]], label: str, progress: ProgressCallback
) -> _Parts:
    progress(PullEvent("status", f"{label}: copying the root filesystem"))
    with opener() as f:
        head = f.read(4)
        digest, size = store.blobs.ingest_unknown(_Chain(head, f))
    media_type = _sniff_media_type(head)
    diff_id = digest
    if media_type != DOCKER_LAYER:
        diff_id = _uncompressed_digest(store.blobs.final_path(digest), media_type)
    config = rootfs_config(diff_id)
    config_digest = sha256_digest(config)
    store.blobs.put_bytes(config, config_digest)
    desc = Descriptor(media_type if media_type != DOCKER_LAYER else OCI_LAYER, digest, size)
    return _Parts(config, config_digest, [(desc, store.blobs.final_path(digest))], [], label)


def _uncompressed_digest(path: Path, media_type: str) -> str:
    import hashlib

    import zstandard

    h = hashlib.sha256()
    with path.open("rb") as raw:
        stream: IO[bytes] = (
            gzip.GzipFile(fileobj=raw)  # type: ignore[assignment]
            if media_type == DOCKER_LAYER_GZIP
            else zstandard.ZstdDecompressor().stream_reader(raw)
        )
        while chunk := stream.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _pack_dir(root: Path) -> Callable[[], IO[bytes]]:
    """A tar stream of a folder, made by GNU tar (owners, modes, xattrs, devices, hard links)."""

    class _Proc(io.RawIOBase):
        def __init__(self) -> None:
            self.p = subprocess.Popen(
                [
                    "tar",
                    "--numeric-owner",
                    "--xattrs",
                    "--xattrs-include=*",
                    "--acls",
                    "--one-file-system",
                    "-C",
                    str(root),
                    "-cf",
                    "-",
                    ".",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            assert self.p.stdout is not None
            self.out = self.p.stdout

        def read(self, n: int = -1) -> bytes:
            return self.out.read(n)

        def close(self) -> None:
            if self.p.poll() is None:
                self.out.read()
            self.out.close()
            rc = self.p.wait()
            err = self.p.stderr.read().decode(errors="replace") if self.p.stderr else ""
            super().close()
            if rc not in (0, 1):  # 1 = "some files changed while being read"
                raise ImageError(f"packing {root} with tar failed ({rc}): {err.strip()[-500:]}")

    return lambda: _Proc()  # type: ignore[return-value]


def _detect(path: Path) -> str:
    if path.is_dir():
        return "oci-layout" if (path / "oci-layout").is_file() else "rootfs-dir"
    with path.open("rb") as f:
        head = f.read(4)
    if _sniff_media_type(head) == OCI_LAYER_ZSTD:
        return "rootfs-tar"  # tarfile cannot look inside zstd; a zstd tar is taken as a rootfs
    if tarfile.is_tarfile(path):  # plain or gzip/bz2/xz-compressed
        return "tar"
    raise BadRequestError(
        f"{path} is neither a folder nor a tar archive",
        hint="hutch load takes a `docker save` tar, an OCI archive or layout, or a rootfs tar/folder.",
    )


def load(
    path: Path | str,
    *,
    store: ImageStore,
    tag: str | None = None,
    platform: Platform | None = None,
    progress: ProgressCallback = _quiet,
    source: str | None = None,
) -> ImageRecord:
    """Import an image from a local file or folder into the store (blocking).

    ``source`` labels the record (default ``archive PATH``)."""
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise NotFoundError(f"{path} does not exist", hint="Pass an existing file or folder.")
    if tag is not None:
        tag = str(ImageReference.parse(tag))
    platform = platform or Platform.host()
    kind = _detect(path)
    label = str(path)
    parts: _Parts | None
    if kind == "oci-layout":
        parts = _oci_layout(_DirReader(path), store, label, platform, progress)
    elif kind == "rootfs-dir":
        parts = _rootfs_layer(store, _pack_dir(path), label, progress)
    elif kind == "rootfs-tar":
        parts = _rootfs_layer(store, lambda: path.open("rb"), label, progress)
    else:
        with tarfile.open(path, "r:*") as tf:
            reader = _TarReader(tf, label)
            names = reader.names()
            if "manifest.json" in names:
                parts = _docker_save(reader, store, label, progress)
            elif "oci-layout" in names and "index.json" in names:
                parts = _oci_layout(reader, store, label, platform, progress)
            else:
                parts = None
    if parts is None:  # a tar that is not an image archive: a root filesystem
        parts = _rootfs_layer(store, lambda: path.open("rb"), label, progress)
    refs: list[str] = []
    for r in parts.references:
        try:
            refs.append(str(ImageReference.parse(r)))
        except BadRequestError:
            continue  # an OCI ref.name annotation may be a bare tag such as "latest"
    if tag:
        refs = [tag]
    if not refs:
        stem = (
            re.sub(r"[^a-z0-9._-]+", "-", path.name.lower().split(".")[0]).strip("-._") or "image"
        )
        refs = [str(ImageReference.parse(f"localhost/{stem}:latest"))]
    progress(PullEvent("status", "building the base disk"))
    return install_image(
        store,
        config_bytes=parts.config_bytes,
        config_digest=parts.config_digest,
        layers=parts.layers,
        references=refs,
        source=source or f"archive {path}",
        progress=progress,
        manifest_digest=parts.manifest_digest,
    )


__all__ = ["load", "rootfs_config"]
