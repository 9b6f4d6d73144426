"""`hutch serve` over real sockets: listening, tokens, the error shape, OpenAPI, the box lifecycle
through `hutch.client.connect()` on the Unix socket and on TCP, and the shutdown sequence."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import httpx
import pytest
import websockets
from websockets.asyncio.client import connect as ws_connect

import hutch
from hutch.client import RemoteBox, RemoteRuntime, connect
from hutch.errors import ParseError
from hutch.server.auth import load_or_create_token
from hutch.server.serve import Listen, parse_listen
from tests.conftest import hutch_cli
from tests.support.homes import make_home
from tests.support.registry import free_port
from tests.support.server import ServerProcess

pytestmark = pytest.mark.server

ERROR_KEYS = {"type", "message", "hint"}


def assert_error(r: httpx.Response, status: int, type_: str) -> dict[str, str]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) >= ERROR_KEYS
    assert body["error"]["type"] == type_
    assert body["error"]["message"] and body["error"]["hint"]
    return dict(body["error"])


# --- listening and tokens --------------------------------------------------------------------
def test_unix_socket_is_private_and_needs_no_token(unix_server: ServerProcess) -> None:
    sock = unix_server.home / "hutch.sock"
    st = sock.stat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert not (unix_server.home / "server.token").exists()  # no token for the socket
    with unix_server.http() as c:
        assert c.get("/health").json() == {"status": "ok"}
        version = c.get("/v1/version").json()
        assert (version["version"], version["api"]) == (hutch.__version__, 1)
        assert version["home"] == str(unix_server.home)
        assert version["pid"] == unix_server.proc.pid


def test_tcp_requires_the_token(tcp_server: ServerProcess) -> None:
    token_file = tcp_server.home / "server.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = tcp_server.token
    assert token and len(token) >= 40  # token_urlsafe(32)
    with tcp_server.http() as c:
        assert c.get("/health").status_code == 200  # liveness needs no token
        err = assert_error(c.get("/v1/boxes"), 401, "UnauthorizedError")
        assert "token" in err["message"]
        r = c.get("/v1/version")
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert_error(c.get("/openapi.json"), 401, "UnauthorizedError")
        assert_error(c.get("/metrics"), 401, "UnauthorizedError")
    with tcp_server.http(token=token + "x") as c:
        assert_error(c.get("/v1/boxes"), 401, "UnauthorizedError")
    with tcp_server.http(token=token) as c:
        assert c.get("/v1/boxes").status_code == 200
        assert c.get("/metrics").status_code == 200


async def test_tcp_wrong_token_raises_unauthorized(tcp_server: ServerProcess) -> None:
    rt = connect(tcp_server.url, token="not-the-token-at-all")
    with pytest.raises(hutch.UnauthorizedError, match="token"):
        await rt.list()
    with pytest.raises(hutch.UnauthorizedError):
        await rt.open()
    await rt.close()
    # the WebSocket handshake gets the same 401
    url = tcp_server.url.replace("http://", "ws://") + "/v1/boxes/x/exec/ws"
    with pytest.raises(websockets.exceptions.InvalidStatus) as info:
        await ws_connect(url, proxy=None)
    assert info.value.response.status_code == 401


async def test_tcp_client_reads_no_token_and_uses_the_given_one(tcp_server: ServerProcess) -> None:
    async with connect(tcp_server.url, token=tcp_server.token) as rt:
        assert (await rt.version())["api"] == 1
        assert isinstance(await rt.list(), list)


def test_token_file_option_makes_a_private_token(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    token_file = tmp_path / "secret" / "tok"
    token_file.parent.mkdir()
    server = ServerProcess(
        home, "--token-file", str(token_file), listen=f"127.0.0.1:{free_port()}"
    ).start()
    try:
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert not (home / "server.token").exists()
        token = token_file.read_text().strip()
        with server.http(token=token) as c:
            assert c.get("/v1/version").status_code == 200
        with server.http() as c:
            assert c.get("/v1/version").status_code == 401
    finally:
        assert server.stop() == 0
    # the same file is reused, not replaced
    assert load_or_create_token(token_file) == token


def test_non_loopback_without_token_is_refused(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    env = {"HUTCH_HOME": str(home)}
    r = hutch_cli("serve", "--listen", f"0.0.0.0:{free_port()}", "--no-token", env_extra=env)
    assert r.returncode == 125, r.stderr
    assert b"without a token" in r.stderr
    r = hutch_cli("serve", "--listen", "not an address", env_extra=env, timeout=30)
    assert r.returncode == 125 and b"HOST:PORT" in r.stderr
    assert not (home / "hutch.sock").exists()


def test_parse_listen() -> None:
    assert parse_listen("unix:///run/h.sock") == Listen.unix("/run/h.sock")
    assert parse_listen("127.0.0.1:8080") == Listen("tcp", host="127.0.0.1", port=8080)
    assert parse_listen("tcp://[::1]:9000").url == "http://[::1]:9000"
    assert parse_listen("localhost:1").loopback
    assert not parse_listen("0.0.0.0:80").loopback
    for bad in ("unix://relative", "8080", "host.example:80", "ftp://1.2.3.4:5", "1.2.3.4:x"):
        with pytest.raises(ParseError):
            parse_listen(bad)


async def test_connect_to_nothing_says_how_to_start_a_server(tmp_path: Path) -> None:
    with pytest.raises(hutch.ConnectionError, match="hutch serve") as info:
        await connect(f"unix://{tmp_path}/nobody.sock")
    assert str(tmp_path / "nobody.sock") in info.value.message
    rt = connect(f"http://127.0.0.1:{free_port()}", token="x" * 20, timeout=2)
    with pytest.raises(hutch.ConnectionError, match="hutch serve"):
        await rt.list()
    await rt.close()


# --- errors and OpenAPI ----------------------------------------------------------------------
async def test_errors_travel_as_the_same_classes(unix_server: ServerProcess) -> None:
    with unix_server.http() as c:
        err = assert_error(c.get("/v1/boxes/no-such-box"), 404, "NotFoundError")
        assert "no-such-box" in err["message"]
        assert_error(c.delete("/v1/boxes/no-such-box"), 404, "NotFoundError")
        assert_error(
            c.post("/v1/boxes/no-such-box/exec", json={"cmd": ["true"]}), 404, "NotFoundError"
        )
        assert_error(c.get("/v1/nothing-here"), 404, "NotFoundError")
        too_many = (os.cpu_count() or 1) + 1
        err = assert_error(c.post("/v1/boxes", json={"cpus": too_many}), 400, "ConfigError")
        assert "cpus" in err["message"]
        err = assert_error(c.post("/v1/boxes", json={"cpus": "two"}), 400, "BadRequestError")
        assert "cpus" in err["message"]
        assert_error(c.post("/v1/boxes", json={"cpu": 1}), 400, "BadRequestError")
        assert_error(c.post("/v1/boxes", content=b"{not json"), 400, "BadRequestError")
        assert_error(c.post("/v1/images/pull", json={"reference": "UPPER/Case"}), 400, "ParseError")
    async with connect(unix_server.url) as rt:
        assert isinstance(rt, RemoteRuntime)
        with pytest.raises(hutch.NotFoundError, match="no-such-box"):
            await rt.get("no-such-box")
        with pytest.raises(hutch.ConfigError, match="cpus"):
            await rt.create(image="busybox", cpus=(os.cpu_count() or 1) + 1)
        with pytest.raises(hutch.ConfigError, match="memory_mib"):
            await rt.create(image="busybox", memory_mib=1)  # checked by the client already
        box = await rt.create(image="busybox", name="twice")
        try:
            with pytest.raises(hutch.ConflictError, match="twice"):
                await rt.create(image="busybox", name="twice")
            with unix_server.http() as c:
                assert_error(c.post("/v1/boxes", json={"name": "twice"}), 409, "ConflictError")
                # exec on a box that is not running
                r = c.post("/v1/boxes/twice/exec", json={"cmd": ["true"]})
                assert_error(r, 409, "InvalidStateError")
            with pytest.raises(hutch.InvalidStateError, match="not running"):
                await box.exec("true")
        finally:
            await rt.remove("twice")


def test_openapi_lists_the_endpoints(unix_server: ServerProcess) -> None:
    with unix_server.http() as c:
        spec = c.get("/openapi.json").json()
    paths = spec["paths"]
    expected = {
        "/health": {"get"},
        "/v1/version": {"get"},
        "/v1/boxes": {"get", "post"},
        "/v1/boxes/{id_or_name}": {"get", "delete"},
        "/v1/boxes/{id_or_name}/start": {"post"},
        "/v1/boxes/{id_or_name}/stop": {"post"},
        "/v1/boxes/{id_or_name}/exec": {"post"},
        "/v1/boxes/{id_or_name}/exec/sse": {"post"},
        "/v1/boxes/{id_or_name}/metrics": {"get"},
        "/v1/metrics": {"get"},
        "/metrics": {"get"},
        "/v1/images": {"get"},
        "/v1/images/{ref}": {"delete"},
        "/v1/images/pull": {"post"},
        "/v1/boxes/{id_or_name}/snapshot": {"post"},
        "/v1/boxes/{id_or_name}/clone": {"post"},
        "/v1/boxes/{id_or_name}/fork": {"post"},
        "/v1/snapshots": {"get"},
        "/v1/snapshots/{id_or_name}": {"get", "delete"},
        "/v1/pools": {"get", "put"},
        "/v1/pools/wait": {"post"},
    }
    for path, methods in expected.items():
        assert path in paths, path
        assert methods <= set(paths[path]), path
    schemas = spec["components"]["schemas"]
    for name in ("BoxCreate", "BoxInfo", "ErrorBody", "ExecRequest", "ExecResultModel"):
        assert name in schemas
    for name in ("SnapshotInfo", "SnapshotRequest", "CloneRequest", "ForkRequest"):
        assert name in schemas
    for name in ("PoolRequest", "PoolStatusModel"):
        assert name in schemas
    assert "snapshot" in schemas["BoxCreate"]["properties"]
    create = paths["/v1/boxes"]["post"]
    assert {"400", "404", "409", "500"} <= set(create["responses"])


async def test_snapshot_errors_over_http(unix_server: ServerProcess) -> None:
    """The snapshot endpoints' error answers (no guest needed: the box is never started)."""
    with unix_server.http() as c:
        assert isinstance(c.get("/v1/snapshots").json(), list)
        for r in (
            c.get("/v1/snapshots/no-such-snap"),
            c.delete("/v1/snapshots/no-such-snap"),
            c.post("/v1/boxes", json={"snapshot": "no-such-snap", "name": "never"}),
        ):
            assert "no-such-snap" in assert_error(r, 404, "NotFoundError")["message"]
        assert_error(c.post("/v1/boxes/no-such-box/snapshot"), 404, "NotFoundError")
        assert_error(c.post("/v1/boxes/no-such-box/clone", json={}), 404, "NotFoundError")
        assert_error(c.post("/v1/boxes/no-such-box/fork", json={"n": 1}), 404, "NotFoundError")
        assert_error(c.post("/v1/boxes/x/fork", json={"n": 0}), 400, "BadRequestError")
        assert_error(c.post("/v1/boxes/x/fork", json={}), 400, "BadRequestError")
        assert_error(c.post("/v1/boxes/x/snapshot", json={"nam": "a"}), 400, "BadRequestError")
        assert c.post("/v1/boxes", json={"name": "snap-idle"}).status_code == 201
        try:
            err = assert_error(c.post("/v1/boxes/snap-idle/snapshot"), 409, "InvalidStateError")
            assert "not running" in err["message"]
            r = c.post("/v1/boxes/snap-idle/snapshot", json={"name": "Bad Name"})
            assert "snapshot name" in assert_error(r, 400, "ConfigError")["message"]
            assert_error(c.post("/v1/boxes/snap-idle/clone"), 409, "InvalidStateError")
        finally:
            assert c.delete("/v1/boxes/snap-idle").status_code == 204
    async with connect(unix_server.url) as rt:
        with pytest.raises(hutch.NotFoundError, match="no-such-snap"):
            await rt.create(snapshot="no-such-snap")
        with pytest.raises(hutch.NotFoundError, match="no-such-snap"):
            await rt.remove_snapshot("no-such-snap")


