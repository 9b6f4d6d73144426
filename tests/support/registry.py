"""A real OCI registry for tests: Debian's ``docker-registry`` (distribution 2.8), plain or TLS + token.

- :class:`RegistryServer` runs ``docker-registry serve CONFIG`` with a config written here (never
  ``/etc/docker/registry/config.yml``, which turns on htpasswd) on a free 127.0.0.1 port, storage
  in a temp folder. ``stop()``/``start()`` restart it on the same port and storage, for "registry
  died mid-pull" tests; ``.storage`` is the filesystem root, so tests can tamper with blobs at
  :meth:`RegistryServer.blob_path`.
- :func:`make_tls_files` makes a throw-away CA (with ``cryptography``), a server certificate for
  127.0.0.1/localhost and a token-signing certificate.
- :class:`TokenServer` is a tiny token service (``http.server`` over TLS in a thread) issuing RS256
  JWTs with an ``x5c`` header holding the signing certificate; distribution 2.8 verifies that chain
  against its ``rootcertbundle`` (the CA). It requires the basic-auth user/password (or, POSTed, an
  identity token for the OAuth refresh-token grant) and grants the scopes asked for; anonymous
  requests get a token granting nothing. Every request is recorded in ``.hits``.
- :func:`start_tls_registry` ties the three together into a :class:`TlsRegistry`.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DOCKER_REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
START_TIMEOUT = 10.0


def registry_available() -> bool:
    return os.access(DOCKER_REGISTRY, os.X_OK)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- TLS material ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path  # PEM; the client's ca_file and the registry's rootcertbundle
    server_cert: Path
    server_key: Path
    signing_cert: Path  # token-signing certificate (RSA, issued by the CA)
    signing_key: Path

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_cert))


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: Any) -> bytes:
    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def make_tls_files(folder: Path) -> TlsFiles:
    """A CA, a server cert for 127.0.0.1/localhost/::1 and an RSA token-signing cert, as PEM files."""
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(hours=1), now + dt.timedelta(days=2)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("hutch test CA"))
        .issuer_name(_name("hutch test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)

    def leaf(key: Any, cn: str, server: bool) -> x509.Certificate:
        b = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(aki, critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
        )
        if server:
            b = b.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.IPAddress(ipaddress.ip_address("::1")),
                    ]
                ),
                critical=False,
            ).add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
        return b.sign(ca_key, hashes.SHA256())

    server_key = ec.generate_private_key(ec.SECP256R1())
    signing_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    files = TlsFiles(
        ca_cert=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        signing_cert=folder / "signing.pem",
        signing_key=folder / "signing.key",
    )
    files.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(
        leaf(server_key, "127.0.0.1", True).public_bytes(serialization.Encoding.PEM)
    )
    files.server_key.write_bytes(_pem_key(server_key))
    files.signing_cert.write_bytes(
        leaf(signing_key, "hutch test token signer", False).public_bytes(serialization.Encoding.PEM)
    )
    files.signing_key.write_bytes(_pem_key(signing_key))
    for key in (files.server_key, files.signing_key):
        key.chmod(0o600)
    return files


# --- token server ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenHit:
    method: str  # GET (basic / anonymous) or POST (refresh-token grant)
    user: str | None  # None = anonymous or refused
    scopes: tuple[str, ...]
    status: int


@dataclass
class TokenServer:
    """A token service for distribution's ``auth: token``; see the module docstring."""

    tls: TlsFiles
    username: str
    password: str
    service: str = "hutch-test-registry"
    issuer: str = "hutch-test-issuer"
    identity_token: str | None = None
    #: Field carrying the token in GET answers ("token" or "access_token"); POST uses access_token.
    token_field: str = "token"
    expires_in: int = 300
    hits: list[TokenHit] = field(default_factory=list)
    port: int = 0
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def realm(self) -> str:
        return f"https://127.0.0.1:{self.port}/token"

    def hits_for(self, scope: str) -> list[TokenHit]:
        return [h for h in self.hits if scope in h.scopes]

    def start(self) -> None:
        owner = self
        cert_der = x509.load_pem_x509_certificate(self.tls.signing_cert.read_bytes()).public_bytes(
            serialization.Encoding.DER
        )
        x5c = [base64.b64encode(cert_der).decode()]
        signing_key = self.tls.signing_key.read_bytes()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _reply(self, status: int, doc: dict[str, Any]) -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _issue(self, user: str | None, scopes: list[str], field_name: str) -> None:
                access = []
                for scope in scopes if user else []:
                    parts = scope.split(":")
                    if len(parts) == 3 and parts[0] == "repository":
                        access.append(
                            {"type": "repository", "name": parts[1], "actions": parts[2].split(",")}
                        )
                now = int(time.time())
                claims = {
                    "iss": owner.issuer,
                    "sub": user or "",
                    "aud": owner.service,
                    "exp": now + owner.expires_in,
                    "nbf": now - 10,
                    "iat": now,
                    "jti": secrets.token_hex(8),
                    "access": access,
                }
                token = jwt.encode(claims, signing_key, algorithm="RS256", headers={"x5c": x5c})
                self._reply(200, {field_name: token, "expires_in": owner.expires_in})

            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                scopes = [s for v in query.get("scope", []) for s in v.split(" ") if s]
                user = None
                auth = self.headers.get("Authorization", "")
                if auth:
                    try:
                        kind, _, b64 = auth.partition(" ")
                        name, _, pw = base64.b64decode(b64).decode().partition(":")
                    except ValueError:
                        kind, name, pw = "", "", ""
                    if kind.lower() != "basic" or (name, pw) != (owner.username, owner.password):
                        owner.hits.append(TokenHit("GET", None, tuple(scopes), 401))
                        self._reply(401, {"details": "incorrect username or password"})
                        return
                    user = name
                owner.hits.append(TokenHit("GET", user, tuple(scopes), 200))
                self._issue(user, scopes, owner.token_field)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = parse_qs(self.rfile.read(length).decode())
                scopes = [s for v in form.get("scope", []) for s in v.split(" ") if s]
                ok = (
                    form.get("grant_type") == ["refresh_token"]
                    and owner.identity_token is not None
                    and form.get("refresh_token") == [owner.identity_token]
                )
                if not ok:
                    owner.hits.append(TokenHit("POST", None, tuple(scopes), 401))
                    self._reply(401, {"error": "invalid_grant"})
                    return
                owner.hits.append(TokenHit("POST", owner.username, tuple(scopes), 200))
                self._issue(owner.username, scopes, "access_token")

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.tls.server_cert, self.tls.server_key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        self.port = int(server.server_address[1])
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="token-server", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


