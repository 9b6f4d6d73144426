"""RegistryClient against a real registry (Debian's docker-registry, distribution 2.8).

Plain-HTTP registry: formats, platform selection, digest pinning, compression, tampering, missing
images, a registry dying mid-download and the resumed download after it comes back. TLS + token
registry: credentials from hutch's config and from Docker's, token caching per scope, wrong
password, missing CA.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import zstandard

from hutch.errors import ImageError, NetworkError, NotFoundError, UnauthorizedError
from hutch.images.credentials import RegistrySettings
from hutch.images.oci import (
    DOCKER_MANIFEST,
    MAX_CONFIG_BYTES,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Descriptor,
    ImageConfig,
    Platform,
)
from hutch.images.reference import ImageReference
from hutch.images.registry import RegistryClient
from hutch.paths import HutchPaths
from tests.support.push import PushedImage, push_blob, push_image, push_index, sha256
from tests.support.registry import RegistryServer, TlsRegistry

pytestmark = pytest.mark.registry

AMD64 = Platform("linux", "amd64")
ARM64 = Platform("linux", "arm64", "v8")


def tar_layer(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime = len(data), 1_700_000_000
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def ref(host: str, name: str) -> ImageReference:
    return ImageReference.parse(f"{host}/{name}")


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RegistrySettings:
    """No hutch config and an empty Docker config (the machine's own must not leak in)."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker"))
    return RegistrySettings.load(HutchPaths(tmp_path / "home"))


async def pull_all(client: RegistryClient, r: ImageReference, dest: Path, **kw: Any) -> list[Path]:
    """Resolve, fetch the config and download all layers (concurrently), like a pull does."""
    resolved = await client.resolve(r, **kw)
    cfg = await client.fetch_blob_bytes(r, resolved.manifest.config, MAX_CONFIG_BYTES)
    ImageConfig.parse(cfg)
    paths = [dest / d.digest.split(":")[1] for d in resolved.manifest.layers]
    await asyncio.gather(
        *(
            client.download_blob(r, d, p)
            for d, p in zip(resolved.manifest.layers, paths, strict=True)
        )
    )
    return paths


# --- plain registry: formats and platforms ---------------------------------------------------
@pytest.mark.parametrize(
    ("fmt", "media_type"), [("oci", OCI_MANIFEST), ("docker", DOCKER_MANIFEST)]
)
async def test_single_arch_image(
    registry: RegistryServer, settings: RegistrySettings, tmp_path: Path, fmt: str, media_type: str
) -> None:
    layers = [tar_layer({"etc/hostname": b"box\n"}), tar_layer({"bin/tool": b"x" * 5000})]
    img = push_image(
        registry.url, f"single/{fmt}", "v1", layers, {"config": {"Cmd": ["sh"]}}, fmt=fmt
    )
    r = ref(registry.host, f"single/{fmt}:v1")
    async with RegistryClient(settings) as client:
        resolved = await client.resolve(r)
        assert resolved.manifest_digest == img.manifest_digest
        assert resolved.manifest_bytes == img.manifest_bytes
        assert resolved.manifest.media_type == media_type
        assert resolved.index_digest is None
        assert [d.digest for d in resolved.manifest.layers] == img.layer_digests
        cfg = await client.fetch_blob_bytes(r, resolved.manifest.config, MAX_CONFIG_BYTES)
        assert cfg == img.config_bytes
        assert ImageConfig.parse(cfg).cmd == ("sh",)
        paths = await pull_all(client, r, tmp_path)
    for path, blob, diff_id in zip(paths, img.layer_blobs, img.diff_ids, strict=True):
        assert path.read_bytes() == blob
        assert sha256(gzip.decompress(path.read_bytes())) == diff_id


@pytest.fixture(scope="module")
def multiarch(registry: RegistryServer) -> dict[str, Any]:
    """amd64 + arm64/v8 images under an OCI index and a Docker manifest list."""
    out: dict[str, Any] = {}
    for fmt in ("oci", "docker"):
        repo = f"multi/{fmt}"
        amd = push_image(
            registry.url,
            repo,
            None,
            [tar_layer({"arch": b"amd64"})],
            {"architecture": "amd64"},
            fmt=fmt,
        )
        arm = push_image(
            registry.url,
            repo,
            None,
            [tar_layer({"arch": b"arm64"})],
            {"architecture": "arm64", "variant": "v8"},
            fmt=fmt,
        )
        index = push_index(registry.url, repo, "latest", [(amd, AMD64), (arm, ARM64)], fmt=fmt)
        out[fmt] = (repo, amd, arm, index)
    return out


@pytest.mark.parametrize("fmt", ["oci", "docker"])
async def test_multi_arch_platform_selection(
    registry: RegistryServer, settings: RegistrySettings, multiarch: dict[str, Any], fmt: str
) -> None:
    repo, amd, arm, index = multiarch[fmt]
    r = ref(registry.host, repo)
    async with RegistryClient(settings) as client:
        got = await client.resolve(r, AMD64)
        assert (got.manifest_digest, got.index_digest, got.platform) == (
            amd.manifest_digest,
            index.digest,
            AMD64,
        )
        for want in (ARM64, Platform("linux", "arm64")):  # variant-less request matches v8
            got = await client.resolve(r, want)
            assert got.manifest_digest == arm.manifest_digest
            assert got.platform == ARM64
            assert got.manifest.layers[0].digest == arm.layer_digests[0]
        with pytest.raises(ImageError) as e:
            await client.resolve(r, Platform("linux", "s390x"))
        assert "linux/s390x" in str(e.value)
        assert "linux/amd64, linux/arm64/v8" in str(e.value)
        host = await client.resolve(r)  # default: the host's platform
        assert host.platform.architecture == Platform.host().architecture


async def test_digest_pinned_references(
    registry: RegistryServer, settings: RegistrySettings, multiarch: dict[str, Any]
) -> None:
    repo, amd, arm, index = multiarch["oci"]
    async with RegistryClient(settings) as client:
        got = await client.resolve(ref(registry.host, f"{repo}@{arm.manifest_digest}"), AMD64)
        # A pinned platform manifest is taken as is: no index, no selection.
        assert got.manifest_digest == arm.manifest_digest and got.index_digest is None
        got = await client.resolve(ref(registry.host, f"{repo}:ignored@{index.digest}"), ARM64)
        assert (got.index_digest, got.manifest_digest) == (index.digest, arm.manifest_digest)
        with pytest.raises(NotFoundError):
            await client.resolve(ref(registry.host, f"{repo}@sha256:{'0' * 64}"))


async def test_nested_index_followed_once(
    registry: RegistryServer, settings: RegistrySettings, multiarch: dict[str, Any]
) -> None:
    from tests.support.push import push_manifest

    repo, amd, _arm, index = multiarch["oci"]
    inner = {"mediaType": index.media_type, "digest": index.digest, "size": len(index.body),
             "platform": {"os": "linux", "architecture": "amd64"}}  # fmt: skip
    outer = {"schemaVersion": 2, "mediaType": index.media_type, "manifests": [inner]}
    outer_digest = push_manifest(registry.url, repo, "nested", outer, index.media_type)
    outer2 = {"schemaVersion": 2, "mediaType": index.media_type,
              "manifests": [{**inner, "digest": outer_digest, "size": len(json.dumps(outer))}]}  # fmt: skip
    push_manifest(registry.url, repo, "nested2", outer2, index.media_type)
    async with RegistryClient(settings) as client:
        got = await client.resolve(ref(registry.host, f"{repo}:nested"), AMD64)
        assert (got.manifest_digest, got.index_digest) == (amd.manifest_digest, outer_digest)
        with pytest.raises(ImageError, match="more than one level"):
            await client.resolve(ref(registry.host, f"{repo}:nested2"), AMD64)


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
async def test_layer_compressions_downloaded_and_verified(
    registry: RegistryServer, settings: RegistrySettings, tmp_path: Path, compression: str
) -> None:
    layer = tar_layer({"data.bin": os.urandom(200_000), "text": b"hello " * 1000})
    img = push_image(
        registry.url, f"comp/{compression}", "v1", [layer], {}, compression=compression
    )
    r = ref(registry.host, f"comp/{compression}:v1")
    async with RegistryClient(settings) as client:
        (path,) = await pull_all(client, r, tmp_path)
    blob = path.read_bytes()
    assert sha256(blob) == img.layer_digests[0]
    plain = {
        "gzip": gzip.decompress,
        "zstd": lambda b: zstandard.ZstdDecompressor().decompressobj().decompress(b),
        "none": lambda b: b,
    }[compression](blob)
    assert plain == layer and sha256(plain) == img.diff_ids[0]
    if compression == "zstd":
        assert img.layer_media_types == [OCI_LAYER_ZSTD]


# --- plain registry: failures ----------------------------------------------------------------
async def test_missing_tag_and_repository(
    registry: RegistryServer, settings: RegistrySettings
) -> None:
    push_image(registry.url, "exists/app", "v1", [tar_layer({"a": b"a"})], {})
    async with RegistryClient(settings) as client:
        with pytest.raises(NotFoundError) as e:
            await client.resolve(ref(registry.host, "exists/app:nope"))
        assert f"{registry.host}/exists/app:nope" in str(e.value)
        assert f"registry {registry.host}" in str(e.value)
        with pytest.raises(NotFoundError, match="no/such/repo"):
            await client.resolve(ref(registry.host, "no/such/repo:v1"))


async def test_missing_blob_is_image_error(
    registry: RegistryServer, settings: RegistrySettings, tmp_path: Path
) -> None:
    push_image(registry.url, "exists/blob", "v1", [tar_layer({"a": b"a"})], {})
    missing = Descriptor("application/vnd.oci.image.layer.v1.tar", sha256(b"never pushed"), 12)
    async with RegistryClient(settings) as client:
        with pytest.raises(ImageError, match=missing.digest) as e:
            await client.download_blob(
                ref(registry.host, "exists/blob:v1"), missing, tmp_path / "x"
            )
    assert not isinstance(e.value, NotFoundError)


@pytest.mark.parametrize("how", ["same-size", "longer"])
async def test_tampered_blob_is_rejected_and_deleted(
    fresh_registry: RegistryServer, settings: RegistrySettings, tmp_path: Path, how: str
) -> None:
    img = push_image(fresh_registry.url, "t/app", "v1", [tar_layer({"f": os.urandom(50_000)})], {})
    digest = img.layer_digests[0]
    stored = fresh_registry.blob_path(digest)
    data = bytearray(stored.read_bytes())
    if how == "same-size":
        data[len(data) // 2] ^= 0xFF
    else:
        data += b"extra bytes"
    stored.write_bytes(bytes(data))
    r = ref(fresh_registry.host, "t/app:v1")
    dest = tmp_path / "layer"
    async with RegistryClient(settings) as client:
        resolved = await client.resolve(r)
        with pytest.raises(ImageError) as e:
            await client.download_blob(r, resolved.manifest.layers[0], dest)
    assert digest in str(e.value)
    assert not dest.exists()


async def test_tampered_config_and_manifest(
    fresh_registry: RegistryServer, settings: RegistrySettings
) -> None:
    img = push_image(fresh_registry.url, "t/cfg", "v1", [tar_layer({"f": b"1"})], {})
    r = ref(fresh_registry.host, "t/cfg:v1")
    cfg_path = fresh_registry.blob_path(img.config_digest)
    cfg_path.write_bytes(cfg_path.read_bytes().replace(b"amd64", b"arm64"))
    async with RegistryClient(settings) as client:
        resolved = await client.resolve(r)
        with pytest.raises(ImageError, match=img.config_digest):
            await client.fetch_blob_bytes(r, resolved.manifest.config, MAX_CONFIG_BYTES)
    # The manifest: the registry still announces the original digest for the tag.
    m_path = fresh_registry.blob_path(img.manifest_digest)
    m_path.write_bytes(m_path.read_bytes() + b"\n")
    async with RegistryClient(settings) as client:
        with pytest.raises(ImageError, match=img.manifest_digest):
            await client.resolve(r)
        with pytest.raises(ImageError, match=img.manifest_digest):
            await client.resolve(ref(fresh_registry.host, f"t/cfg@{img.manifest_digest}"))


def _blob_image(server: RegistryServer, repo: str, blob: bytes) -> Descriptor:
    digest = push_blob(server.url, repo, blob)
    return Descriptor("application/vnd.oci.image.layer.v1.tar", digest, len(blob))


async def test_registry_dies_mid_download_then_later_pull_resumes(
    fresh_registry: RegistryServer, settings: RegistrySettings, tmp_path: Path
) -> None:
    blob = os.urandom(32 << 20)
    desc = _blob_image(fresh_registry, "big/blob", blob)
    r = ref(fresh_registry.host, "big/blob:v1")
    dest = tmp_path / "partial"
    seen: list[int] = []

    def stop_after_first_chunk(done: int, size: int) -> None:
        seen.append(done)
        if done > 0 and fresh_registry.running:
            fresh_registry.stop()

    async with RegistryClient(settings, retries=2, backoff=0.01) as client:
        with pytest.raises(NetworkError) as e:
            await client.download_blob(r, desc, dest, stop_after_first_chunk)
    msg = str(e.value)
    assert fresh_registry.host in msg and desc.digest in msg and "resumes" in msg
    kept = dest.stat().st_size
    assert 0 < kept < len(blob)
    assert dest.read_bytes() == blob[:kept]

    fresh_registry.start()
    ranges: list[str | None] = []
    received: list[int] = []

    async def record(request: httpx.Request) -> None:
        ranges.append(request.headers.get("range"))

    async with RegistryClient(settings, event_hooks={"request": [record]}) as client:
        await client.download_blob(r, desc, dest, lambda done, size: received.append(done))
    assert ranges == [f"bytes={kept}-"]
    assert received[0] == kept and received[-1] == len(blob)
    assert dest.read_bytes() == blob


async def test_resume_from_partial_and_restart_on_corrupt_partial(
    registry: RegistryServer, settings: RegistrySettings, tmp_path: Path
) -> None:
    blob = os.urandom(3 << 20)
    desc = _blob_image(registry, "resume/blob", blob)
    r = ref(registry.host, "resume/blob:v1")
    ranges: list[str | None] = []

    async def record(request: httpx.Request) -> None:
        ranges.append(request.headers.get("range"))

    async with RegistryClient(settings, event_hooks={"request": [record]}) as client:
        good = tmp_path / "good"
        good.write_bytes(blob[:1_000_000])
        await client.download_blob(r, desc, good)
        assert good.read_bytes() == blob and ranges == ["bytes=1000000-"]

        ranges.clear()  # a partial file that is not a prefix of the blob: retried from scratch
        bad = tmp_path / "bad"
        bad.write_bytes(b"\0" * 1_000_000)
        await client.download_blob(r, desc, bad)
        assert bad.read_bytes() == blob and ranges == ["bytes=1000000-", None]

        ranges.clear()  # already complete: verified, no request at all
        await client.download_blob(r, desc, good)
        assert ranges == []


async def test_concurrent_downloads_are_bounded(
    registry: RegistryServer, settings: RegistrySettings, tmp_path: Path
) -> None:
    descs = [_blob_image(registry, "conc/blobs", os.urandom(1 << 20)) for _ in range(6)]
    r = ref(registry.host, "conc/blobs:v1")
    active = peak = 0

    def progress(done: int, size: int) -> None:
        nonlocal active, peak
        if done == 0:
            active += 1
            peak = max(peak, active)
        if done == size:
            active -= 1

    async with RegistryClient(settings, max_concurrency=2) as client:
        await asyncio.gather(
            *(client.download_blob(r, d, tmp_path / str(i), progress) for i, d in enumerate(descs))
        )
    assert peak == 2


# --- TLS + token registry ---------------------------------------------------------------------
def write_config(home: Path, text: str) -> HutchPaths:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(text)
    return HutchPaths(home)


def tls_settings(
    tls: TlsRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, extra: str = "",
    docker: dict[str, Any] | None = None,
) -> RegistrySettings:  # fmt: skip
    docker_dir = tmp_path / "docker"
    docker_dir.mkdir(exist_ok=True)
    if docker is not None:
        (docker_dir / "config.json").write_text(json.dumps(docker))
    monkeypatch.setenv("DOCKER_CONFIG", str(docker_dir))
    paths = write_config(
        tmp_path / "home",
        f'[registries."{tls.host}"]\nca_file = "{tls.ca_file}"\n{extra}',
    )
    return RegistrySettings.load(paths)


@pytest.fixture(scope="module")
def secure_images(tls_registry: TlsRegistry) -> dict[str, PushedImage]:
    out = {}
    for repo in ("private/one", "private/two"):
        layers = [tar_layer({"a": os.urandom(10_000)}), tar_layer({"b": os.urandom(10_000)})]
        out[repo] = push_image(
            tls_registry.url, repo, "v1", layers, {}, auth=tls_registry.auth,
            verify=tls_registry.tls.client_context(),
        )  # fmt: skip
    return out


async def test_tls_token_pull_with_hutch_config_caches_tokens_per_scope(
    tls_registry: TlsRegistry,
    secure_images: dict[str, PushedImage],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pw = tmp_path / "password"
    pw.write_text(tls_registry.password + "\n")
    settings = tls_settings(
        tls_registry, tmp_path, monkeypatch,
        extra=f'username = "{tls_registry.username}"\npassword_file = "{pw}"\n',
    )  # fmt: skip
    hits = tls_registry.tokens.hits
    hits.clear()
    async with RegistryClient(settings) as client:
        for repo, img in secure_images.items():
            r = ref(tls_registry.host, f"{repo}:v1")
            paths = await pull_all(client, r, tmp_path)  # manifest, config, 2 layers at once
            assert [p.read_bytes() for p in paths] == img.layer_blobs
            await pull_all(client, r, tmp_path)  # again: the cached tokens serve
    assert [(h.method, h.user, h.scopes) for h in hits] == [
        ("GET", tls_registry.username, (f"repository:{repo}:pull",)) for repo in secure_images
    ]


async def test_tls_wrong_password_is_unauthorized(
    tls_registry: TlsRegistry,
    secure_images: dict[str, PushedImage],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = tls_settings(
        tls_registry, tmp_path, monkeypatch, extra='username = "hutch"\npassword = "wrong"\n'
    )
    async with RegistryClient(settings) as client:
        with pytest.raises(UnauthorizedError) as e:
            await client.resolve(ref(tls_registry.host, "private/one:v1"))
    assert tls_registry.host in str(e.value) and "hutch" in str(e.value)


async def test_tls_anonymous_is_unauthorized(
    tls_registry: TlsRegistry,
    secure_images: dict[str, PushedImage],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = tls_settings(tls_registry, tmp_path, monkeypatch)
    async with RegistryClient(settings) as client:
        with pytest.raises(UnauthorizedError, match="requires authentication") as e:
            await client.resolve(ref(tls_registry.host, "private/one:v1"))
    assert "username" in e.value.hint


async def test_tls_without_ca_is_network_error_naming_ca_file(
    tls_registry: TlsRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    paths = write_config(
        tmp_path / "home", f'[registries."{tls_registry.host}"]\ninsecure = false\n'
    )
    async with RegistryClient(RegistrySettings.load(paths)) as client:
        with pytest.raises(NetworkError) as e:
            await client.resolve(ref(tls_registry.host, "private/one:v1"))
    assert tls_registry.host in str(e.value)
    assert "ca_file" in e.value.hint and "config.toml" in e.value.hint


@pytest.mark.parametrize("kind", ["auth", "username", "identitytoken"])
async def test_tls_credentials_from_docker_config(
    tls_registry: TlsRegistry,
    secure_images: dict[str, PushedImage],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    user, pw = tls_registry.auth
    entry = {
        "auth": {"auth": base64.b64encode(f"{user}:{pw}".encode()).decode()},
        "username": {"username": user, "password": pw},
        "identitytoken": {"identitytoken": tls_registry.tokens.identity_token},
    }[kind]
    docker = {"auths": {f"https://{tls_registry.host}": entry}}
    settings = tls_settings(tls_registry, tmp_path, monkeypatch, docker=docker)
    tls_registry.tokens.hits.clear()
    async with RegistryClient(settings) as client:
        paths = await pull_all(client, ref(tls_registry.host, "private/two:v1"), tmp_path)
    assert [p.read_bytes() for p in paths] == secure_images["private/two"].layer_blobs
    methods = [h.method for h in tls_registry.tokens.hits]
    assert methods == (["POST"] if kind == "identitytoken" else ["GET"])


async def test_tls_access_token_field_and_expiry_refetch(
    tls_registry: TlsRegistry,
    secure_images: dict[str, PushedImage],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``access_token`` answers work; a token past its ``expires_in`` is fetched anew."""
    settings = tls_settings(
        tls_registry, tmp_path, monkeypatch,
        extra=f'username = "{tls_registry.username}"\npassword = "{tls_registry.password}"\n',
    )  # fmt: skip
    tokens = tls_registry.tokens
    monkeypatch.setattr(tokens, "token_field", "access_token")
    monkeypatch.setattr(tokens, "expires_in", 2)
    tokens.hits.clear()
    r = ref(tls_registry.host, "private/one:v1")
    async with RegistryClient(settings) as client:
        await client.resolve(r)
        await client.resolve(r)
        assert len(tokens.hits) == 1
        await asyncio.sleep(1.85)  # our cache keeps a token for 90 % of expires_in
        await client.resolve(r)
    assert len(tokens.hits) == 2