async def test_pool_errors_over_http(unix_server: ServerProcess) -> None:
    """The pool endpoints' error answers and a no-op (no guest needed: nothing is configured)."""
    with unix_server.http() as c:
        assert isinstance(c.get("/v1/pools").json(), list)
        for body, type_ in (
            ({"image": "busybox", "size": 65}, "ConfigError"),
            ({"image": "busybox", "size": -1}, "ConfigError"),
            ({"image": "busybox", "cpus": 0}, "ConfigError"),
            ({"image": "busybox", "sise": 1}, "BadRequestError"),
            ({"image": "busybox", "size": "2"}, "BadRequestError"),
        ):
            assert_error(c.put("/v1/pools", json=body), 400, type_)
        # size 0 of a pool that does not exist: nothing to drain, no error
        r = c.put("/v1/pools", json={"image": "busybox", "memory_mib": 208, "size": 0})
        assert r.status_code == 200 and r.json()["size"] == 0
        assert c.post("/v1/pools/wait", params={"timeout": 1}).status_code == 204
        assert_error(c.post("/v1/pools/wait", params={"timeout": 0}), 400, "BadRequestError")
    async with connect(unix_server.url) as rt:
        with pytest.raises(hutch.ConfigError, match="size"):
            await rt.configure_pool("busybox", size=65)
        assert all(p.memory_mib != 208 for p in await rt.pool_status())
        await rt.wait_pool(1)


