"""``hutch serve``: one :class:`hutch.Runtime` behind the HTTP API, under uvicorn.

**Where it listens.** By default on the Unix socket ``HOME/hutch.sock``, created with mode 0600 (it
is bound under ``umask 0o177``, so it never exists with a wider mode, not even for an instant; the
umask is process-wide, but in that instant it can only make other new files *more* private).
Only the socket's owner can connect, so no token is needed there. ``--listen HOST:PORT`` (or
``tcp://HOST:PORT``; IPv6 as ``[::1]:PORT``) listens on TCP instead, where every request needs the
bearer token (:mod:`hutch.server.auth`). ``--no-token`` is accepted on loopback addresses only:
binding any other address without a token is a :class:`~hutch.errors.ConfigError`.

**One owner.** A box's VM belongs to the process that started it, so the server is the owner of
every box started through it: it opens one runtime before serving and closes it after.

**Shutdown** (SIGTERM or SIGINT; a second SIGINT skips the waiting):

1. uvicorn stops accepting connections; idle keep-alive connections are closed.
2. Open WebSocket streams are closed with code 1012 (service restart) and their processes are
   killed; SSE streams and buffered execs get up to :data:`GRACE` seconds to finish, then their
   requests are cancelled and their processes killed.
3. The runtime is closed: every box this server started is stopped (guest processes get SIGTERM,
   then SIGKILL; the disk is kept) and recorded ``stopped``; boxes created with ``auto_remove`` are
   removed. Boxes that were only created stay ``created``. Any process can start them again.
4. The socket file is removed and the process exits with status 0.

If the server is killed with SIGKILL instead, its VMs die with it (``--pdeathsig``) and the next
runtime that opens the home marks its boxes ``stopped`` (``failed`` if they were starting).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from hutch.errors import ConfigError, ConflictError, ParseError, StorageError
from hutch.paths import HutchPaths

if TYPE_CHECKING:
    from hutch.runtime.pool import PoolSpec

log = logging.getLogger("hutch.server")

#: Seconds in-flight requests get to finish at shutdown before they are cancelled.
GRACE = 10
#: Longest Unix socket path (sun_path is 108 bytes with its NUL).
MAX_UNIX_PATH = 107
BACKLOG = 128


@dataclass(frozen=True)
class Listen:
    """Where a server listens: a Unix socket ``path``, or TCP ``host``:``port``."""

    kind: Literal["unix", "tcp"]
    path: Path | None = None
    host: str = ""
    port: int = 0

    @classmethod
    def unix(cls, path: Path | str) -> Listen:
        return cls("unix", path=Path(path).absolute())

    @property
    def url(self) -> str:
        """The address as ``hutch.connect()`` takes it."""
        if self.kind == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def loopback(self) -> bool:
        if self.kind == "unix":
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return self.url


def parse_listen(text: str) -> Listen:
    """``unix:///PATH``, ``HOST:PORT``, ``tcp://HOST:PORT`` or ``http://HOST:PORT``
    (IPv6 hosts in brackets: ``[::1]:8080``). ParseError otherwise."""
    hint = "Use unix:///path/to/hutch.sock, 127.0.0.1:8080 or tcp://[::1]:8080."
    text = text.strip()
    if text.startswith("unix:"):
        path = text.removeprefix("unix:").removeprefix("//")
        if not path.startswith("/"):
            raise ParseError(
                f"listen address {text!r}: the socket path must be absolute", hint=hint
            )
        return Listen.unix(path)
    if text.startswith("/"):
        return Listen.unix(text)
    if "://" in text:
        scheme, _, rest = text.partition("://")
        if scheme not in ("tcp", "http"):
            raise ParseError(f"listen address {text!r}: unknown scheme {scheme!r}", hint=hint)
        text = rest.rstrip("/")
    try:
        parts = urlsplit("//" + text)
        host, port = parts.hostname, parts.port
    except ValueError as e:
        raise ParseError(f"listen address {text!r}: {e}", hint=hint) from None
    if not host or port is None or parts.path or parts.query or parts.username:
        raise ParseError(f"listen address {text!r} must be HOST:PORT", hint=hint)
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ParseError(
                f"listen address {text!r}: {host!r} is not an IP address (or localhost)",
                hint=hint,
            ) from None
    return Listen("tcp", host=host, port=port)


# --- sockets --------------------------------------------------------------------------------
def _socket_in_use(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def bind_unix(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600 from the moment it exists. A stale socket
    file (no server behind it) is replaced; a live one is a ConflictError."""
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise ConfigError(
            f"the socket path {path} is longer than {MAX_UNIX_PATH} bytes",
            hint="Pass a shorter one: --listen unix:///tmp/hutch.sock (or a shorter HUTCH_HOME).",
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        st = path.lstat()
    except FileNotFoundError:
        pass
    except OSError as e:
        raise StorageError(f"cannot use the socket path {path}: {e.strerror}") from e
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(
                f"{path} exists and is not a socket", hint="Remove it, or listen elsewhere."
            )
        if _socket_in_use(path):
            raise ConflictError(
                f"a server already listens on unix://{path}",
                hint="Stop it first, or listen elsewhere (--listen unix:///OTHER/PATH).",
            )
        path.unlink(missing_ok=True)  # stale: its server is gone
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as e:
        sock.close()
        raise StorageError(f"cannot bind the socket {path}: {e.strerror}") from e
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


def bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        cls = ConflictError if e.errno == 98 else ConfigError  # EADDRINUSE
        raise cls(
            f"cannot listen on {where}: {e.strerror}",
            hint="Pick another port, or stop whatever listens there.",
        ) from e
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


# --- the server -----------------------------------------------------------------------------
class _DenialNoise(logging.Filter):
    """uvicorn's WebSocket protocol (websockets-sansio) logs "returned without completing
    handshake" at ERROR after a handshake that was answered with an HTTP denial response (our
    401/404 with an error body), although that is a completed exchange. Drop that one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "ASGI callable returned without completing handshake."


_NOISE = _DenialNoise()


def resolve_token(
    listen: Listen, paths: HutchPaths, *, token_file: Path | None, require_token: bool
) -> str | None:
    """The token the server requires: none on a Unix socket; on TCP the token file's (made on
    first start). Refuses a tokenless non-loopback TCP address."""
    from hutch.server.auth import load_or_create_token, read_token

    if listen.kind == "unix":
        return None
    if not require_token:
        if not listen.loopback:
            raise ConfigError(
                f"refusing to listen on {listen.host}:{listen.port} without a token: "
                "anyone who can reach it could run code in your boxes",
                hint="Drop --no-token (the token is in HUTCH_HOME/server.token), or listen on a "
                "loopback address (127.0.0.1) or the Unix socket.",
            )
        log.warning("hutch serve: %s without a token: every local user can use it", listen.url)
        return None
    if token_file is not None:
        return read_token(token_file) if token_file.exists() else load_or_create_token(token_file)
    return load_or_create_token(paths.server_token)


async def serve(
    listen: Listen | str | None = None,
    *,
    home: Path | str | None = None,
    token_file: Path | None = None,
    require_token: bool = True,
    access_log: bool = False,
    on_ready: Callable[[Listen], None] | None = None,
    pools: Sequence[PoolSpec] = (),
    max_upload: int | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (see the module docstring for the shutdown sequence).

    Warm pools: config.toml's ``[pool]`` table applies (the runtime is made with ``pool=True``),
    and ``pools`` (``hutch serve --pool``) are added to them — one of the same machine sets
    the size of the config's. ``PUT /v1/pools`` changes them while the server runs; they are
    drained on exit."""
    import uvicorn

    from hutch.runtime.runtime import Runtime
    from hutch.server.app import create_app
    from hutch.server.files_routes import MAX_FILE
    from hutch.server.wire import MAX_MESSAGE

    logging.getLogger("uvicorn.error").addFilter(_NOISE)  # (adding the same filter twice: no-op)

    paths = HutchPaths(Path(home).absolute()) if home else HutchPaths.default()
    if listen is None:
        where = Listen.unix(paths.server_socket)
    elif isinstance(listen, str):
        where = parse_listen(listen)
    else:
        where = listen
    paths.ensure()
    token = resolve_token(where, paths, token_file=token_file, require_token=require_token)
    sock = bind_unix(where.path) if where.kind == "unix" and where.path else None
    if sock is None:
        sock = bind_tcp(where.host, where.port)
        if where.port == 0:
            where = Listen("tcp", host=where.host, port=sock.getsockname()[1])
    bound = os.stat(where.path) if where.path else None
    runtime = Runtime(paths.home, pool=True)
    stop = _Stop()
    with _signals_to(stop):
        try:
            await runtime.open()
            for spec in pools:
                await runtime.configure_pool(
                    spec.image,
                    cpus=spec.cpus,
                    memory_mib=spec.memory_mib,
                    size=spec.size,
                    accel=spec.accel,
                )
            config = uvicorn.Config(
                create_app(runtime, token=token, max_file=max_upload or MAX_FILE),
                lifespan="off",
                log_config=None,
                access_log=access_log,
                timeout_graceful_shutdown=GRACE,
                ws_max_size=MAX_MESSAGE,
                proxy_headers=False,
                server_header=False,
            )
            server = stop.server = uvicorn.Server(config)
            server.should_exit = stop.requested
            if on_ready is not None:
                asyncio.get_running_loop().call_later(0, _when_started, server, where, on_ready)
            await server.serve(sockets=[sock])
        finally:
            sock.close()
            await runtime.close()
            if where.path is not None and bound is not None:
                with contextlib.suppress(OSError):
                    now = os.stat(where.path)
                    if (now.st_dev, now.st_ino) == (bound.st_dev, bound.st_ino):
                        where.path.unlink()  # still ours (not a newer server's)


class _Stop:
    def __init__(self) -> None:
        self.requested = False
        self.server: Any = None

    def __call__(self, signo: int, frame: FrameType | None) -> None:
        self.requested = True
        if self.server is not None:
            self.server.should_exit = True


def _when_started(server: object, where: Listen, on_ready: Callable[[Listen], None]) -> None:
    if getattr(server, "should_exit", False):
        return
    if getattr(server, "started", False):
        on_ready(where)
    else:
        asyncio.get_running_loop().call_later(0.01, _when_started, server, where, on_ready)


@contextlib.contextmanager
def _signals_to(handler: _Stop) -> Iterator[None]:
    """While serving, uvicorn handles SIGINT/SIGTERM; when it returns it restores the previous
    handlers and re-raises the signals it got. Our handler (installed here, around it and around
    the runtime's close) only asks for an exit, so the boxes are still stopped in order instead of
    the process dying; a signal during the close is ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


__all__ = ["GRACE", "Listen", "bind_tcp", "bind_unix", "parse_listen", "resolve_token", "serve"]