# --- the registry ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenAuth:
    realm: str
    service: str
    issuer: str
    rootcertbundle: Path


class RegistryServer:
    """``docker-registry serve`` on 127.0.0.1:PORT with storage under ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        *,
        tls: TlsFiles | None = None,
        token: TokenAuth | None = None,
        port: int | None = None,
        binary: str = DOCKER_REGISTRY,
    ) -> None:
        self.workdir = workdir
        self.tls = tls
        self.token = token
        self.port = port or free_port()
        self.binary = binary
        self.storage = workdir / "storage"
        self.config_file = workdir / "registry.yml"
        self.log_file = workdir / "registry.log"
        self._secret = secrets.token_hex(16)  # upload-state HMAC key, stable across restarts
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def blob_path(self, digest: str) -> Path:
        """Where the filesystem driver keeps blob ``digest`` (manifests are blobs too)."""
        algo, hexdigest = digest.split(":", 1)
        return self.storage / "docker/registry/v2/blobs" / algo / hexdigest[:2] / hexdigest / "data"

    def _config(self) -> str:
        q = json.dumps  # a JSON string is a valid YAML double-quoted scalar
        lines = [
            "version: 0.1",
            "log:",
            "  level: error",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {q(str(self.storage))}",
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f"  addr: {q(self.host)}",
            f"  secret: {q(self._secret)}",
        ]
        if self.tls:
            lines += [
                "  tls:",
                f"    certificate: {q(str(self.tls.server_cert))}",
                f"    key: {q(str(self.tls.server_key))}",
            ]
        lines += ["health:", "  storagedriver:", "    enabled: false"]
        if self.token:
            lines += [
                "auth:",
                "  token:",
                f"    realm: {q(self.token.realm)}",
                f"    service: {q(self.token.service)}",
                f"    issuer: {q(self.token.issuer)}",
                f"    rootcertbundle: {q(str(self.token.rootcertbundle))}",
            ]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = START_TIMEOUT) -> None:
        if self.running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(exist_ok=True)
        self.config_file.write_text(self._config())
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        with self.log_file.open("ab") as log:
            # setpriv: the registry dies with the test process, even when that is killed
            guard = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []
            self._proc = subprocess.Popen(
                [*guard, self.binary, "serve", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        verify: ssl.SSLContext | bool = self.tls.client_context() if self.tls else False
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"docker-registry exited with {self._proc.returncode}:\n{self.log_tail()}"
                )
            try:
                r = httpx.get(f"{self.url}/v2/", verify=verify, timeout=1.0)
                if r.status_code in (200, 401):
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"docker-registry did not answer on {self.url} within {timeout}s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.02)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> RegistryServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class TlsRegistry:
    """A TLS registry with token auth, its token server and the credentials it accepts."""

    server: RegistryServer
    tokens: TokenServer
    tls: TlsFiles
    username: str
    password: str

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def ca_file(self) -> Path:
        return self.tls.ca_cert

    @property
    def auth(self) -> tuple[str, str]:
        return (self.username, self.password)

    def stop(self) -> None:
        self.server.stop()
        self.tokens.stop()


def start_tls_registry(
    workdir: Path,
    *,
    username: str = "hutch",
    password: str = "correct horse",
    identity_token: str | None = "hutch-identity-token",
) -> TlsRegistry:
    tls = make_tls_files(workdir / "tls")
    tokens = TokenServer(tls, username, password, identity_token=identity_token)
    tokens.start()
    server = RegistryServer(
        workdir / "registry",
        tls=tls,
        token=TokenAuth(tokens.realm, tokens.service, tokens.issuer, tls.ca_cert),
    )
    try:
        server.start()
    except BaseException:
        tokens.stop()
        raise
    return TlsRegistry(server, tokens, tls, username, password)


__all__ = [
    "DOCKER_REGISTRY",
    "RegistryServer",
    "TlsFiles",
    "TlsRegistry",
    "TokenAuth",
    "TokenHit",
    "TokenServer",
    "free_port",
    "make_tls_files",
    "registry_available",
    "start_tls_registry",
]