def test_prometheus_pool_families() -> None:
    from hutch.runtime.metrics import RuntimeMetrics
    from hutch.server.app import prometheus_text

    m = RuntimeMetrics(1, 0, 1, 2, 0)
    assert "hutch_pool" not in prometheus_text(m)
    p = hutch.PoolStatus("docker.io/library/busybox:latest", 1, 256, "auto", 2, 1, 1, handed_out=3)
    text = prometheus_text(m, [p])
    labels = 'image="docker.io/library/busybox:latest",cpus="1",memory_mib="256",accel="auto"'
    assert f"hutch_pool_ready{{{labels}}} 1\n" in text
    assert f"hutch_pool_handed_out_total{{{labels}}} 3\n" in text
    assert "# TYPE hutch_pool_handed_out_total counter" in text


def test_parse_pool_option() -> None:
    from hutch.cli.serve import parse_pool

    assert (parse_pool("busybox=2").image, parse_pool("busybox=2").size) == ("busybox", 2)
    spec = parse_pool("alpine:3.20:2:512=1")
    assert (spec.image, spec.cpus, spec.memory_mib, spec.size) == ("alpine:3.20", 2, 512, 1)
    assert parse_pool("alpine:3.20=3").image == "alpine:3.20"
    for bad in ("busybox", "busybox=x", "=2", "busybox=99"):
        with pytest.raises(hutch.ConfigError, match="--pool"):
            parse_pool(bad)


