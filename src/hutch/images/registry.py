"""Async client for the OCI distribution API: resolve a reference, fetch and download blobs.

Why hand-rolled rather than python-dxf or oras-py (see the field notes): python-dxf verifies
digests but refuses auth over plain HTTP and crashes on manifests without ``mediaType``; oras-py
checks no digests, does no platform selection and holds one token per client. What a pull needs is
small enough to own: one ``httpx.AsyncClient`` per registry, bearer tokens per scope, streamed
hashing, resumable downloads.

Design decisions:

- **Nothing unverified is returned.** Manifests are checked against the pinned digest, against the
  registry's ``Docker-Content-Digest`` header, and (for a platform manifest picked from an index)
  against the index entry's digest *and* size. Blobs are hashed while they stream and checked
  against the descriptor's size and digest; a blob that fails is deleted, so a cache built on
  :meth:`RegistryClient.download_blob` is never poisoned. A server sending more bytes than the
  descriptor announces is cut off at the descriptor's size.
- **Downloads resume.** ``dest`` is a partial file: whatever is already there is re-hashed and the
  rest asked for with ``Range: bytes=N-`` (a 200 answer means the server ignored the range, and the
  download restarts from 0). Transient failures (5xx, 429, 408, connection errors, a connection
  dropped mid-body) are retried with exponential backoff and jitter, honouring ``Retry-After`` up
  to a minute; an attempt that made progress resets the failure count. When the retries run out
  the partial file stays, so a later pull continues where this one stopped.
- **Auth like Docker.** Requests go out anonymously first. A ``401`` with a ``Bearer`` challenge
  gets a token from the realm (basic auth to the token server when credentials are known, or the
  OAuth refresh-token grant for an identity token) that is cached per (registry, scope) until its
  ``expires_in``; a ``Basic`` challenge gets the configured credentials. Once a registry's scheme is
  known, later requests present credentials up front. Concurrent requests for one scope share a
  single token fetch.
- **Redirects are followed by hand** (blob downloads are commonly redirected to object storage), so
  the registry's ``Authorization`` header is only ever sent to the registry's own origin.
- **Transport per registry.** ``https://`` with the system/certifi roots plus the registry's
  ``ca_file``; plain ``http://`` for registries marked ``insecure`` (loopback registries by
  default). TLS failures are not retried: they become a :class:`NetworkError` whose hint names
  ``ca_file``/``insecure`` and the config file to put them in.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import logging
import random
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import certifi
import httpx

from hutch.errors import (
    ConfigError,
    HutchError,
    ImageError,
    NetworkError,
    NotFoundError,
    StorageError,
    UnauthorizedError,
)
from hutch.images.credentials import (
    LOOPBACK_HOSTS,
    RegistryEntry,
    RegistrySettings,
    normalize_registry,
)
from hutch.images.oci import (
    INDEX_TYPES,
    MANIFEST_ACCEPT,
    MANIFEST_TYPES,
    MAX_MANIFEST_BYTES,
    Descriptor,
    Index,
    Manifest,
    Platform,
    check_digest,
    load_json,
    media_type_of,
    new_hasher,
    verify_bytes,
)
from hutch.images.reference import ImageReference
from hutch.paths import HutchPaths

log = logging.getLogger("hutch.images.registry")

T = TypeVar("T")

USER_AGENT = "hutch/0.1"
MAX_REDIRECTS = 5
MAX_RETRY_AFTER = 60.0
MAX_BACKOFF = 30.0
DEFAULT_TOKEN_TTL = 60
MAX_TOKEN_RESPONSE = 1 << 20
MAX_ERROR_BODY = 16 << 10
_REHASH_CHUNK = 4 << 20
_REDIRECTS = frozenset({301, 302, 303, 307, 308})

ProgressCallback = Callable[[int, int], None]
EventHooks = Mapping[str, Sequence[Callable[..., Any]]]


# --- WWW-Authenticate -----------------------------------------------------------------------
@dataclass(frozen=True)
class Challenge:
    """One challenge of a ``WWW-Authenticate`` header: lower-case scheme and its parameters."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)
    token68: str | None = None


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TOKEN68 = re.compile(r"[A-Za-z0-9._~+/-]+=*(?=\s*(?:,|$))")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"', re.DOTALL)
_SPACE = re.compile(r"[ \t]*")
_SEPARATORS = re.compile(r"[ \t,]*")
_BARE = re.compile(r"[^\s,]*")


