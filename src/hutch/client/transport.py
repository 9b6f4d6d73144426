"""HTTP and WebSocket plumbing of the remote client: addresses, the token, retries, error mapping.

* REST goes through one :class:`httpx.AsyncClient` (over a Unix socket with
  ``httpx.AsyncHTTPTransport(uds=…)``); WebSocket streams through the ``websockets`` library.
* An error body from the server is re-raised as the same :mod:`hutch.errors` class.
* No server answering is :class:`~hutch.errors.ConnectionError` (naming the address and how to
  start one); a deadline is :class:`~hutch.errors.TimeoutError`.
* Only idempotent requests (GET, DELETE, HEAD) are retried, and only when the connection failed:
  :data:`RETRIES` more times, backing off :data:`BACKOFF` × 3ⁿ seconds.
"""

from __future__ import annotations

import asyncio
import builtins
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from hutch.errors import ConnectionError, HutchError, ParseError, TimeoutError
from hutch.paths import HutchPaths
from hutch.server.wire import MAX_MESSAGE, error_from_body

DEFAULT_TIMEOUT = 30.0
RETRIES = 3
BACKOFF = 0.1
IDEMPOTENT = frozenset({"GET", "DELETE", "HEAD"})
#: Marks "use the client's default read timeout".
DEFAULT: Any = object()

START_HINT = (
    "Start a server with `hutch serve` (it listens on HUTCH_HOME/hutch.sock; "
    "`hutch serve --listen 127.0.0.1:PORT` for TCP), or check the address given to connect()."
)


@dataclass(frozen=True)
class Address:
    """Where a server is: ``url`` as the user wrote it (normalised), and how to reach it."""

    url: str
    uds: str | None  # the Unix socket path, or None for TCP
    http_base: str  # base URL of REST requests
    ws_base: str  # base URL of WebSocket streams

    @property
    def tcp(self) -> bool:
        return self.uds is None


def parse_url(url: str | None) -> Address:
    """``unix:///PATH`` (None: the default home's socket), ``http(s)://HOST:PORT``,
    ``tcp://HOST:PORT`` or ``HOST:PORT``."""
    if url is None:
        url = f"unix://{HutchPaths.default().server_socket}"
    text = url.strip()
    if text.startswith("unix:") or text.startswith("/"):
        path = text.removeprefix("unix:").removeprefix("//") if text.startswith("unix:") else text
        if not path.startswith("/"):
            raise ParseError(
                f"hutch server address {url!r}: the socket path must be absolute",
                hint="e.g. unix:///home/me/.local/share/hutch/hutch.sock",
            )
        return Address(f"unix://{path}", path, "http://hutch", "ws://hutch")
    if "://" not in text:
        text = "http://" + text
    scheme, _, rest = text.partition("://")
    if scheme == "tcp":
        scheme = "http"
    if scheme not in ("http", "https"):
        raise ParseError(
            f"hutch server address {url!r}: unknown scheme {scheme!r}",
            hint="Use unix:///PATH or http://HOST:PORT.",
        )
    try:
        parts = urlsplit(f"{scheme}://{rest}")
        port = parts.port
    except ValueError as e:
        raise ParseError(f"hutch server address {url!r}: {e}") from None
    if not parts.hostname or port is None or parts.path not in ("", "/"):
        raise ParseError(
            f"hutch server address {url!r} must be {scheme}://HOST:PORT",
            hint="e.g. http://127.0.0.1:8080",
        )
    base = f"{scheme}://{parts.netloc}"
    ws = ("wss" if scheme == "https" else "ws") + f"://{parts.netloc}"
    return Address(base, None, base, ws)


def default_token(address: Address) -> str | None:
    """On TCP, the token in the default home's ``server.token`` (if this user can read it)."""
    if not address.tcp:
        return None
    path = HutchPaths.default().server_token
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return text.splitlines()[0].strip() if text else None


def quote_id(text: str) -> str:
    return quote(text, safe="")


