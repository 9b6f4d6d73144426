"""RegistryClient behaviour a real registry won't show on demand, on httpx.MockTransport.

Redirects to object storage (no Authorization leaks), 5xx/429 retries, servers that ignore Range
requests, send too much or drop the connection mid-body, Basic auth, token edge cases, and
lying manifests. The real-registry tests are in tests/registry/.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from hutch.errors import ImageError, NetworkError, NotFoundError, UnauthorizedError
from hutch.images.credentials import RegistrySettings
from hutch.images.oci import OCI_INDEX, OCI_MANIFEST, Descriptor, Platform
from hutch.images.reference import ImageReference
from hutch.images.registry import RegistryClient
from hutch.paths import HutchPaths

Handler = Callable[[httpx.Request], Any]
REF = ImageReference.parse("reg.test/team/app:v1")
LAYER = "application/vnd.oci.image.layer.v1.tar"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def settings_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toml: str = ""
) -> RegistrySettings:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(toml)
    return RegistrySettings.load(HutchPaths(home))


def client(
    settings: RegistrySettings,
    handler: Handler,
    requests: list[httpx.Request] | None = None,
    **kw: Any,
) -> RegistryClient:
    async def wrapped(request: httpx.Request) -> httpx.Response:
        if requests is not None:
            requests.append(request)
        resp = handler(request)
        if hasattr(resp, "__await__"):
            resp = await resp
        return resp  # type: ignore[no-any-return]

    return RegistryClient(settings, transport=httpx.MockTransport(wrapped), backoff=0.001, **kw)


def manifest_doc(layers: list[bytes]) -> bytes:
    config = b"{}"
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha(config),
                "size": 2,
            },
            "layers": [{"mediaType": LAYER, "digest": sha(b), "size": len(b)} for b in layers],
        }
    ).encode()


async def dropping(data: bytes) -> AsyncIterator[bytes]:
    yield data
    raise httpx.ReadError("connection reset by peer")


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RegistrySettings:
    return settings_with(tmp_path, monkeypatch)


# --- redirects and auth ----------------------------------------------------------------------
async def test_blob_redirect_to_storage_does_not_leak_authorization(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_with(
        tmp_path, monkeypatch, '[registries."reg.test"]\nusername = "u"\npassword = "p"\n'
    )
    blob = os.urandom(1000)
    basic = "Basic " + base64.b64encode(b"u:p").decode()

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.host == "reg.test":
            if req.headers.get("authorization") != basic:
                return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="reg"'})
            if req.url.path.startswith("/v2/team/app/blobs/"):
                return httpx.Response(307, headers={"Location": "https://storage.test/b?sig=x"})
        if req.url.host == "storage.test":
            return httpx.Response(200, content=blob)
        return httpx.Response(500)

    reqs: list[httpx.Request] = []
    async with client(settings, handler, reqs) as c:
        await c.download_blob(REF, Descriptor(LAYER, sha(blob), len(blob)), tmp_path / "b")
    assert (tmp_path / "b").read_bytes() == blob
    assert [(r.url.host, "authorization" in r.headers) for r in reqs] == [
        ("reg.test", False),  # anonymous first
        ("reg.test", True),  # Basic challenge answered
        ("storage.test", False),  # the redirect target never sees the credentials
    ]
    assert reqs[0].url.scheme == "https"


async def test_basic_challenge_without_credentials_and_403(settings: RegistrySettings) -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        if "denied" in req.url.path:
            return httpx.Response(403, json={"errors": [{"code": "DENIED", "message": "no"}]})
        return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="x"'})

    async with client(settings, handler) as c:
        with pytest.raises(UnauthorizedError, match="requires authentication"):
            await c.resolve(REF)
        with pytest.raises(UnauthorizedError, match="denied access"):
            await c.resolve(ImageReference.parse("reg.test/denied/app"))


async def test_unsupported_challenge(settings: RegistrySettings) -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(401, headers={"WWW-Authenticate": "Negotiate abc=="})

    async with client(settings, handler) as c:
        with pytest.raises(UnauthorizedError, match="does not support"):
            await c.resolve(REF)


def token_registry(
    body: bytes,
    token_answer: Callable[[httpx.Request], httpx.Response],
    realm: str = "https://auth.test/token",
) -> Handler:
    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.host == "auth.test":
            return token_answer(req)
        if req.headers.get("authorization") != "Bearer T1":
            return httpx.Response(
                401,
                headers={
                    "WWW-Authenticate": f'Bearer realm="{realm}",service="reg",scope="repository:team/app:pull"'
                },
            )
        if "/manifests/" in req.url.path:
            return httpx.Response(200, content=body, headers={"Content-Type": OCI_MANIFEST})
        return httpx.Response(200, content=b"{}")

    return handler


async def test_concurrent_requests_share_one_token_and_access_token_field(
    settings: RegistrySettings,
) -> None:
    import asyncio

    body = manifest_doc([b"a"])
    token_reqs: list[httpx.Request] = []

    async def answer(req: httpx.Request) -> httpx.Response:
        token_reqs.append(req)
        await asyncio.sleep(0.05)
        return httpx.Response(200, json={"access_token": "T1"})  # no expires_in: 60 s default

    async with client(settings, token_registry(body, answer)) as c:  # type: ignore[arg-type]
        resolved = await c.resolve(REF)
        cfg = resolved.manifest.config
        results = await asyncio.gather(*(c.fetch_blob_bytes(REF, cfg, 100) for _ in range(5)))
    assert results == [b"{}"] * 5
    assert len(token_reqs) == 1
    q = token_reqs[0].url.params
    assert (q["service"], q["scope"]) == ("reg", "repository:team/app:pull")
    assert "authorization" not in token_reqs[0].headers  # anonymous token


async def test_identity_token_uses_refresh_grant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docker = tmp_path / "docker"
    docker.mkdir()
    (docker / "config.json").write_text(
        json.dumps({"auths": {"reg.test": {"identitytoken": "REFRESH"}}})
    )
    monkeypatch.setenv("DOCKER_CONFIG", str(docker))
    settings = RegistrySettings.load(HutchPaths(tmp_path / "home"))
    forms: list[bytes] = []

    def answer(req: httpx.Request) -> httpx.Response:
        assert req.method == "POST"
        forms.append(req.content)
        return httpx.Response(200, json={"access_token": "T1", "expires_in": 300})

    async with client(settings, token_registry(manifest_doc([]), answer)) as c:
        await c.resolve(REF)
    form = dict(p.split("=", 1) for p in forms[0].decode().split("&"))
    assert form["grant_type"] == "refresh_token" and form["refresh_token"] == "REFRESH"
    assert form["service"] == "reg"


async def test_wrong_credentials_at_token_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_with(
        tmp_path, monkeypatch, '[registries."reg.test"]\nusername = "u"\npassword = "bad"\n'
    )

    def answer(req: httpx.Request) -> httpx.Response:
        assert req.headers["authorization"] == "Basic " + base64.b64encode(b"u:bad").decode()
        return httpx.Response(401, json={"details": "incorrect username or password"})

    async with client(settings, token_registry(manifest_doc([]), answer)) as c:
        with pytest.raises(UnauthorizedError, match=r"reg\.test rejected the credentials of u"):
            await c.resolve(REF)


async def test_credentials_not_sent_to_plain_http_realm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_with(
        tmp_path, monkeypatch, '[registries."reg.test"]\nusername = "u"\npassword = "p"\n'
    )
    sent: list[httpx.Request] = []

    def answer(req: httpx.Request) -> httpx.Response:
        sent.append(req)
        return httpx.Response(200, json={"token": "T1"})

    handler = token_registry(manifest_doc([]), answer, realm="http://auth.test/token")
    async with client(settings, handler) as c:
        with pytest.raises(UnauthorizedError, match="plain HTTP"):
            await c.resolve(REF)
    assert sent == []


# --- retries and odd servers -----------------------------------------------------------------
async def test_5xx_and_429_are_retried(settings: RegistrySettings) -> None:
    body = manifest_doc([b"x"])
    answers = iter(
        [
            httpx.Response(503),
            httpx.Response(429, headers={"Retry-After": "0"}),
            httpx.Response(
                200,
                content=body,
                headers={"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": sha(body)},
            ),
        ]
    )
    reqs: list[httpx.Request] = []
    async with client(settings, lambda req: next(answers), reqs) as c:
        resolved = await c.resolve(REF)
    assert resolved.manifest_digest == sha(body) and len(reqs) == 3


async def test_retries_exhausted_keep_the_partial_file(
    settings: RegistrySettings, tmp_path: Path
) -> None:
    blob = os.urandom(4000)
    calls = 0

    def handler(req: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return httpx.Response(
                200, content=dropping(blob[:1500]), headers={"Content-Length": "4000"}
            )
        return httpx.Response(502)

    dest = tmp_path / "blob"
    async with client(settings, handler, retries=3) as c:
        with pytest.raises(NetworkError) as e:
            await c.download_blob(REF, Descriptor(LAYER, sha(blob), len(blob)), dest)
    assert "reg.test" in str(e.value) and sha(blob) in str(e.value)
    assert "resumes" in e.value.hint
    assert dest.read_bytes() == blob[:1500]
    assert calls == 1 + 3  # progress on the first attempt resets the count: 3 more tries


async def test_dropped_connection_resumes_with_range(
    settings: RegistrySettings, tmp_path: Path
) -> None:
    blob = os.urandom(10_000)
    ranges: list[str | None] = []

    def handler(req: httpx.Request) -> httpx.Response:
        ranges.append(req.headers.get("range"))
        if len(ranges) == 1:
            return httpx.Response(
                200, content=dropping(blob[:6000]), headers={"Content-Length": "10000"}
            )
        return httpx.Response(
            206, content=blob[6000:], headers={"Content-Range": "bytes 6000-9999/10000"}
        )

    progress: list[int] = []
    async with client(settings, handler) as c:
        await c.download_blob(
            REF,
            Descriptor(LAYER, sha(blob), len(blob)),
            tmp_path / "b",
            lambda d, s: progress.append(d),
        )
    assert (tmp_path / "b").read_bytes() == blob
    assert ranges == [None, "bytes=6000-"]
    assert progress[0] == 0 and 6000 in progress and progress[-1] == 10_000


@pytest.mark.parametrize(
    "response",
    [
        lambda blob: httpx.Response(200, content=blob),  # Range ignored: the whole blob
        lambda blob: httpx.Response(
            206, content=blob[10:], headers={"Content-Range": "bytes 10-99/100"}
        ),
        lambda blob: httpx.Response(416),
    ],
    ids=["200", "wrong-content-range", "416"],
)
async def test_range_not_honoured_restarts_from_zero(
    settings: RegistrySettings, tmp_path: Path, response: Callable[[bytes], httpx.Response]
) -> None:
    blob = os.urandom(100)
    dest = tmp_path / "b"
    dest.write_bytes(blob[:40])

    def handler(req: httpx.Request) -> httpx.Response:
        return response(blob) if req.headers.get("range") else httpx.Response(200, content=blob)

    async with client(settings, handler) as c:
        await c.download_blob(REF, Descriptor(LAYER, sha(blob), len(blob)), dest)
    assert dest.read_bytes() == blob


@pytest.mark.parametrize("chunked", [False, True])
async def test_more_bytes_than_the_descriptor_is_rejected(
    settings: RegistrySettings, tmp_path: Path, chunked: bool
) -> None:
    blob = os.urandom(1000)

    async def stream() -> AsyncIterator[bytes]:
        for _ in range(1000):  # "endless": the client must stop reading
            yield blob

    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=stream() if chunked else blob + b"more")

    dest = tmp_path / "b"
    async with client(settings, handler) as c:
        with pytest.raises(ImageError, match=sha(blob)):
            await c.download_blob(REF, Descriptor(LAYER, sha(blob), len(blob)), dest)
    assert not dest.exists()


async def test_404_blob_is_image_error_404_manifest_not_found(
    settings: RegistrySettings, tmp_path: Path
) -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(
            404, json={"errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown"}]}
        )

    async with client(settings, handler) as c:
        with pytest.raises(ImageError, match="BLOB_UNKNOWN") as e:
            await c.download_blob(REF, Descriptor(LAYER, sha(b"x"), 1), tmp_path / "b")
        assert not isinstance(e.value, NotFoundError)
        with pytest.raises(
            NotFoundError, match=r"reg\.test/team/app:v1 not found in registry reg\.test"
        ):
            await c.resolve(REF)


# --- lying manifests ---------------------------------------------------------------------------
async def test_docker_content_digest_mismatch(settings: RegistrySettings) -> None:
    body = manifest_doc([])
    liar = sha(b"something else")

    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"Docker-Content-Digest": liar})

    async with client(settings, handler) as c:
        with pytest.raises(ImageError, match=liar):
            await c.resolve(REF)


async def test_index_entry_size_and_digest_are_checked(settings: RegistrySettings) -> None:
    child = manifest_doc([b"amd"])
    for size, served in ((len(child) + 1, child), (len(child), child.replace(b"2", b"3", 1))):
        index = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    {"mediaType": OCI_MANIFEST, "digest": sha(child), "size": size,
                     "platform": {"os": "linux", "architecture": "amd64"}}
                ],
            }
        ).encode()  # fmt: skip

        def handler(
            req: httpx.Request, index: bytes = index, served: bytes = served
        ) -> httpx.Response:
            return httpx.Response(200, content=served if sha(child) in req.url.path else index)

        async with client(settings, handler) as c:
            with pytest.raises(ImageError, match=sha(child)):
                await c.resolve(REF, Platform("linux", "amd64"))


async def test_oversized_and_foreign_manifests(settings: RegistrySettings) -> None:
    def big(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b" " * (5 << 20))

    def artifact(req: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, content=json.dumps({"mediaType": "application/vnd.example+json"}).encode()
        )

    for handler, pattern in ((big, "more than"), (artifact, "not an image manifest")):
        async with client(settings, handler) as c:
            with pytest.raises(ImageError, match=pattern):
                await c.resolve(REF)


async def test_insecure_and_loopback_use_plain_http(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_with(
        tmp_path, monkeypatch, '[registries."lan.test:5000"]\ninsecure = true\n'
    )
    seen: list[str] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(f"{req.url.scheme}://{req.url.netloc.decode()}")
        return httpx.Response(404)

    async with client(settings, handler) as c:
        for text in (
            "lan.test:5000/a",
            "localhost:5000/a",
            "[::1]:5000/a",
            "other.test/a",
            "busybox",
        ):
            with pytest.raises(NotFoundError):
                await c.resolve(ImageReference.parse(text))
    assert seen == [
        "http://lan.test:5000",
        "http://localhost:5000",
        "http://[::1]:5000",
        "https://other.test",
        "https://registry-1.docker.io",
    ]
