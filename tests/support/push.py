"""Push test images to a real registry over its HTTP API (httpx, synchronous).

``push_image`` turns uncompressed tar layers and an image config into an OCI or Docker schema 2
image (gzip, zstd or uncompressed layers; ``rootfs.diff_ids`` filled in), ``push_index`` ties
pushed images into a multi-arch OCI index / Docker manifest list. Uploads are monolithic (POST,
then PUT with ``digest`` added by ``URL.copy_add_param``: ``params=`` would replace the upload
URL's ``_state`` query and the registry would answer 404). Auth: pass ``auth=(user, password)``
for a registry with token or basic auth; ``verify`` is httpx's (a CA path or an SSL context).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import ssl
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import zstandard

from hutch.images.oci import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Platform,
)

Format = Literal["oci", "docker"]
Compression = Literal["gzip", "zstd", "none"]
Auth = tuple[str, str] | None
Verify = ssl.SSLContext | str | bool

_LAYER_TYPES: dict[tuple[str, str], str] = {
    ("oci", "gzip"): OCI_LAYER_GZIP,
    ("oci", "zstd"): OCI_LAYER_ZSTD,
    ("oci", "none"): OCI_LAYER,
    ("docker", "gzip"): DOCKER_LAYER_GZIP,
    ("docker", "none"): DOCKER_LAYER,
}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compress(data: bytes, compression: Compression) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        return bytes(zstandard.ZstdCompressor().compress(data))
    return data


@dataclass(frozen=True)
class PushedImage:
    manifest_digest: str
    config_digest: str
    layer_digests: list[str]
    diff_ids: list[str]
    manifest_bytes: bytes
    manifest_media_type: str
    config_bytes: bytes
    layer_blobs: list[bytes]  # as stored (compressed)
    layer_media_types: list[str]

    def descriptor(self, platform: Platform | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {
            "mediaType": self.manifest_media_type,
            "digest": self.manifest_digest,
            "size": len(self.manifest_bytes),
        }
        if platform is not None:
            p = {"os": platform.os, "architecture": platform.architecture}
            if platform.variant:
                p["variant"] = platform.variant
            d["platform"] = p
        return d


@dataclass(frozen=True)
class PushedIndex:
    digest: str
    media_type: str
    body: bytes


class _Session:
    """An httpx client that answers the registry's 401 challenge (bearer or basic) once."""

    def __init__(self, registry_url: str, repo: str, auth: Auth, verify: Verify) -> None:
        self.base = httpx.URL(registry_url.rstrip("/"))
        self.repo = repo
        self.auth = auth
        self.client = httpx.Client(verify=verify, timeout=60.0)
        self.authorization: str | None = None

    def __enter__(self) -> _Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def url(self, path: str) -> httpx.URL:
        return self.base.join(f"/v2/{self.repo}/{path}")

    def request(self, method: str, url: httpx.URL, **kw: Any) -> httpx.Response:
        for _ in range(2):
            headers = dict(kw.pop("headers", None) or {})
            if self.authorization:
                headers["Authorization"] = self.authorization
            resp = self.client.request(method, url, headers=headers, **kw)
            kw["headers"] = {k: v for k, v in headers.items() if k != "Authorization"}
            if resp.status_code != 401 or self.authorization:
                return resp
            self.authorization = self._answer(resp.headers.get("www-authenticate", ""))
        return resp

    def _answer(self, challenge: str) -> str:
        from hutch.images.registry import parse_www_authenticate

        if self.auth is None:
            raise AssertionError(f"registry wants auth ({challenge}) but none was given")
        user, password = self.auth
        basic = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        for c in parse_www_authenticate(challenge):
            if c.scheme == "basic":
                return basic
            if c.scheme == "bearer":
                realm = httpx.URL(c.params["realm"])
                if "service" in c.params:
                    realm = realm.copy_add_param("service", c.params["service"])
                realm = realm.copy_add_param("scope", f"repository:{self.repo}:pull,push")
                r = self.client.get(realm, headers={"Authorization": basic})
                r.raise_for_status()
                doc = r.json()
                return f"Bearer {doc.get('token') or doc['access_token']}"
        raise AssertionError(f"unsupported challenge {challenge!r}")


