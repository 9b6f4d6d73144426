"""OCI / Docker image data model: media types, digests, descriptors, platforms, manifests.

Everything here parses *untrusted* JSON (from a registry or an archive) into small frozen
dataclasses, checking types, digest syntax and sizes, and raising :class:`ImageError` that says what
was wrong. Hand-written rather than pydantic: the schema is a dozen fields and every rejection must
name the image part it came from.
"""

from __future__ import annotations

import hashlib
import json
import platform as _platform
import re
from dataclasses import dataclass, field
from typing import Any

from hutch.errors import ImageError

# --- media types ---------------------------------------------------------------------------
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDIST_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
#: Layer media type → compression ("" = plain tar).
LAYER_COMPRESSION: dict[str, str] = {
    OCI_LAYER: "",
    OCI_LAYER_GZIP: "gzip",
    OCI_LAYER_ZSTD: "zstd",
    OCI_LAYER_NONDIST_GZIP: "gzip",
    DOCKER_LAYER_GZIP: "gzip",
    DOCKER_LAYER: "",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
}
#: What the manifest endpoint is asked for (order = preference).
MANIFEST_ACCEPT = (OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST)

# --- bounds on untrusted input --------------------------------------------------------------
MAX_MANIFEST_BYTES = 4 << 20
MAX_CONFIG_BYTES = 8 << 20
MAX_LAYERS = 256
MAX_INDEX_ENTRIES = 1024

_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")


def check_digest(value: object, what: str = "digest") -> str:
    """Return ``value`` if it is a sha256/sha512 digest, else :class:`ImageError`."""
    if not isinstance(value, str) or not _DIGEST_RE.fullmatch(value):
        raise ImageError(f"{what} {value!r} is not a valid sha256:/sha512: digest")
    return value


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def new_hasher(digest: str) -> Any:
    """A hashlib object of the digest's algorithm."""
    return hashlib.new(digest.split(":", 1)[0])


def verify_bytes(data: bytes, digest: str, what: str) -> None:
    h = new_hasher(digest)
    h.update(data)
    got = f"{digest.split(':', 1)[0]}:{h.hexdigest()}"
    if got != digest:
        raise ImageError(
            f"{what} {digest} failed its digest check (content hashes to {got})",
            hint="The registry or archive served corrupted or tampered data; nothing was cached.",
        )


# --- platforms ------------------------------------------------------------------------------
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


@dataclass(frozen=True)
class Platform:
    os: str = "linux"
    architecture: str = "amd64"
    variant: str | None = None

    @classmethod
    def host(cls) -> Platform:
        machine = _platform.machine().lower()
        arch = _ARCH.get(machine, machine)
        return cls("linux", arch, "v8" if arch == "arm64" else None)

    @classmethod
    def parse(cls, text: str) -> Platform:
        """``linux/amd64`` or ``linux/arm64/v8``."""
        parts = text.split("/")
        if not 2 <= len(parts) <= 3 or not all(parts):
            raise ImageError(
                f"invalid platform {text!r}", hint="Use OS/ARCH[/VARIANT], e.g. linux/amd64."
            )
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def matches(self, other: Platform) -> bool:
        """Does an index entry for ``other`` satisfy a request for ``self``?"""
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        return self.variant is None or other.variant in (None, self.variant)

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")


