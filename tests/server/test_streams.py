"""Streaming through `hutch serve`: WebSocket spawn (stdin, output, signals, flow control), SSE,
buffered exec, metrics, images, and clients that vanish mid-stream."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import httpx
import pytest

import hutch
from hutch.client import RemoteBox, RemoteExecution, connect
from tests.support.server import ServerProcess

pytestmark = [pytest.mark.server, pytest.mark.vm]


def async_http(server: ServerProcess, timeout: float = 60) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(server.home / "hutch.sock")),
        base_url="http://hutch",
        timeout=timeout,
    )


async def guest_processes(box: RemoteBox) -> str:
    return (await box.exec("ps")).stdout


async def wait_gone(box: RemoteBox, marker: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while marker in await guest_processes(box):
        assert time.monotonic() < deadline, f"{marker!r} still runs in the guest"
        await asyncio.sleep(0.2)


async def test_ws_spawn_echoes_stdin(remote_box: RemoteBox) -> None:
    proc = await remote_box.spawn("cat")
    assert isinstance(proc, RemoteExecution) and proc.pid > 0 and proc.command == ["cat"]
    await proc.stdin.write(b"ping\n")
    assert await proc.stdout.read_chunk() == b"ping\n"
    # more than both windows (1 MiB) in each direction, written and read at the same time
    data = os.urandom(3 << 20)

    async def feed() -> None:
        await proc.stdin.write(data)
        await proc.stdin.close()

    feeder = asyncio.create_task(feed())
    got = await proc.stdout.read()
    await feeder
    assert got == data
    result = await proc.wait()
    assert isinstance(result, hutch.ExecResult) and result.exit_code == 0
    assert result.stdout_bytes == b""  # already consumed through the stream
    assert await proc.wait() is result


async def test_ws_wait_collects_unread_output_and_stderr(remote_box: RemoteBox) -> None:
    proc = await remote_box.spawn(
        "sh", "-c", "head -c 3000000 /dev/zero; echo e >&2; exit 5", stdin=False
    )
    result = await proc.wait()  # nothing read: wait() drains both streams (no deadlock)
    assert (result.exit_code, len(result.stdout_bytes), result.stderr) == (5, 3000000, "e\n")


async def test_ws_signal_kill_and_guest_timeout(remote_box: RemoteBox) -> None:
    script = "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.1; done"
    proc = await remote_box.spawn("sh", "-c", script)
    assert await proc.stdout.read_chunk() == b"ready\n"
    await proc.signal(signal.SIGTERM)
    result = await proc.wait(timeout=20)
    assert result.exit_code == 7 and b"got-term" in result.stdout_bytes

    async with await remote_box.spawn("sleep", "1000") as proc:
        await proc.kill()
        result = await proc.wait(timeout=20)
    assert result.signal == signal.SIGKILL and result.exit_code is None

    proc = await remote_box.spawn("sleep", "10", timeout=0.5)
    with pytest.raises(hutch.TimeoutError, match="timeout"):
        await proc.wait()
    with pytest.raises(hutch.BadRequestError):
        await proc.signal(99)


async def test_ws_spawn_errors_are_the_same_classes(remote_box: RemoteBox) -> None:
    with pytest.raises(hutch.NotFoundError):
        await remote_box.spawn("/no/such/program")
    with pytest.raises(hutch.BadRequestError):
        await remote_box.spawn("true", env={"A=B": "x"})
    rt = remote_box._rt
    ghost = RemoteBox(rt, {**remote_box.record.__dict__, "id": "0" * 17, "options": {}})
    with pytest.raises(hutch.NotFoundError):
        await ghost.spawn("true")


async def test_sse_streams_output(unix_server: ServerProcess, remote_box: RemoteBox) -> None:
    body = {"cmd": ["sh", "-c", "echo out; cat; echo err >&2; exit 4"], "stdin": "fed\n"}
    events: list[tuple[str, str]] = []
    async with (
        async_http(unix_server) as c,
        c.stream("POST", "/v1/boxes/shared/exec/sse", json=body) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        event = ""
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append((event, line[6:]))
    assert events[0][0] == "started" and json.loads(events[0][1])["pid"] > 0
    out = b"".join(base64.b64decode(d) for e, d in events if e == "stdout")
    err = b"".join(base64.b64decode(d) for e, d in events if e == "stderr")
    assert (out, err) == (b"out\nfed\n", b"err\n")
    kind, data = events[-1]
    assert kind == "exit"
    assert json.loads(data)["exit_code"] == 4
    async with async_http(unix_server) as c:
        r = await c.post("/v1/boxes/nope/exec/sse", json={"cmd": ["true"]})
        assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"


async def test_buffered_exec_wire_format(unix_server: ServerProcess, remote_box: RemoteBox) -> None:
    data = bytes(range(256))
    async with async_http(unix_server) as c:
        r = await c.post(
            "/v1/boxes/shared/exec",
            json={"cmd": ["cat"], "stdin_b64": base64.b64encode(data).decode()},
        )
        assert r.status_code == 200
        body = r.json()
        assert base64.b64decode(body["stdout_b64"]) == data
        assert body["exit_code"] == 0 and body["signal"] is None and body["pid"] > 0
        r = await c.post("/v1/boxes/shared/exec", json={"cmd": ["true"], "stdin_b64": "%%%"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"
        r = await c.post(
            "/v1/boxes/shared/exec", json={"cmd": ["sh", "-c", "exit 0"], "timeout": -1}
        )
        assert r.status_code == 400


async def test_metrics(unix_server: ServerProcess, remote_box: RemoteBox) -> None:
    await remote_box.exec("true")
    async with async_http(unix_server) as c:
        r = await c.get("/metrics")
        runtime = (await c.get("/v1/metrics")).json()
        box = (await c.get("/v1/boxes/shared/metrics")).json()
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.split()
            samples[name] = float(value)
    assert samples["hutch_commands_total"] >= 1 and samples["hutch_boxes_running"] >= 1
    assert "# TYPE hutch_boxes_running gauge" in r.text
    assert "# TYPE hutch_commands_total counter" in r.text
    assert runtime["commands"] == samples["hutch_commands_total"]
    assert box["memory_total_bytes"] > 0 and box["commands"] >= 1
    async with connect(unix_server.url) as rt:
        m = await rt.metrics()
        assert isinstance(m, hutch.runtime.metrics.RuntimeMetrics) and m.running >= 1


KILLED_CLIENT = """
import asyncio, sys
from hutch.client import connect
async def main():
    rt = await connect(sys.argv[1])
    box = await rt.get("shared")
    proc = await box.spawn("sh", "-c", "echo streaming; cat | sleep 4321")
    print((await proc.stdout.read_chunk()).decode().strip(), flush=True)
    await proc.stdin.write(b"x" * 100000)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


