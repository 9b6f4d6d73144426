"""Bearer-token authentication of ``hutch serve``.

On TCP every request except ``GET /health`` must carry ``Authorization: Bearer <token>``; the token
is compared in constant time (:func:`hmac.compare_digest`). A missing or wrong token is a 401 with
the usual error body (type ``UnauthorizedError``); a WebSocket handshake gets the same 401 as an
HTTP denial response. On the Unix socket no token is needed: the socket is mode 0600, so only its
owner can connect.

The token lives in ``HOME/server.token`` (or the ``--token-file``): made on first start with
:func:`secrets.token_urlsafe` (32 bytes of randomness) and written with mode 0600.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import secrets
import stat
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from hutch.errors import ConfigError, StorageError, UnauthorizedError

log = logging.getLogger("hutch.server")

#: Paths anyone who can reach the server may read (a liveness probe reveals nothing).
PUBLIC_PATHS = frozenset({"/health"})
TOKEN_BYTES = 32


def load_or_create_token(path: Path) -> str:
    """The token stored in ``path``; a new one (written 0600) if the file does not exist."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return read_token(path)
    except OSError as e:
        raise StorageError(
            f"cannot create the server token file {path}: {e.strerror}",
            hint="Make the hutch home writable, or pass --token-file PATH.",
        ) from e
    token = secrets.token_urlsafe(TOKEN_BYTES)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
    except OSError as e:
        with contextlib.suppress(OSError):
            path.unlink()
        raise StorageError(f"cannot write the server token file {path}: {e.strerror}") from e
    log.info("hutch serve: made a new token in %s", path)
    return token


def read_token(path: Path) -> str:
    """Read a token file (its first line). Warns if others may read it."""
    try:
        st = path.stat()
        text = path.read_text()
    except OSError as e:
        raise ConfigError(
            f"cannot read the token file {path}: {e.strerror}",
            hint="Check the path and its permissions (it should be mode 0600).",
        ) from e
    if stat.S_IMODE(st.st_mode) & 0o077:
        log.warning(
            "the token file %s is readable by other users (mode %o); `chmod 600 %s`",
            path,
            stat.S_IMODE(st.st_mode),
            path,
        )
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if len(token) < 16:
        raise ConfigError(
            f"the token file {path} holds no token of at least 16 characters",
            hint="Delete it to have `hutch serve` make a new one, or write a long random token.",
        )
    return token


def token_matches(header: bytes | None, token: bytes) -> bool:
    """Whether an ``Authorization`` header value is ``Bearer <token>`` (constant-time compare)."""
    if not header:
        return False
    scheme, _, given = header.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(given.strip(), token)


class BearerAuth:
    """ASGI middleware: requests (HTTP and WebSocket) must carry the bearer token."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if token_matches(header, self.token):
            await self.app(scope, receive, send)
            return
        from hutch.server.app import error_response

        error = UnauthorizedError(
            "missing or wrong bearer token" if header else "this server requires a bearer token",
            hint="Send `Authorization: Bearer <token>`; the token is in the server's token file "
            "(HUTCH_HOME/server.token unless --token-file). hutch.connect() reads it itself.",
        )
        response = error_response(error)
        response.headers["WWW-Authenticate"] = 'Bearer realm="hutch"'
        if scope["type"] == "websocket" and "websocket.http.response" not in scope.get(
            "extensions", {}
        ):
            await send({"type": "websocket.close", "code": 1008, "reason": "unauthorized"})
            return
        await response(scope, receive, send)


__all__ = ["BearerAuth", "load_or_create_token", "read_token", "token_matches"]
