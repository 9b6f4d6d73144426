"""The request body limit of `hutch serve` (hutch.server.wire.MAX_BODY, 16 MiB): a larger body is a
400 BadRequestError with the usual error body, whether it announces its size (Content-Length) or
comes chunked, and the client, still sending, reads that answer (the server drains the rest)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import httpx
import pytest

import hutch
from hutch.client import RemoteBox
from hutch.server.wire import MAX_BODY
from tests.support.server import ServerProcess

pytestmark = pytest.mark.server


def assert_too_large(r: httpx.Response) -> None:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "BadRequestError"
    assert f"limit is {MAX_BODY} bytes" in error["message"]
    assert "spawn" in error["hint"]


def big_exec_body(stdin_bytes: int) -> bytes:
    stdin = base64.b64encode(b"x" * stdin_bytes).decode()
    return json.dumps({"cmd": ["cat"], "stdin_b64": stdin}).encode()


def test_a_body_over_the_limit_is_a_400(unix_server: ServerProcess) -> None:
    body = big_exec_body(MAX_BODY)  # base64 makes it 4/3 of that
    assert len(body) > MAX_BODY
    with unix_server.http() as c:
        # the box does not exist: the size is refused before the body is even parsed
        r = c.post("/v1/boxes/no-such-box/exec", content=body)
        assert_too_large(r)
        r = c.post("/v1/boxes", content=b"{" + b" " * MAX_BODY + b"}")
        assert_too_large(r)
        assert c.get("/health").status_code == 200  # and the server is fine


def test_a_chunked_body_over_the_limit_is_a_400(unix_server: ServerProcess) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: sent with Transfer-Encoding: chunked
        yield b'{"cmd": ["cat"], "stdin": "'
        for _ in range(MAX_BODY // (1 << 20) + 1):
            yield b"y" * (1 << 20)
        yield b'"}'

    with unix_server.http() as c:
        assert_too_large(c.post("/v1/boxes/no-such-box/exec", content=chunks()))
        # a small chunked body goes through as usual (here: to the 404 of the missing box)
        r = c.post(
            "/v1/boxes/no-such-box/exec",
            content=iter([b'{"cmd": ', b'["true"]}']),
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"


@pytest.mark.vm
async def test_stdin_up_to_the_limit_and_beyond(remote_box: RemoteBox) -> None:
    data = bytes(range(256)) * ((MAX_BODY // 2) // 256)  # 8 MiB: 10.7 MiB of base64 JSON
    r = await remote_box.exec("wc", "-c", stdin=data)
    assert r.stdout.strip() == str(len(data))
    with pytest.raises(hutch.BadRequestError, match="limit"):
        await remote_box.exec("cat", stdin=b"z" * MAX_BODY)
    # the way for more: a streamed exec (flow controlled, no limit)
    proc = await remote_box.spawn("wc", "-c")
    await proc.stdin.write(b"z" * (MAX_BODY + 1))
    await proc.stdin.close()
    assert (await proc.wait()).stdout.strip() == str(MAX_BODY + 1)
