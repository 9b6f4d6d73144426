"""The local image store: which images exist, under which names, and their base disks.

Layout under ``HOME/images/``::

    refs.json                 canonical reference → image id (the config digest)
    store/<hex>/image.json    one record per image: references, manifest/config/layers, config
    store/<hex>/rootfs.ext4   its read-only base disk (built-in images point at their artifact)
    blobs/                    the blob cache (hutch.images.blobs)
    store.lock                flock serialising writers of refs.json and store/

An image's id is its **config digest** (as Docker does): equal content → one record, one base disk,
however many names point at it. Records are written to a temporary folder and renamed into place,
and ``refs.json`` is replaced atomically, so readers never see a half-made image — reading needs no
lock, which keeps resolving a cached image (every box start) to two small file reads.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hutch.errors import BadRequestError, ConflictError, ImageError, NotFoundError
from hutch.images.blobs import BlobCache, storage_error
from hutch.images.oci import ImageConfig, check_digest
from hutch.images.reference import ImageReference
from hutch.paths import HutchPaths

RECORD = "image.json"
BASE = "rootfs.ext4"
#: Marker file a box folder holds while it uses an image (``boxes/<id>/image.id``).
BOX_IMAGE_FILE = "image.id"


@dataclass(frozen=True)
class LayerRecord:
    digest: str
    media_type: str
    size: int
    diff_id: str


@dataclass(frozen=True)
class ImageRecord:
    id: str  # sha256:… of the image config
    references: tuple[str, ...]
    source: str  # "registry" | "archive" | "builtin" | "rootfs"
    platform: str
    base: str  # absolute path of the base ext4
    base_size: int  # apparent size: the largest disk a box on it can have
    config: ImageConfig
    layers: tuple[LayerRecord, ...] = ()
    manifest_digest: str | None = None
    index_digest: str | None = None
    added: float = field(default_factory=time.time)
    allocated: int = 0  # bytes the base disk really takes on the host
    recipe: str = ""  # how the base disk was built (rebuild when it changes)

    @property
    def short_id(self) -> str:
        return self.id.split(":", 1)[1][:12]

    @property
    def base_path(self) -> Path:
        return Path(self.base)

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["config"] = asdict(self.config)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ImageRecord:
        cfg = d["config"]
        config = ImageConfig(
            architecture=cfg["architecture"],
            os=cfg["os"],
            diff_ids=tuple(cfg["diff_ids"]),
            entrypoint=tuple(cfg["entrypoint"]),
            cmd=tuple(cfg["cmd"]),
            env=tuple((k, v) for k, v in cfg["env"]),
            working_dir=cfg["working_dir"],
            user=cfg["user"],
            created=cfg.get("created", ""),
        )
        return cls(
            id=d["id"],
            references=tuple(d["references"]),
            source=d["source"],
            platform=d["platform"],
            base=d["base"],
            base_size=int(d["base_size"]),
            config=config,
            layers=tuple(LayerRecord(**layer) for layer in d.get("layers", ())),
            manifest_digest=d.get("manifest_digest"),
            index_digest=d.get("index_digest"),
            added=float(d.get("added", 0.0)),
            allocated=int(d.get("allocated", 0)),
            recipe=str(d.get("recipe", "")),
        )


def _looks_like_id(text: str) -> bool:
    hexpart = text.removeprefix("sha256:")
    return 12 <= len(hexpart) <= 64 and all(c in "0123456789abcdef" for c in hexpart)


class ImageStore:
    def __init__(self, paths: HutchPaths, *, cache_max_bytes: int | None = None) -> None:
        self.paths = paths
        self.root = paths.home / "images"
        self.records = self.root / "store"
        self.refs_file = self.root / "refs.json"
        if cache_max_bytes is None:
            from hutch.config import ImagesConfig

            cache_max_bytes = ImagesConfig.load(paths).cache_max_bytes
        self.blobs = BlobCache(self.root / "blobs", cache_max_bytes)

    # --- locking --------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive writer lock over refs.json and store/ (across processes)."""
        try:
            self.records.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / "store.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise storage_error(self.root, e, "opening the image store in") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # --- reading --------------------------------------------------------------------------
    def _refs(self) -> dict[str, str]:
        try:
            data = json.loads(self.refs_file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise ImageError(
                f"the image store's {self.refs_file} is unreadable: {e}",
                hint="Remove it and pull or load your images again.",
            ) from e
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _write_refs(self, refs: dict[str, str]) -> None:
        tmp = self.refs_file.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(dict(sorted(refs.items())), indent=2) + "\n")
            os.replace(tmp, self.refs_file)
        except OSError as e:
            raise storage_error(self.refs_file, e, "writing") from e

    def record_dir(self, image_id: str) -> Path:
        check_digest(image_id, "image id")
        return self.records / image_id.split(":", 1)[1]

    def get(self, image_id: str) -> ImageRecord | None:
        f = self.record_dir(image_id) / RECORD
        try:
            return ImageRecord.from_json(json.loads(f.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ImageError(
                f"image record {f} is unreadable: {e}",
                hint=f"Remove the image (`hutch rmi {image_id}`) and pull or load it again.",
            ) from e

    def list(self) -> builtins.list[ImageRecord]:
        out = []
        if self.records.is_dir():
            for d in sorted(self.records.iterdir()):
                if d.name.startswith(".") or not (d / RECORD).is_file():
                    continue
                rec = self.get(f"sha256:{d.name}")
                if rec is not None:
                    out.append(rec)
        return sorted(out, key=lambda r: r.added, reverse=True)

    def lookup(self, name: str) -> ImageRecord | None:
        """By reference (``busybox``, ``localhost:5000/app@sha256:…``) or id (prefix ≥ 12 hex)."""
        refs = self._refs()
        if _looks_like_id(name):
            hexpart = name.removeprefix("sha256:")
            matches = {v for v in refs.values() if v.split(":", 1)[1].startswith(hexpart)}
            if self.records.is_dir():
                matches |= {
                    f"sha256:{d.name}" for d in self.records.iterdir() if d.name.startswith(hexpart)
                }
            if len(matches) > 1:
                raise ConflictError(
                    f"image id prefix {name!r} is ambiguous ({len(matches)} images)",
                    hint="Give more digits of the id.",
                )
            if matches:
                return self.get(matches.pop())
            # a 12+ hex-digit string may also be a valid repository name: fall through
        try:
            ref = ImageReference.parse(name)
        except BadRequestError:
            if _looks_like_id(name):
                return None
            raise
        image_id = refs.get(str(ref))
        if image_id is not None:
            return self.get(image_id)
        if ref.digest:
            for rec in self.list():
                if (
                    rec.references
                    and ref.name in {ImageReference.parse(r).name for r in rec.references}
                    and ref.digest in (rec.manifest_digest, rec.index_digest)
                ):
                    return rec
        return None

    def require(self, name: str) -> ImageRecord:
        rec = self.lookup(name)
        if rec is None:
            raise NotFoundError(
                f"image {name!r} is not in the local store",
                hint=f"Pull it first: `hutch pull {name}` (or `hutch images` to see what is here).",
            )
        return rec

    def users(self, image_id: str) -> builtins.list[str]:
        """What uses the image: the ids of boxes (folders under HOME/boxes) and, as
        ``snapshot <id>``, of snapshots (HOME/snapshots), whose disks build on its base."""
        out = []
        for root, label in ((self.paths.boxes, ""), (self.paths.snapshots, "snapshot ")):
            if not root.is_dir():
                continue
            for d in root.iterdir():
                if d.name.startswith("."):  # a snapshot still being written
                    continue
                with contextlib.suppress(OSError):
                    if (d / BOX_IMAGE_FILE).read_text().strip() == image_id:
                        out.append(label + d.name)
        return out

    # --- writing --------------------------------------------------------------------------
    def add(
        self,
        record: ImageRecord,
        *,
        base_file: Path | None,
        files: dict[str, bytes] | None = None,
    ) -> ImageRecord:
        """Register an image. ``base_file`` (if given) is moved into the record's folder; the
        record's references are (re)pointed at it. Caller holds :meth:`locked`."""
        final = self.record_dir(record.id)
        existing = self.get(record.id)
        if existing is not None and existing.base_path.is_file():
            record = _merge(existing, record)
            if base_file is not None:
                base_file.unlink(missing_ok=True)  # same content already has a base disk
        else:
            try:
                tmp = Path(tempfile.mkdtemp(prefix=".add-", dir=self.records))
                if base_file is not None:
                    os.replace(base_file, tmp / BASE)
                    record = _replace(record, base=str(final / BASE))
                for name, data in (files or {}).items():
                    (tmp / name).write_bytes(data)
                (tmp / RECORD).write_text(json.dumps(record.to_json(), indent=2) + "\n")
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            except OSError as e:
                raise storage_error(final, e, "storing the image in") from e
        self._write_record(record)
        refs = self._refs()
        for r in record.references:
            old = refs.get(r)
            refs[r] = record.id
            if old and old != record.id:
                self._drop_reference(old, r)
        self._write_refs(refs)
        return record

    def _write_record(self, record: ImageRecord) -> None:
        f = self.record_dir(record.id) / RECORD
        tmp = f.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(record.to_json(), indent=2) + "\n")
            os.replace(tmp, f)
        except OSError as e:
            raise storage_error(f, e, "writing") from e

    def _drop_reference(self, image_id: str, ref: str) -> None:
        rec = self.get(image_id)
        if rec is not None:
            self._write_record(
                _replace(rec, references=tuple(r for r in rec.references if r != ref))
            )

    def tag(self, name: str, target: str) -> ImageRecord:
        ref = str(ImageReference.parse(name))
        with self.locked():
            rec = self.require(target)
            if ref not in rec.references:
                rec = _replace(rec, references=(*rec.references, ref))
            return self.add(rec, base_file=None)

    def remove(self, name: str, *, force: bool = False) -> builtins.list[str]:
        """Untag ``name``; delete the image when no name is left (or when ``name`` is an id).

        Returns what was done (``untagged: …`` / ``deleted: …`` lines). An image boxes still use
        is not deleted (ConflictError) unless ``force``.
        """
        with self.locked():
            rec = self.require(name)
            refs = self._refs()
            done: builtins.list[str] = []
            by_id = _looks_like_id(name) and not any(
                r == str(_parse_or_none(name)) for r in rec.references
            )
            drop = list(rec.references) if by_id else [str(ImageReference.parse(name))]
            remaining = [r for r in rec.references if r not in drop]
            if not remaining:
                users = self.users(rec.id)
                if users and not force:
                    raise ConflictError(
                        f"image {name!r} is used by box(es) {', '.join(sorted(users))}",
                        hint="Remove those boxes (and snapshots) first, or pass force=True / --force.",
                    )
            for r in drop:
                refs.pop(r, None)
                done.append(f"untagged: {ImageReference.parse(r).familiar()}")
            self._write_refs(refs)
            if remaining:
                self._write_record(_replace(rec, references=tuple(remaining)))
            else:
                self._delete(rec)
                done.append(f"deleted: {rec.id}")
            return done

    def _delete(self, rec: ImageRecord) -> None:
        shutil.rmtree(self.record_dir(rec.id), ignore_errors=True)

    def prune(self, *, all_blobs: bool = True) -> tuple[builtins.list[str], int]:
        """Delete images no name points at and no box uses, and the blob cache (bases don't
        need their blobs once built). Returns (deleted ids, bytes freed)."""
        deleted: builtins.list[str] = []
        freed = 0
        with self.locked():
            for rec in self.list():
                if rec.references or self.users(rec.id):
                    continue
                freed += rec.allocated
                self._delete(rec)
                deleted.append(rec.id)
            if self.records.is_dir():  # leftovers of interrupted adds
                for d in self.records.iterdir():
                    if d.name.startswith(".add-"):
                        shutil.rmtree(d, ignore_errors=True)
        freed += self.blobs.prune(max_bytes=0 if all_blobs else None)
        return deleted, freed


def _parse_or_none(text: str) -> ImageReference | None:
    try:
        return ImageReference.parse(text)
    except BadRequestError:
        return None


def _replace(rec: ImageRecord, **changes: Any) -> ImageRecord:
    from dataclasses import replace

    return replace(rec, **changes)


def _merge(existing: ImageRecord, new: ImageRecord) -> ImageRecord:
    refs: Sequence[str] = list(dict.fromkeys((*existing.references, *new.references)))
    return _replace(
        existing,
        references=tuple(refs),
        manifest_digest=new.manifest_digest or existing.manifest_digest,
        index_digest=new.index_digest or existing.index_digest,
    )


__all__ = ["BOX_IMAGE_FILE", "ImageRecord", "ImageStore", "LayerRecord"]