@pytest.mark.vm
def test_snapshot_restore_and_remove_over_http(
    unix_server: ServerProcess, remote_box: RemoteBox
) -> None:
    """The wire format of snapshots, as docs/API.md gives it (the client's side is tests/parity)."""
    with unix_server.http() as c:
        box = f"/v1/boxes/{remote_box.id}"
        assert c.post(f"{box}/exec", json={"cmd": ["sh", "-c", "echo x > /root/x"]}).is_success
        r = c.post(f"{box}/snapshot", json={"name": "http-snap"}, timeout=120)
        assert r.status_code == 201, r.text
        snap = r.json()
        assert (snap["name"], snap["source_box"], snap["image"]) == (
            "http-snap",
            remote_box.id,
            "busybox",
        )
        assert snap["users"] == [] and snap["auto_remove"] is False
        assert snap["size_bytes"] == snap["ram_bytes"] + snap["disk_bytes"] + snap["state_bytes"]
        assert (snap["cpus"], snap["memory_mib"]) == (1, remote_box.options.memory_mib)
        assert snap["id"] in [s["id"] for s in c.get("/v1/snapshots").json()]
        try:
            body = {"snapshot": "http-snap", "name": "http-restored", "start": True}
            r = c.post("/v1/boxes", json=body, timeout=120)
            assert r.status_code == 201, r.text
            restored = r.json()
            assert restored["state"] == "running" and restored["snapshot_id"] == snap["id"]
            r = c.post("/v1/boxes/http-restored/exec", json={"cmd": ["cat", "/root/x"]})
            assert r.json()["stdout_b64"] == "eAo="  # x\n
            assert c.get("/v1/snapshots/http-snap").json()["users"] == [restored["id"]]
            err = assert_error(c.delete("/v1/snapshots/http-snap"), 409, "ConflictError")
            assert restored["id"] in err["message"]
            r = c.post("/v1/boxes", json={"snapshot": "http-snap", "cpus": 2})
            assert "cpus" in assert_error(r, 400, "ConfigError")["message"]
            r = c.post(
                "/v1/boxes", json={"snapshot": "http-snap", "ports": [{"host": 0, "guest": 1}]}
            )
            assert "ports" in assert_error(r, 400, "ConfigError")["message"]
            r = c.post(f"{box}/clone", timeout=120)  # no body: an unnamed clone
            assert r.status_code == 201, r.text
            clone = r.json()
            assert clone["state"] == "running" and clone["name"] not in (None, remote_box.name)
            assert c.delete(f"/v1/boxes/{clone['id']}?force=true").status_code == 204
        finally:
            c.delete("/v1/boxes/http-restored?force=true", timeout=120)
        assert c.delete("/v1/snapshots/http-snap").status_code == 204
        assert_error(c.get(f"/v1/snapshots/{snap['id']}"), 404, "NotFoundError")


