"""A real ``hutch serve`` process for tests: started from this venv's console script with its own
``HUTCH_HOME``, under ``setpriv --pdeathsig KILL`` so it never outlives pytest, and ready once
``GET /health`` answers.

The session fixtures ``unix_server`` and ``tcp_server`` (one real server each, shared by every test
folder; imported by tests/conftest.py) live here too."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.homes import make_home

HUTCH = Path(sys.executable).parent / "hutch"
START_TIMEOUT = 20.0


class ServerProcess:
    def __init__(self, home: Path, *args: str, listen: str | None = None) -> None:
        self.home = home
        self.listen = listen
        self.args = list(args)
        self.log = home / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The address for hutch.client.connect()."""
        if self.listen is None:
            return f"unix://{self.home / 'hutch.sock'}"
        return "http://" + self.listen.removeprefix("tcp://")

    @property
    def token(self) -> str | None:
        f = self.home / "server.token"
        return f.read_text().strip() if self.listen is not None and f.exists() else None

    def http(self, *, token: str | None = None) -> httpx.Client:
        """A plain HTTP client to the server (no token unless given)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if self.listen is None:
            return httpx.Client(
                transport=httpx.HTTPTransport(uds=str(self.home / "hutch.sock")),
                base_url="http://hutch",
                headers=headers,
                timeout=60,
            )
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def start(self, timeout: float = START_TIMEOUT) -> ServerProcess:
        argv = [str(HUTCH), "serve", *self.args]
        if self.listen is not None:
            argv += ["--listen", self.listen]
        guard = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []
        env = {**os.environ, "HUTCH_HOME": str(self.home)}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [*guard, *argv], stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"hutch serve exited with {self.proc.returncode}:\n{self.tail()}"
                )
            try:
                with self.http() as c:
                    if c.get("/health", timeout=1).status_code == 200:
                        return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"hutch serve did not answer within {timeout} s:\n{self.tail()}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        return proc.returncode

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@pytest.fixture(scope="session")
def unix_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server on its home's Unix socket (no token)."""
    server = ServerProcess(make_home(tmp_path_factory.mktemp("srv-unix") / "home")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tcp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server on a free loopback TCP port (token in its home's server.token)."""
    from tests.support.registry import free_port

    home = make_home(tmp_path_factory.mktemp("srv-tcp") / "home")
    server = ServerProcess(home, listen=f"127.0.0.1:{free_port()}").start()
    try:
        yield server
    finally:
        server.stop()