def _skip(rx: re.Pattern[str], text: str, pos: int) -> int:
    """End of ``rx`` (a pattern that can match empty) matched at ``pos``."""
    m = rx.match(text, pos)
    return m.end() if m else pos


def parse_www_authenticate(header: str) -> list[Challenge]:
    """Parse ``WWW-Authenticate`` (RFC 9110 §11.6.1), several challenges and quoted commas included.

    ``Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull,push"``
    → ``[Challenge("bearer", {"realm": …, "service": "reg", "scope": "repository:a/b:pull,push"})]``.
    Malformed input yields what could be parsed, never an exception.
    """
    out: list[Challenge] = []
    pos, n = 0, len(header)
    while pos < n:
        pos = _skip(_SEPARATORS, header, pos)
        m = _TOKEN.match(header, pos)
        if m is None:
            break
        scheme = m.group().lower()
        pos = m.end()
        params: dict[str, str] = {}
        token68: str | None = None
        after = _skip(_SPACE, header, pos)
        if after > pos and (t68 := _TOKEN68.match(header, after)):
            token68, pos = t68.group(), t68.end()
        while token68 is None:
            save = pos
            p = _skip(_SEPARATORS, header, pos)
            name = _TOKEN.match(header, p)
            if name is None:
                pos = p
                break
            p = _skip(_SPACE, header, name.end())
            if p >= n or header[p] != "=":
                pos = save  # a bare token: the next challenge's scheme
                break
            p = _skip(_SPACE, header, p + 1)
            if (q := _QUOTED.match(header, p)) is not None:
                value = re.sub(r"\\(.)", r"\1", q.group(1))
                p = q.end()
            else:
                end = _skip(_BARE, header, p)
                value, p = header[p:end], end
            params[name.group().lower()] = value
            pos = p
        out.append(Challenge(scheme, params, token68))
    return out


# --- results --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResolvedImage:
    """A verified platform manifest. ``platform`` is the index entry's platform when the reference
    named an index, else the platform asked for (a single manifest does not state one; the image
    config's ``architecture`` does)."""

    reference: ImageReference
    #: Digest of the platform-specific image manifest.
    manifest_digest: str
    manifest_bytes: bytes
    manifest: Manifest
    #: Digest of the index / manifest list the reference pointed at, if it did.
    index_digest: str | None
    platform: Platform