async def test_client_killed_mid_stream_leaves_the_box_usable(
    unix_server: ServerProcess, remote_box: RemoteBox
) -> None:
    p = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(KILLED_CLIENT), unix_server.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "streaming", p.stderr.read() if p.stderr else ""
        assert "sleep 4321" in await guest_processes(remote_box)
    finally:
        p.kill()
        p.wait()
    await wait_gone(remote_box, "sleep 4321")
    r = await remote_box.exec("echo", "still here")
    assert r.stdout == "still here\n"


async def test_buffered_exec_of_a_vanished_client_is_killed(
    unix_server: ServerProcess, remote_box: RemoteBox
) -> None:
    async with async_http(unix_server, timeout=1.5) as c:
        with pytest.raises(httpx.ReadTimeout):
            await c.post("/v1/boxes/shared/exec", json={"cmd": ["sleep", "4322"]})
    await wait_gone(remote_box, "sleep 4322")
    assert (await remote_box.exec("true")).exit_code == 0


async def test_sse_client_that_goes_away_kills_the_process(
    unix_server: ServerProcess, remote_box: RemoteBox
) -> None:
    body = {"cmd": ["sh", "-c", "echo up; sleep 4324"]}
    async with (
        async_http(unix_server) as c,
        c.stream("POST", "/v1/boxes/shared/exec/sse", json=body) as r,
    ):
        lines = r.aiter_lines()
        assert (await anext(lines)).startswith("event: started")
        assert "sleep 4324" in await guest_processes(remote_box)
    await wait_gone(remote_box, "sleep 4324")


def pull_events(lines: list[dict[str, Any]]) -> set[str]:
    return {e["type"] for e in lines}


@pytest.mark.registry
async def test_images_pull_list_remove(registry: Any, unix_server: ServerProcess) -> None:
    from tests.support.images import busybox_layer
    from tests.support.push import push_image

    push_image(registry.url, "srv/app", "1", [busybox_layer()], {"config": {"Cmd": ["sh"]}})
    ref = f"{registry.host}/srv/app:1"
    events: list[dict[str, Any]] = []
    async with connect(unix_server.url) as rt:
        image = await rt.pull(ref, progress=events.append)
        assert image["id"].startswith("sha256:") and ref in image["references"]
        assert {"status", "layer"} <= pull_events(events)
        assert any(ref in i["references"] for i in await rt.images())
        with pytest.raises(hutch.NotFoundError):
            await rt.pull(f"{registry.host}/srv/missing:1")
        done = await rt.remove_image(ref)
        assert any(line.startswith("deleted: ") for line in done)
        assert not any(ref in i["references"] for i in await rt.images())
        with pytest.raises(hutch.NotFoundError):
            await rt.remove_image(ref)
    async with (
        async_http(unix_server) as c,
        c.stream("POST", "/v1/images/pull", json={"reference": ref}) as r,
    ):
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) async for line in r.aiter_lines() if line]
    assert lines[0]["type"] == "status" and lines[-1]["type"] == "done"