def _push_blob(s: _Session, data: bytes) -> str:
    digest = sha256(data)
    if s.request("HEAD", s.url(f"blobs/{digest}")).status_code == 200:
        return digest
    r = s.request("POST", s.url("blobs/uploads/"))
    if r.status_code != 202:
        raise AssertionError(f"upload start: HTTP {r.status_code} {r.text}")
    location = s.base.join(r.headers["location"]).copy_add_param("digest", digest)
    r = s.request(
        "PUT",
        location,
        content=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    if r.status_code != 201:
        raise AssertionError(f"upload of {digest}: HTTP {r.status_code} {r.text}")
    return digest


def _push_manifest(s: _Session, reference: str, body: bytes, media_type: str) -> str:
    r = s.request(
        "PUT", s.url(f"manifests/{reference}"), content=body, headers={"Content-Type": media_type}
    )
    if r.status_code != 201:
        raise AssertionError(f"manifest {reference}: HTTP {r.status_code} {r.text}")
    digest = sha256(body)
    assert r.headers.get("docker-content-digest", digest) == digest
    return digest


def push_blob(
    registry_url: str, repo: str, data: bytes, *, auth: Auth = None, verify: Verify = True
) -> str:
    """Upload one blob (skipped when the registry has it); returns its digest."""
    with _Session(registry_url, repo, auth, verify) as s:
        return _push_blob(s, data)


def push_manifest(
    registry_url: str,
    repo: str,
    reference: str,
    body: bytes | dict[str, Any],
    media_type: str,
    *,
    auth: Auth = None,
    verify: Verify = True,
) -> str:
    """PUT a manifest (bytes as given, or a dict serialised) under a tag or digest; its digest."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    with _Session(registry_url, repo, auth, verify) as s:
        return _push_manifest(s, reference, data, media_type)


def push_image(
    registry_url: str,
    repo: str,
    tag: str | None,
    layers: list[bytes],
    config: dict[str, Any],
    *,
    fmt: Format = "oci",
    compression: Compression = "gzip",
    auth: Auth = None,
    verify: Verify = True,
) -> PushedImage:
    """Push an image made of uncompressed tar ``layers``; ``tag=None`` pushes it by digest only."""
    layer_type = _LAYER_TYPES.get((fmt, compression))
    if layer_type is None:
        raise ValueError(f"no {fmt} layer media type for {compression} compression")
    diff_ids = [sha256(layer) for layer in layers]
    blobs = [compress(layer, compression) for layer in layers]
    cfg = dict(config)
    cfg.setdefault("architecture", "amd64")
    cfg.setdefault("os", "linux")
    cfg["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    config_bytes = json.dumps(cfg, sort_keys=True).encode()
    manifest_type = OCI_MANIFEST if fmt == "oci" else DOCKER_MANIFEST
    with _Session(registry_url, repo, auth, verify) as s:
        layer_digests = [_push_blob(s, b) for b in blobs]
        config_digest = _push_blob(s, config_bytes)
        manifest = {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {
                "mediaType": OCI_CONFIG if fmt == "oci" else DOCKER_CONFIG,
                "digest": config_digest,
                "size": len(config_bytes),
            },
            "layers": [
                {"mediaType": layer_type, "digest": d, "size": len(b)}
                for d, b in zip(layer_digests, blobs, strict=True)
            ],
        }
        body = json.dumps(manifest, indent=2).encode()
        digest = _push_manifest(s, tag or sha256(body), body, manifest_type)
    return PushedImage(
        manifest_digest=digest,
        config_digest=config_digest,
        layer_digests=layer_digests,
        diff_ids=diff_ids,
        manifest_bytes=body,
        manifest_media_type=manifest_type,
        config_bytes=config_bytes,
        layer_blobs=blobs,
        layer_media_types=[layer_type] * len(blobs),
    )


def push_index(
    registry_url: str,
    repo: str,
    tag: str | None,
    manifests: list[tuple[PushedImage, Platform]],
    *,
    fmt: Format = "oci",
    auth: Auth = None,
    verify: Verify = True,
) -> PushedIndex:
    """Push an OCI image index (``fmt="oci"``) or Docker manifest list over pushed images."""
    media_type = OCI_INDEX if fmt == "oci" else DOCKER_MANIFEST_LIST
    doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [img.descriptor(p) for img, p in manifests],
    }
    body = json.dumps(doc, indent=2).encode()
    digest = push_manifest(
        registry_url, repo, tag or sha256(body), body, media_type, auth=auth, verify=verify
    )
    return PushedIndex(digest, media_type, body)


__all__ = [
    "PushedImage",
    "PushedIndex",
    "compress",
    "push_blob",
    "push_image",
    "push_index",
    "push_manifest",
    "sha256",
]