class Transport:
    """One server connection pool (REST) plus WebSocket streams, sharing address and token."""

    def __init__(self, address: Address, *, token: str | None, timeout: float) -> None:
        self.address = address
        self.token = token
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        transport = httpx.AsyncHTTPTransport(uds=address.uds) if address.uds else None
        self.http = httpx.AsyncClient(
            base_url=address.http_base,
            transport=transport,
            headers=headers,
            timeout=httpx.Timeout(timeout),
            trust_env=False,  # a local daemon: never through an HTTP proxy from the environment
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    # --- errors ---------------------------------------------------------------------------
    def unreachable(self, e: BaseException) -> ConnectionError:
        why = str(e) or type(e).__name__
        return ConnectionError(
            f"no hutch server answers at {self.address.url} ({why})", hint=START_HINT
        )

    def dropped(self, e: BaseException, what: str) -> ConnectionError:
        return ConnectionError(
            f"the hutch server at {self.address.url} dropped the connection during {what} "
            f"({str(e) or type(e).__name__})",
            hint="The server may have been stopped or restarted; check it and retry.",
        )

    def error_from(self, status: int, content: bytes) -> HutchError:
        try:
            body = json.loads(content)
        except ValueError:
            text = content.decode(errors="replace").strip()[:200]
            return HutchError(
                f"the hutch server at {self.address.url} answered HTTP {status}: {text}"
            )
        return error_from_body(body, status)

    # --- REST -----------------------------------------------------------------------------
    def _timeout(self, read: float | None) -> httpx.Timeout:
        if read is DEFAULT:
            return httpx.Timeout(self.timeout)
        return httpx.Timeout(self.timeout, read=read)

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        read_timeout: float | None = DEFAULT,
    ) -> httpx.Response:
        """Send a request; a 4xx/5xx answer raises the hutch error it carries."""
        attempts = 1 + (RETRIES if method in IDEMPOTENT else 0)
        what = f"{method} {path}"
        for attempt in range(attempts):
            try:
                response = await self.http.request(
                    method, path, json=json, params=params, timeout=self._timeout(read_timeout)
                )
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                if attempt + 1 < attempts:
                    await asyncio.sleep(BACKOFF * 3**attempt)
                    continue
                raise self.unreachable(e) from None
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
                if attempt + 1 < attempts:
                    await asyncio.sleep(BACKOFF * 3**attempt)
                    continue
                raise self.dropped(e, what) from None
            except httpx.TimeoutException:
                limit = self.timeout if read_timeout is DEFAULT else read_timeout
                raise TimeoutError(
                    f"the hutch server at {self.address.url} did not answer {what} "
                    f"within {limit:g} s",
                    hint="Pass a larger timeout to hutch.connect(), or check the server's load.",
                ) from None
            if response.status_code >= 400:
                raise self.error_from(response.status_code, response.content)
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    async def json_lines(
        self, method: str, path: str, *, json: Any = None
    ) -> AsyncIterator[dict[str, Any]]:
        """A streamed NDJSON answer, one object per line (not retried)."""
        import json as json_mod

        try:
            async with self.http.stream(
                method, path, json=json, timeout=self._timeout(None)
            ) as response:
                if response.status_code >= 400:
                    raise self.error_from(response.status_code, await response.aread())
                async for text in response.aiter_lines():
                    if text.strip():
                        yield json_mod.loads(text)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise self.unreachable(e) from None
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
            raise self.dropped(e, f"{method} {path}") from None

    async def stream_bytes(
        self, path: str, *, params: Mapping[str, Any] | None = None
    ) -> AsyncIterator[bytes]:
        """A streamed ``GET`` answer's body, chunk by chunk (not retried)."""
        try:
            async with self.http.stream(
                "GET", path, params=params, timeout=self._timeout(None)
            ) as response:
                if response.status_code >= 400:
                    raise self.error_from(response.status_code, await response.aread())
                async for chunk in response.aiter_bytes():
                    if chunk:
                        yield chunk
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise self.unreachable(e) from None
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
            raise self.dropped(e, f"GET {path}") from None

    async def upload(
        self, path: str, content: AsyncIterator[bytes], *, params: Mapping[str, Any] | None = None
    ) -> httpx.Response:
        """``PUT`` a streamed body (chunked; not retried: the stream cannot be replayed)."""
        try:
            response = await self.http.put(
                path, content=content, params=params, timeout=self._timeout(None)
            )
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise self.unreachable(e) from None
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
            raise self.dropped(e, f"PUT {path}") from None
        if response.status_code >= 400:
            raise self.error_from(response.status_code, response.content)
        return response

    # --- WebSocket ------------------------------------------------------------------------
    async def websocket(self, path: str) -> Any:
        """An open ``websockets`` client connection to ``path``."""
        from websockets.asyncio.client import connect, unix_connect
        from websockets.exceptions import InvalidHandshake, InvalidStatus

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        options: dict[str, Any] = {
            "additional_headers": headers,
            "max_size": MAX_MESSAGE,
            "compression": None,
            "open_timeout": self.timeout,
            "proxy": None,
        }
        try:
            if self.address.uds is not None:
                return await unix_connect(
                    self.address.uds, f"{self.address.ws_base}{path}", **options
                )
            return await connect(f"{self.address.ws_base}{path}", **options)
        except InvalidStatus as e:
            raise self.error_from(e.response.status_code, e.response.body or b"") from None
        except (OSError, builtins.TimeoutError, InvalidHandshake) as e:
            raise self.unreachable(e) from None


__all__ = [
    "DEFAULT_TIMEOUT",
    "Address",
    "Transport",
    "default_token",
    "parse_url",
    "quote_id",
]