class _Transient(Exception):
    """A failure worth retrying (5xx, 429, dropped connection …)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Restart(Exception):
    """The partial download is unusable; start again from byte 0 (does not count as a failure)."""


@dataclass
class _Registry:
    host: str  # host[:port] the API answers at (ref.api_host)
    key: str  # the config key (ref.registry, normalised)
    base: httpx.URL
    entry: RegistryEntry
    client: httpx.AsyncClient
    scheme: Literal["bearer", "basic"] | None = None
    realm: str | None = None
    service: str | None = None


@dataclass
class _Partial:
    offset: int
    hasher: Any
    progressed: bool = False


# --- the client -----------------------------------------------------------------------------
class RegistryClient:
    """One pull's connection to one or more registries. Use ``async with``.

    ``transport`` and ``event_hooks`` are passed to every ``httpx.AsyncClient`` (tests use them to
    mock or observe requests); ``backoff`` is the first retry delay in seconds.
    """

    def __init__(
        self,
        settings: RegistrySettings | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 4,
        max_concurrency: int = 4,
        backoff: float = 0.5,
        transport: httpx.AsyncBaseTransport | None = None,
        event_hooks: EventHooks | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self._settings = (
            settings if settings is not None else RegistrySettings.load(HutchPaths.default())
        )
        self._timeout = timeout
        self._retries = max(0, retries)
        self._backoff = backoff
        self._max_concurrency = max_concurrency
        self._transport = transport
        self._event_hooks = {k: list(v) for k, v in (event_hooks or {}).items()}
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self._registries: dict[str, _Registry] = {}
        self._registry_lock = asyncio.Lock()
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}
        self._token_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._closed = False

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        regs, self._registries = list(self._registries.values()), {}
        for reg in regs:
            await reg.client.aclose()

    # --- public API -------------------------------------------------------------------------
    async def resolve(self, ref: ImageReference, platform: Platform | None = None) -> ResolvedImage:
        """The verified image manifest ``ref`` names, for ``platform`` (default: the host's)."""
        want = platform or Platform.host()
        reg = await self._registry(ref)
        body, ctype, announced = await self._get_manifest(reg, ref, ref.selector)
        digest = ref.digest or _digest_of(body, "sha256")
        if ref.digest:
            verify_bytes(body, check_digest(ref.digest, "pinned digest"), f"manifest of {ref}")
        _check_announced(body, announced, ref)
        doc = load_json(body, f"manifest of {ref}")
        media_type = media_type_of(doc, ctype)
        index_digest: str | None = None
        chosen = want
        depth = 0
        while media_type in INDEX_TYPES:
            if depth >= 2:
                raise ImageError(
                    f"{ref} nests image indexes more than one level deep ({digest})",
                    hint="hutch follows an index and at most one nested index.",
                )
            index_digest = index_digest or digest
            desc = Index.parse(doc, media_type).select(want)
            chosen = desc.platform or want
            what = f"manifest for {chosen} of {ref}"
            if desc.size > MAX_MANIFEST_BYTES:
                raise ImageError(f"{what} ({desc.digest}) is {desc.size} bytes; too large")
            body, ctype, announced = await self._get_manifest(reg, ref, desc.digest)
            if len(body) != desc.size:
                raise ImageError(
                    f"{what} {desc.digest} is {len(body)} bytes, but the index says {desc.size}",
                    hint="The registry served corrupted or tampered data; nothing was cached.",
                )
            verify_bytes(body, desc.digest, what)
            _check_announced(body, announced, ref)
            digest = desc.digest
            doc = load_json(body, what)
            media_type = media_type_of(doc, ctype or desc.media_type)
            depth += 1
        if media_type not in MANIFEST_TYPES:
            raise ImageError(
                f"{ref} is a {media_type!r}, not an image manifest or index",
                hint="hutch pulls OCI and Docker schema 2 container images.",
            )
        manifest = Manifest.parse(doc, media_type)
        log.debug("resolved %s → %s (index %s, %s)", ref, digest, index_digest, chosen)
        return ResolvedImage(ref, digest, body, manifest, index_digest, chosen)

    async def fetch_blob_bytes(self, ref: ImageReference, desc: Descriptor, limit: int) -> bytes:
        """A small blob (an image config) in memory, size- and digest-checked."""
        if desc.size > limit:
            raise ImageError(
                f"blob {desc.digest} of {ref} is {desc.size} bytes, more than the {limit} allowed"
            )
        reg = await self._registry(ref)
        url = self._blob_url(reg, ref, desc.digest)
        what = f"blob {desc.digest} of {ref}"

        async def op() -> bytes:
            resp = await self._open(reg, ref, url, {"Accept-Encoding": "identity"})
            try:
                await self._check_status(resp, reg, ref, "blob", what)
                data = await _read_limited(resp, desc.size, what)
            finally:
                await resp.aclose()
            if len(data) < desc.size:
                raise _Transient(f"the connection closed after {len(data)} of {desc.size} bytes")
            return data

        data = await self._retrying(reg, f"fetch {what}", op)
        verify_bytes(data, desc.digest, f"blob of {ref}")
        return data

    async def download_blob(
        self,
        ref: ImageReference,
        desc: Descriptor,
        dest: Path,
        progress: ProgressCallback | None = None,
    ) -> None:
        """Stream blob ``desc`` into ``dest``, resuming what is there; size- and digest-checked.

        On a digest or size failure ``dest`` is deleted and :class:`ImageError` raised; when the
        registry stays unreachable, :class:`NetworkError` is raised and ``dest`` kept for a resume.
        """
        reg = await self._registry(ref)
        async with self._semaphore:
            await self._download(reg, ref, desc, Path(dest), progress)

    # --- registries and transport -----------------------------------------------------------
    async def _registry(self, ref: ImageReference) -> _Registry:
        if self._closed:
            raise RuntimeError("RegistryClient is closed")
        host = ref.api_host
        async with self._registry_lock:
            reg = self._registries.get(host)
            if reg is None:
                # Credential helpers run a subprocess: keep them off the event loop.
                entry = await asyncio.to_thread(self._settings.for_registry, ref.registry)
                scheme = "http" if entry.insecure else "https"
                reg = _Registry(
                    host=host,
                    key=normalize_registry(ref.registry),
                    base=httpx.URL(f"{scheme}://{host}"),
                    entry=entry,
                    client=self._make_client(entry, ref.registry),
                )
                self._registries[host] = reg
        return reg

    def _make_client(self, entry: RegistryEntry, key: str) -> httpx.AsyncClient:
        verify: ssl.SSLContext | bool = True
        if entry.ca_file is not None:
            try:
                ctx = ssl.create_default_context(cafile=certifi.where())
                ctx.load_verify_locations(cafile=str(entry.ca_file))
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(
                    f'{self._config_name()}: [registries."{key}"] ca_file {str(entry.ca_file)!r} '
                    f"is not a usable PEM certificate bundle: {e}",
                    hint="Point ca_file at the PEM file of the registry's CA certificate.",
                ) from e
            verify = ctx
        return httpx.AsyncClient(
            verify=verify,
            timeout=httpx.Timeout(self._timeout, pool=None),
            limits=httpx.Limits(max_connections=self._max_concurrency + 4),
            headers={"User-Agent": USER_AGENT},
            follow_redirects=False,
            transport=self._transport,
            event_hooks=self._event_hooks,
        )

    def _config_name(self) -> str:
        return str(self._settings.config_file or "HUTCH_HOME/config.toml")

    @staticmethod
    def _blob_url(reg: _Registry, ref: ImageReference, digest: str) -> httpx.URL:
        return reg.base.join(f"/v2/{ref.repository}/blobs/{digest}")

    async def _send(
        self, reg: _Registry, url: httpx.URL, headers: Mapping[str, str], auth: str | None
    ) -> httpx.Response:
        """GET ``url`` following redirects; ``Authorization`` only ever goes to the registry."""
        for _ in range(MAX_REDIRECTS + 1):
            h = dict(headers)
            if auth and _same_origin(url, reg.base):
                h["Authorization"] = auth
            resp = await reg.client.send(
                reg.client.build_request("GET", url, headers=h), stream=True
            )
            location = resp.headers.get("location")
            if resp.status_code in _REDIRECTS and location:
                await resp.aclose()
                url = url.join(location)
                if url.scheme not in ("http", "https"):
                    raise ImageError(f"registry {reg.host} redirected to unsupported URL {url}")
                continue
            return resp
        raise ImageError(f"registry {reg.host} redirected more than {MAX_REDIRECTS} times ({url})")

    async def _open(
        self, reg: _Registry, ref: ImageReference, url: httpx.URL, headers: Mapping[str, str]
    ) -> httpx.Response:
        """GET with authentication: anonymous, then as the registry's challenge asks."""
        scope = f"repository:{ref.repository}:pull"
        for _ in range(2):
            auth = await self._authorization(reg, scope)
            resp = await self._send(reg, url, headers, auth)
            if resp.status_code != 401:
                return resp
            header = resp.headers.get("www-authenticate", "")
            await resp.aclose()
            challenges = parse_www_authenticate(header)
            bearer = next(
                (c for c in challenges if c.scheme == "bearer" and "realm" in c.params), None
            )
            basic = next((c for c in challenges if c.scheme == "basic"), None)
            if bearer is not None:
                reg.scheme, reg.realm = "bearer", bearer.params["realm"]
                reg.service = bearer.params.get("service")
                self._tokens.pop((reg.host, scope), None)  # rejected or missing: fetch anew
            elif basic is not None:
                if not (reg.entry.username and reg.entry.password is not None):
                    raise self._unauthorized(reg, ref)
                if reg.scheme == "basic":
                    break  # the credentials were presented and rejected
                reg.scheme = "basic"
            else:
                raise UnauthorizedError(
                    f"registry {reg.host} asks for authentication hutch does not support: "
                    f"{header[:200]!r}",
                    hint="hutch speaks the Bearer token and Basic schemes of the OCI distribution API.",
                )
        raise self._unauthorized(reg, ref)

    def _unauthorized(self, reg: _Registry, ref: ImageReference) -> UnauthorizedError:
        section = f'[registries."{reg.key}"] in {self._config_name()}'
        if reg.entry.has_credentials:
            who = reg.entry.username or "the identity token"
            return UnauthorizedError(
                f"registry {reg.host} rejected the credentials of {who} for {ref.repository}",
                hint=f"Check username/password in {section} or your docker login; the account may "
                f"also lack pull access to {ref.repository}.",
            )
        return UnauthorizedError(
            f"registry {reg.host} requires authentication to pull {ref.repository}",
            hint=f"Set username and password (or password_file) in {section}, or `docker login "
            f"{reg.key}`. Some registries answer this way for a repository that does not exist.",
        )

    async def _authorization(self, reg: _Registry, scope: str) -> str | None:
        if reg.scheme == "basic":
            return _basic(reg.entry.username or "", reg.entry.password or "")
        if reg.scheme != "bearer":
            return None
        key = (reg.host, scope)
        token = self._cached_token(key)
        if token is None:
            lock = self._token_locks.setdefault(key, asyncio.Lock())
            async with lock:  # concurrent requests share one token fetch
                token = self._cached_token(key)
                if token is None:
                    token, ttl = await self._fetch_token(reg, scope)
                    # Refresh a little before the server's expiry.
                    self._tokens[key] = (token, time.monotonic() + ttl * 0.9)
        return f"Bearer {token}"

    def _cached_token(self, key: tuple[str, str]) -> str | None:
        hit = self._tokens.get(key)
        if hit is None or hit[1] <= time.monotonic():
            return None
        return hit[0]

    async def _fetch_token(self, reg: _Registry, scope: str) -> tuple[str, float]:
        assert reg.realm is not None
        realm = httpx.URL(reg.realm)
        entry = reg.entry
        if realm.scheme not in ("http", "https") or not realm.host:
            raise UnauthorizedError(
                f"registry {reg.host} named an unusable token realm {reg.realm!r}"
            )
        if (
            realm.scheme == "http"
            and entry.has_credentials
            and not entry.insecure
            and _url_host(realm) not in LOOPBACK_HOSTS
        ):
            raise UnauthorizedError(
                f"registry {reg.host} asks for credentials at {reg.realm}, over plain HTTP",
                hint=f'hutch will not send them unencrypted; set insecure = true under [registries."{reg.key}"] if you trust the network.',
            )
        log.debug("fetching a token for %s scope %s from %s", reg.host, scope, realm)
        if entry.identity_token:
            form = {
                "grant_type": "refresh_token",
                "refresh_token": entry.identity_token,
                "client_id": "hutch",
                "scope": scope,
            }
            if reg.service:
                form["service"] = reg.service
            req = reg.client.build_request("POST", realm, data=form)
        else:
            url = realm
            if reg.service:
                url = url.copy_add_param("service", reg.service)
            url = url.copy_add_param("scope", scope)
            headers = {}
            if entry.username and entry.password is not None:
                headers["Authorization"] = _basic(entry.username, entry.password)
            req = reg.client.build_request("GET", url, headers=headers)
        resp = await reg.client.send(req, stream=True)
        try:
            code = resp.status_code
            if code in (401, 403):
                raise self._unauthorized(reg, _ref_for_scope(reg, scope))
            if code in (408, 429) or code >= 500:
                raise _Transient(f"token server answered HTTP {code}", _retry_after(resp))
            if code != 200:
                raise UnauthorizedError(
                    f"the token server {reg.realm} of registry {reg.host} answered HTTP {code}"
                )
            body = await _read_limited(resp, MAX_TOKEN_RESPONSE, "token response")
        finally:
            await resp.aclose()
        try:
            doc = load_json(body, "token response", MAX_TOKEN_RESPONSE)
        except ImageError as e:
            raise UnauthorizedError(
                f"the token server {reg.realm} of registry {reg.host} sent an unreadable answer: "
                f"{e.message}"
            ) from None
        token = doc.get("token") or doc.get("access_token")
        if not isinstance(token, str) or not token:
            raise UnauthorizedError(
                f"the token server {reg.realm} of registry {reg.host} sent no token"
            )
        ttl = doc.get("expires_in")
        if not isinstance(ttl, int | float) or isinstance(ttl, bool) or ttl <= 0:
            ttl = DEFAULT_TOKEN_TTL
        return token, float(ttl)

    # --- statuses, retries ------------------------------------------------------------------
    async def _check_status(
        self,
        resp: httpx.Response,
        reg: _Registry,
        ref: ImageReference,
        kind: Literal["manifest", "blob"],
        what: str,
    ) -> None:
        code = resp.status_code
        if 200 <= code < 300:
            return
        if code in (408, 429) or code >= 500:
            raise _Transient(f"answered HTTP {code} {resp.reason_phrase}", _retry_after(resp))
        detail = await _error_detail(resp)
        if code == 404 and kind == "manifest":
            raise NotFoundError(
                f"image {ref.familiar()} not found in registry {reg.host}"
                + (f" ({detail})" if detail else ""),
                hint="Check the repository name and tag (registries are case- and typo-sensitive).",
            )
        if code == 404:
            raise ImageError(
                f"{what} not found in registry {reg.host}" + (f" ({detail})" if detail else ""),
                hint="The manifest names a blob the registry does not have; the image is broken there.",
            )
        if code == 403:
            raise UnauthorizedError(
                f"registry {reg.host} denied access to {ref.repository}"
                + (f" ({detail})" if detail else ""),
                hint="The account (or anonymous access) has no pull permission for this repository.",
            )
        if code == 400 and "HTTP request to an HTTPS server" in detail:
            raise NetworkError(
                f"registry {reg.host} speaks HTTPS, but hutch used plain HTTP",
                hint=f'Set insecure = false (and ca_file if it uses a private CA) under [registries."{reg.key}"] in {self._config_name()}.',
            )
        raise ImageError(
            f"registry {reg.host} answered HTTP {code} {resp.reason_phrase} for {what}"
            + (f": {detail}" if detail else "")
        )

    def _delay(self, failures: int, retry_after: float | None) -> float:
        base = min(MAX_BACKOFF, self._backoff * float(2 ** (failures - 1)))
        delay = base / 2 + random.uniform(0, base / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
        return delay

    def _transient(self, exc: Exception, reg: _Registry) -> _Transient:
        """The retryable form of ``exc``; raises :class:`NetworkError` for ones not worth it."""
        if isinstance(exc, _Transient):
            return exc
        assert isinstance(exc, httpx.TransportError)
        tls = _tls_error(exc)
        if tls is not None:
            section = f'[registries."{reg.key}"] in {self._config_name()}'
            if isinstance(tls, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY" in str(tls):
                raise NetworkError(
                    f"TLS certificate verification failed for registry {reg.host}: "
                    f"{getattr(tls, 'verify_message', '') or tls}",
                    hint=f'If the registry uses a private CA, set ca_file = "/path/to/ca.pem" under '
                    f"{section}; for a registry without TLS set insecure = true there.",
                ) from exc
            raise NetworkError(
                f"TLS handshake with registry {reg.host} failed: {tls}",
                hint=f"If the registry serves plain HTTP, set insecure = true under {section}; "
                "otherwise set ca_file to its CA certificate.",
            ) from exc
        if isinstance(exc, httpx.UnsupportedProtocol):
            raise NetworkError(f"cannot talk to registry {reg.host}: {exc}") from exc
        return _Transient(_describe(exc))

    async def _retrying(self, reg: _Registry, what: str, op: Callable[[], Awaitable[T]]) -> T:
        failures = 0
        while True:
            try:
                return await op()
            except (_Transient, httpx.TransportError) as e:
                t = self._transient(e, reg)
                failures += 1
                if failures > self._retries:
                    raise NetworkError(
                        f"could not {what}: registry {reg.host} {t} "
                        f"(tried {failures} time{'s' if failures > 1 else ''})",
                        hint="Check that the registry is reachable (network, proxy, VPN) and retry.",
                    ) from e
                delay = self._delay(failures, t.retry_after)
                log.info("%s: registry %s %s; retrying in %.1fs", what, reg.host, t, delay)
                await asyncio.sleep(delay)

    # --- manifests --------------------------------------------------------------------------
    async def _get_manifest(
        self, reg: _Registry, ref: ImageReference, selector: str
    ) -> tuple[bytes, str | None, str | None]:
        """Body, Content-Type (no parameters) and ``Docker-Content-Digest`` of one manifest."""
        url = reg.base.join(f"/v2/{ref.repository}/manifests/{selector}")
        headers = {"Accept": ", ".join(MANIFEST_ACCEPT), "Accept-Encoding": "identity"}
        what = f"manifest {selector} of {ref.familiar()}"

        async def op() -> tuple[bytes, str | None, str | None]:
            resp = await self._open(reg, ref, url, headers)
            try:
                await self._check_status(resp, reg, ref, "manifest", what)
                body = await _read_limited(resp, MAX_MANIFEST_BYTES, what)
            finally:
                await resp.aclose()
            ctype = resp.headers.get("content-type", "").split(";", 1)[0].strip() or None
            return body, ctype, resp.headers.get("docker-content-digest")

        return await self._retrying(reg, f"fetch the {what}", op)

    # --- blob downloads ---------------------------------------------------------------------
    async def _download(
        self,
        reg: _Registry,
        ref: ImageReference,
        desc: Descriptor,
        dest: Path,
        progress: ProgressCallback | None,
    ) -> None:
        digest, size = desc.digest, desc.size
        new_hasher(check_digest(digest, "blob digest"))
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            st = await asyncio.to_thread(_rehash, dest, digest, size)
        except OSError as e:
            raise StorageError(f"cannot read the partial download {dest}: {e.strerror}") from e
        resumed_from = st.offset
        if st.offset:
            log.debug("resuming %s at %d of %d bytes", digest, st.offset, size)
        restarts = failures = 0
        attempted = False
        while True:
            if st.offset == size:
                got = f"{digest.split(':', 1)[0]}:{st.hasher.hexdigest()}"
                if got == digest:
                    if progress is not None and not attempted:
                        progress(size, size)  # complete before we started: report it once
                    return
                if resumed_from and restarts == 0:
                    # The partial file left by an earlier attempt was bad; try once from scratch.
                    log.warning(
                        "resumed download of %s failed its digest check; restarting", digest
                    )
                    restarts += 1
                    resumed_from = 0
                    st = _reset(dest, digest)
                    continue
                _unlink(dest)
                raise ImageError(
                    f"blob {digest} of {ref.familiar()} from registry {reg.host} failed its digest "
                    f"check (content hashes to {got}); the download was deleted",
                    hint="The registry served corrupted or tampered data; nothing was cached.",
                )
            st.progressed = False
            attempted = True
            try:
                await self._download_attempt(reg, ref, desc, dest, st, progress)
            except _Restart:
                restarts += 1
                if restarts > 3:
                    raise ImageError(
                        f"registry {reg.host} keeps answering range requests for {digest} wrongly"
                    ) from None
                st = _reset(dest, digest)
            except (_Transient, httpx.TransportError) as e:
                t = self._transient(e, reg)
                failures = 1 if st.progressed else failures + 1
                if failures > self._retries:
                    raise NetworkError(
                        f"could not download blob {digest} of {ref.familiar()} from registry "
                        f"{reg.host}: {t}; {st.offset} of {size} bytes are kept in {dest}",
                        hint="Check that the registry is reachable (network, proxy, VPN); "
                        "a later pull resumes the download where it stopped.",
                    ) from e
                delay = self._delay(failures, t.retry_after)
                log.info(
                    "downloading %s from %s: %s at %d/%d bytes; retrying in %.1fs",
                    digest,
                    reg.host,
                    t,
                    st.offset,
                    size,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _download_attempt(
        self,
        reg: _Registry,
        ref: ImageReference,
        desc: Descriptor,
        dest: Path,
        st: _Partial,
        progress: ProgressCallback | None,
    ) -> None:
        size = desc.size
        what = f"blob {desc.digest} of {ref.familiar()}"
        headers = {"Accept-Encoding": "identity"}
        if st.offset:
            headers["Range"] = f"bytes={st.offset}-"
        resp = await self._open(reg, ref, self._blob_url(reg, ref, desc.digest), headers)
        try:
            if resp.status_code == 416 and st.offset:
                raise _Restart
            await self._check_status(resp, reg, ref, "blob", what)
            if resp.status_code == 206:
                if _content_range_start(resp.headers.get("content-range")) != st.offset:
                    raise _Restart
            elif st.offset:
                log.debug("registry %s ignored the range request for %s", reg.host, desc.digest)
                st.offset, st.hasher = 0, new_hasher(desc.digest)
                _truncate(dest)
            length = resp.headers.get("content-length")
            if length and length.isdigit() and st.offset + int(length) > size:
                _unlink(dest)
                raise _oversize(reg, what, size)
            if progress is not None:
                progress(st.offset, size)
            try:
                f = dest.open("ab")
            except OSError as e:
                raise StorageError(f"cannot write {dest}: {e.strerror}") from e
            with f:
                async for chunk in resp.aiter_bytes():
                    if st.offset + len(chunk) > size:
                        f.close()
                        _unlink(dest)
                        raise _oversize(reg, what, size)
                    try:
                        f.write(chunk)
                    except OSError as e:
                        raise StorageError(f"cannot write {dest}: {e.strerror}") from e
                    st.hasher.update(chunk)
                    st.offset += len(chunk)
                    st.progressed = True
                    if progress is not None:
                        progress(st.offset, size)
            if st.offset < size:
                raise _Transient(f"closed the connection after {st.offset} of {size} bytes")
        finally:
            await resp.aclose()


# --- helpers --------------------------------------------------------------------------------
def _digest_of(data: bytes, algorithm: str) -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def _check_announced(body: bytes, announced: str | None, ref: ImageReference) -> None:
    """Compare the registry's ``Docker-Content-Digest`` with what the body hashes to."""
    if not announced:
        return
    announced = announced.strip()
    check_digest(announced, f"Docker-Content-Digest header for {ref}")
    got = _digest_of(body, announced.split(":", 1)[0])
    if got != announced:
        raise ImageError(
            f"manifest of {ref} does not match the digest the registry announced, {announced} "
            f"(content hashes to {got})",
            hint="The registry served corrupted or tampered data; nothing was cached.",
        )


def _basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def _same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


def _url_host(url: httpx.URL) -> str:
    return f"[{url.host}]" if ":" in url.host else url.host


def _ref_for_scope(reg: _Registry, scope: str) -> ImageReference:
    parts = scope.split(":")
    repo = parts[1] if len(parts) >= 3 else scope
    return ImageReference(registry=reg.key, repository=repo)


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, float(when.timestamp()) - time.time())


async def _read_limited(resp: httpx.Response, limit: int, what: str) -> bytes:
    length = resp.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise ImageError(f"{what} is {length} bytes, more than the {limit} expected")
    buf = bytearray()
    async for chunk in resp.aiter_bytes():
        buf += chunk
        if len(buf) > limit:
            raise ImageError(f"{what}: the registry sent more than the {limit} bytes expected")
    return bytes(buf)


async def _error_detail(resp: httpx.Response) -> str:
    """The registry's error codes and messages (``{"errors": [...]}``), or the start of the body."""
    try:
        body = await _read_limited(resp, MAX_ERROR_BODY, "error body")
    except (HutchError, httpx.HTTPError):
        return ""
    try:
        doc = load_json(body, "error body")
        errors = doc.get("errors")
        if isinstance(errors, list):
            parts = [
                f"{e.get('code', '')}: {e.get('message', '')}".strip(": ")
                for e in errors
                if isinstance(e, dict)
            ]
            return "; ".join(p for p in parts if p)[:300]
    except ImageError:
        pass
    return body.decode(errors="replace").strip()[:200]


def _tls_error(exc: BaseException) -> ssl.SSLError | None:
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _describe(exc: httpx.TransportError) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError):
        return f"is unreachable ({text})"
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
        return f"dropped the connection ({text})"
    return f"failed ({type(exc).__name__}: {text})"


def _content_range_start(value: str | None) -> int | None:
    m = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(?:\d+|\*)\s*", value or "")
    return int(m.group(1)) if m else None


def _oversize(reg: _Registry, what: str, size: int) -> ImageError:
    return ImageError(
        f"registry {reg.host} sent more than the {size} bytes the manifest gives for {what}; "
        "the download was deleted",
        hint="The registry served corrupted or tampered data; nothing was cached.",
    )


def _rehash(dest: Path, digest: str, size: int) -> _Partial:
    """Hash what an earlier attempt left in ``dest`` (a longer file is discarded)."""
    hasher = new_hasher(digest)
    try:
        have = dest.stat().st_size
    except FileNotFoundError:
        dest.touch()  # even an empty blob leaves its (verified) file behind
        return _Partial(0, hasher)
    if have > size:
        return _reset(dest, digest)
    done = 0
    with dest.open("rb") as f:
        while chunk := f.read(_REHASH_CHUNK):
            hasher.update(chunk)
            done += len(chunk)
    return _Partial(done, hasher)


def _reset(dest: Path, digest: str) -> _Partial:
    _truncate(dest)
    return _Partial(0, new_hasher(digest))


def _truncate(dest: Path) -> None:
    try:
        with dest.open("r+b") as f:
            f.truncate(0)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise StorageError(f"cannot truncate {dest}: {e.strerror}") from e


def _unlink(dest: Path) -> None:
    try:
        dest.unlink(missing_ok=True)
    except OSError as e:
        log.warning("could not delete %s: %s", dest, e)


__all__ = [
    "Challenge",
    "RegistryClient",
    "ResolvedImage",
    "parse_www_authenticate",
]
