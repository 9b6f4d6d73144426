"""The API's error mapping and wire formats, in process (no server process, no guest)."""

from __future__ import annotations

import logging
from typing import Any, cast

import httpx
import pytest

import hutch
from hutch import errors
from hutch.runtime.metrics import RuntimeMetrics
from hutch.runtime.runtime import Runtime
from hutch.server.app import create_app, prometheus_text
from hutch.server.auth import token_matches
from hutch.server.wire import (
    error_body,
    error_from_body,
    error_status,
    record_from_json,
    record_to_json,
    result_from_json,
    result_to_json,
    snapshot_from_json,
    snapshot_to_json,
)

pytestmark = pytest.mark.server


def test_every_error_class_round_trips_with_its_status() -> None:
    table = errors.status_table()
    for name, status in table.items():
        cls = getattr(errors, name)
        if cls is errors.ExecutionError:
            continue
        e = cls("the message", hint="the hint")
        body = error_body(e)
        assert body == {"error": {"type": name, "message": "the message", "hint": "the hint"}}
        assert error_status(e) == status
        back = error_from_body(body, status)
        assert type(back) is cls and (back.message, back.hint) == ("the message", "the hint")


def test_execution_error_keeps_its_fields() -> None:
    e = errors.ExecutionError(["sh", "-c", "x"], 3, "out", "err\n", signal=None)
    back = error_from_body(error_body(e))
    assert isinstance(back, errors.ExecutionError)
    assert (back.command, back.exit_code, back.stdout, back.stderr) == (
        ["sh", "-c", "x"],
        3,
        "out",
        "err\n",
    )
    assert back.message == e.message


def test_unknown_and_facade_errors() -> None:
    back = error_from_body({"error": {"type": "SomethingNew", "message": "m", "hint": "h"}}, 418)
    assert type(back) is hutch.HutchError and back.message == "m"
    assert type(error_from_body({"nope": 1}, 502)) is hutch.HutchError

    class FacadeNotFound(errors.NotFoundError):  # e.g. a compat layer's subclass
        pass

    e = FacadeNotFound("gone")
    assert error_body(e)["error"]["type"] == "NotFoundError" and error_status(e) == 404


def test_exec_result_and_record_round_trip() -> None:
    r = hutch.ExecResult(["cat"], 0, b"\x00\xff", b"e", signal=None, duration_ms=1.5, pid=7)
    d = result_to_json(r)
    assert d["stdout_b64"] == "AP8=" and "stdout" not in d
    assert result_from_json(d) == r
    rec = hutch.BoxRecord.new(hutch.BoxOptions(name="x", env={"A": "1"}))
    assert record_from_json(record_to_json(rec)) == rec


def test_token_matches() -> None:
    assert token_matches(b"Bearer abc", b"abc")
    assert token_matches(b"bearer  abc ", b"abc")
    assert not token_matches(b"Bearer abd", b"abc")
    assert not token_matches(b"Basic abc", b"abc")
    assert not token_matches(None, b"abc")


def test_prometheus_text() -> None:
    text = prometheus_text(RuntimeMetrics(1, 0, 2, 3, 4))
    assert "hutch_boxes_running 2\n" in text and "hutch_command_errors_total 4\n" in text
    assert text.count("# TYPE ") == 5 and text.endswith("\n")


class _BrokenRuntime:
    async def metrics(self) -> Any:
        raise RuntimeError("boom")


async def test_unexpected_exceptions_are_logged_500s(caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(cast(Runtime, _BrokenRuntime()), token="t" * 20)
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": "Bearer " + "t" * 20}
    async with httpx.AsyncClient(transport=transport, base_url="http://x", headers=headers) as c:
        with caplog.at_level(logging.ERROR, logger="hutch.server"):
            r = await c.get("/v1/metrics")
        assert r.status_code == 500
        assert r.json()["error"]["type"] == "InternalError"
        assert "RuntimeError: boom" in r.json()["error"]["message"]
        assert "boom" in caplog.text
        r = await c.put("/v1/boxes")  # wrong method: the same error shape
        assert r.status_code == 405 and r.json()["error"]["type"] == "BadRequestError"


def test_the_request_model_has_every_box_option() -> None:
    """BoxCreate names exactly hutch.BoxOptions' fields: an option added there and not here would
    make hutch.connect()'s create() a 400 (the client sends every option)."""
    import dataclasses

    from hutch.server.models import BoxCreate, BoxOptionsModel

    options = {f.name for f in dataclasses.fields(hutch.BoxOptions)}
    assert set(BoxOptionsModel.model_fields) == options
    assert set(BoxCreate.model_fields) == options | {"start", "snapshot"}


def test_box_answers_pass_newer_fields_through() -> None:
    """A record or option field the response models do not name yet is passed on, not a 500."""
    from hutch.server.models import BoxInfo

    doc = record_to_json(hutch.BoxRecord.new(hutch.BoxOptions(name="x")))
    doc["brand_new"] = 1
    doc["options"]["also_new"] = "v"
    dumped = BoxInfo.model_validate(doc).model_dump()
    assert dumped["brand_new"] == 1 and dumped["options"]["also_new"] == "v"


def test_snapshot_round_trips_and_matches_its_model() -> None:
    """A hutch.Snapshot survives the wire, and the response model names every field of it."""
    import dataclasses

    from hutch.server.models import SnapshotInfo

    snap = hutch.Snapshot(
        id="0123456789abcdef0",
        name="warm",
        source_box="fedcba9876543210f",
        image="busybox",
        image_id="sha256:" + "a" * 64,
        options=hutch.BoxOptions(env={"A": "1"}, memory_mib=512),
        accel="tcg",
        kernel="/k",
        initramfs="/i",
        cmdline="console=hvc0",
        ram_bytes=10,
        disk_bytes=20,
        state_bytes=3,
    )
    d = snapshot_to_json(snap, ["box1"])
    assert (d["users"], d["size_bytes"], d["cpus"], d["memory_mib"]) == (["box1"], 33, 1, 512)
    assert snapshot_from_json(d) == snap
    assert "users" not in snapshot_to_json(snap)
    d["brand_new"] = 1  # a newer server's field: ignored here, passed on by the model
    assert snapshot_from_json(d) == snap
    assert SnapshotInfo.model_validate(d).model_dump()["brand_new"] == 1
    fields = {f.name for f in dataclasses.fields(hutch.Snapshot)}
    assert fields <= set(SnapshotInfo.model_fields)