# --- descriptors and manifests --------------------------------------------------------------
def _obj(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ImageError(f"{what} is not a JSON object")
    return value


def _str(d: dict[str, Any], key: str, what: str, *, required: bool = True) -> str | None:
    v = d.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v:
        raise ImageError(f"{what}: field {key!r} is missing or not a string")
    return v


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: dict[str, str] = field(default_factory=dict, compare=False)

    @classmethod
    def parse(cls, value: object, what: str) -> Descriptor:
        d = _obj(value, what)
        media_type = _str(d, "mediaType", what)
        assert media_type is not None
        digest = check_digest(d.get("digest"), f"{what} digest")
        size = d.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImageError(f"{what}: size {size!r} is not a non-negative integer")
        plat = None
        if isinstance(d.get("platform"), dict):
            p = d["platform"]
            plat = Platform(
                str(p.get("os", "")),
                str(p.get("architecture", "")),
                str(p["variant"]) if p.get("variant") else None,
            )
        ann = d.get("annotations") if isinstance(d.get("annotations"), dict) else {}
        annotations = {str(k): str(v) for k, v in (ann or {}).items()}
        return cls(media_type, digest, size, plat, annotations)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.platform:
            p: dict[str, str] = {"os": self.platform.os, "architecture": self.platform.architecture}
            if self.platform.variant:
                p["variant"] = self.platform.variant
            out["platform"] = p
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


def load_json(data: bytes, what: str, limit: int = MAX_MANIFEST_BYTES) -> dict[str, Any]:
    if len(data) > limit:
        raise ImageError(f"{what} is {len(data)} bytes, more than the {limit} allowed")
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ImageError(f"{what} is not valid JSON: {e}") from None
    return _obj(value, what)


def media_type_of(doc: dict[str, Any], fallback: str | None = None) -> str:
    """A manifest's media type: its own field, the transport's Content-Type, or by shape."""
    mt = doc.get("mediaType")
    if isinstance(mt, str) and mt:
        return mt
    if fallback and fallback in INDEX_TYPES | MANIFEST_TYPES:
        return fallback
    # OCI allows omitting mediaType; tell index from manifest by its fields.
    if "manifests" in doc:
        return OCI_INDEX
    if "layers" in doc and "config" in doc:
        return OCI_MANIFEST
    raise ImageError("the manifest has no mediaType and is neither an index nor an image manifest")


@dataclass(frozen=True)
class Index:
    media_type: str
    manifests: tuple[Descriptor, ...]

    @classmethod
    def parse(cls, doc: dict[str, Any], media_type: str) -> Index:
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise ImageError("image index: 'manifests' is missing or not a list")
        if len(entries) > MAX_INDEX_ENTRIES:
            raise ImageError(f"image index has {len(entries)} entries (max {MAX_INDEX_ENTRIES})")
        return cls(
            media_type,
            tuple(Descriptor.parse(e, f"image index entry {i}") for i, e in enumerate(entries)),
        )

    def select(self, want: Platform) -> Descriptor:
        """The entry for ``want`` (an exact variant match beats a variant-less one)."""
        candidates = [
            m
            for m in self.manifests
            if m.media_type in MANIFEST_TYPES | INDEX_TYPES
            and m.platform is not None
            and want.matches(m.platform)
        ]
        if not candidates:
            have = sorted({str(m.platform) for m in self.manifests if m.platform}) or ["none"]
            raise ImageError(
                f"the image has no variant for platform {want}; it offers: {', '.join(have)}",
                hint="Pick one of the offered platforms with platform=… / --platform.",
            )
        candidates.sort(key=lambda m: m.platform is not None and m.platform.variant == want.variant)
        return candidates[-1]


@dataclass(frozen=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]

    @classmethod
    def parse(cls, doc: dict[str, Any], media_type: str) -> Manifest:
        if doc.get("schemaVersion") not in (2, None):
            raise ImageError(
                f"unsupported manifest schemaVersion {doc.get('schemaVersion')!r}",
                hint="Docker schema 1 manifests are deprecated; re-push the image with a current tool.",
            )
        config = Descriptor.parse(doc.get("config"), "manifest config")
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise ImageError("manifest: 'layers' is missing or not a list")
        if len(layers) > MAX_LAYERS:
            raise ImageError(f"manifest has {len(layers)} layers (max {MAX_LAYERS})")
        parsed = tuple(Descriptor.parse(e, f"layer {i}") for i, e in enumerate(layers))
        for d in parsed:
            if d.media_type not in LAYER_COMPRESSION:
                raise ImageError(
                    f"layer {d.digest} has unsupported media type {d.media_type!r}",
                    hint="hutch reads tar layers, plain, gzip or zstd compressed.",
                )
        return cls(media_type, config, parsed)


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config a box honours, plus the layer diff_ids."""

    architecture: str
    os: str
    diff_ids: tuple[str, ...]
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    working_dir: str = ""
    user: str = ""
    created: str = ""

    @classmethod
    def parse(cls, data: bytes) -> ImageConfig:
        doc = load_json(data, "image config", MAX_CONFIG_BYTES)
        rootfs = _obj(doc.get("rootfs"), "image config rootfs")
        ids = rootfs.get("diff_ids")
        if not isinstance(ids, list):
            raise ImageError("image config: rootfs.diff_ids is missing or not a list")
        diff_ids = tuple(check_digest(x, "image config diff_id") for x in ids)
        cfg = doc.get("config") or {}
        if not isinstance(cfg, dict):
            raise ImageError("image config: 'config' is not an object")

        def strings(key: str) -> tuple[str, ...]:
            v = cfg.get(key)
            if v is None:
                return ()
            if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
                raise ImageError(f"image config: {key} is not a list of strings")
            return tuple(v)

        env: list[tuple[str, str]] = []
        for item in strings("Env"):
            name, sep, value = item.partition("=")
            if not sep or not name or "\0" in item:
                raise ImageError(f"image config: Env entry {item!r} is not NAME=VALUE")
            env.append((name, value))
        wd = cfg.get("WorkingDir") or ""
        user = cfg.get("User") or ""
        if not isinstance(wd, str) or not isinstance(user, str):
            raise ImageError("image config: WorkingDir and User must be strings")
        return cls(
            architecture=str(doc.get("architecture", "")),
            os=str(doc.get("os", "")),
            diff_ids=diff_ids,
            entrypoint=strings("Entrypoint"),
            cmd=strings("Cmd"),
            env=tuple(env),
            working_dir=wd,
            user=user,
            created=str(doc.get("created", "")),
        )


__all__ = [
    "INDEX_TYPES",
    "LAYER_COMPRESSION",
    "MANIFEST_ACCEPT",
    "MANIFEST_TYPES",
    "Descriptor",
    "ImageConfig",
    "Index",
    "Manifest",
    "Platform",
    "check_digest",
    "load_json",
    "media_type_of",
    "sha256_digest",
    "verify_bytes",
]