# --- boxes through the client ----------------------------------------------------------------
@pytest.mark.vm
async def test_box_lifecycle_over_tcp(tcp_server: ServerProcess) -> None:
    """The same runtime API on the Unix socket is tests/parity's (against the embedded runtime
    too); this is the TCP path, with the token on every request."""
    server, kind = tcp_server, "tcp"
    name = f"life-{kind}"
    async with connect(server.url, token=server.token) as rt:
        box = await rt.create(image="busybox", name=name, env={"WHO": kind}, memory_mib=192)
        assert isinstance(box, RemoteBox) and box.state == "created" and box.name == name
        assert box.options.memory_mib == 192 and box.options.env == {"WHO": kind}
        [rec] = [r for r in await rt.list() if r.name == name]
        assert isinstance(rec, hutch.BoxRecord) and rec.id == box.id
        assert (await rt.get(name)).id == box.id
        assert (await rt.get(box.id[:8])).name == name  # an id prefix
        await box.start()
        assert box.state == "running"
        assert [r.name for r in await rt.list(state="running")] == [name]
        assert await rt.list(state=["stopped", "failed"]) == []
        r = await box.exec("sh", "-c", "echo $WHO; echo oops >&2; exit 3")
        assert isinstance(r, hutch.ExecResult)
        assert (r.exit_code, r.stdout, r.stderr) == (3, f"{kind}\n", "oops\n")
        assert r.command == ["sh", "-c", "echo $WHO; echo oops >&2; exit 3"] and r.pid
        with pytest.raises(hutch.ExecutionError) as failed:
            r.assert_success()
        assert failed.value.exit_code == 3
        data = bytes(range(256)) * 64
        r = await box.exec("cat", stdin=data, cwd="/tmp", user="hutch")
        assert r.stdout_bytes == data
        r = await box.exec(["sh", "-c", "pwd; id -u"], cwd="/tmp", user="hutch")
        assert r.stdout == "/tmp\n1000\n"
        with pytest.raises(hutch.TimeoutError, match="timeout"):
            await box.exec("sleep", "10", timeout=0.5)
        with pytest.raises(hutch.OutputLimitError):
            await box.exec("head", "-c", "5000", "/dev/zero", max_output_bytes=1000)
        m = await box.metrics()
        assert isinstance(m, hutch.runtime.metrics.BoxMetrics) and m.memory_total_bytes > 0
        with pytest.raises(hutch.InvalidStateError, match="force"):
            await rt.remove(name)
        await box.stop()
        assert box.state == "stopped"
        assert (await rt.get(name)).state == "stopped"
        await box.start()  # the disk was kept
        assert (await box.exec("true")).exit_code == 0
        await rt.remove(name, force=True)
        with pytest.raises(hutch.NotFoundError):
            await rt.get(name)
        metrics = await rt.metrics()
        assert metrics.boxes_created >= 1 and metrics.commands >= 5 and metrics.errors >= 2


@pytest.mark.vm
async def test_sigterm_stops_the_boxes_and_removes_the_socket(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    home = make_home(tmp_path_factory.mktemp("srv-term") / "home")
    server = ServerProcess(home).start()
    async with connect(server.url) as rt:
        box = await rt.create(image="busybox", name="graceful")
        await box.start()
        await rt.create(image="busybox", name="idle")
        await rt.create(image="busybox", name="temp", auto_remove=True)
        await (await rt.get("temp")).start()
        proc = await box.spawn("sleep", "1000")
        assert server.stop(signal.SIGTERM) == 0, server.tail()
        with pytest.raises(hutch.ConnectionError, match="shut down"):
            await proc.wait()
    assert not (home / "hutch.sock").exists()
    assert "hutch serve: stopped" in server.tail()
    async with hutch.Runtime(home) as local:
        assert not local.last_recovery  # nothing was left for crash recovery to clean up
        states = {r.name: (r.state, r.owner_pid) for r in await local.list()}
    assert states == {"graceful": ("stopped", None), "idle": ("created", None)}


def test_serve_refuses_a_socket_a_server_already_uses(unix_server: ServerProcess) -> None:
    r = hutch_cli("serve", env_extra={"HUTCH_HOME": str(unix_server.home)}, timeout=30)
    assert r.returncode == 125 and b"already listens" in r.stderr
    with unix_server.http() as c:  # and the running server was not disturbed
        assert c.get("/health").status_code == 200


def test_hutch_serve_help() -> None:
    r = hutch_cli("serve", "--help", timeout=30)
    assert r.returncode == 0
    assert b"--listen" in r.stdout and b"--token-file" in r.stdout and b"--no-token" in r.stdout
