"""The BoxLite facade's translation layers (no VM): options, errors, results, line streams."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import hutch
import hutch.compat.boxlite as boxlite
from hutch.compat import translate


def test_boxlite_options_become_native_options(tmp_path: Path) -> None:
    native = boxlite.BoxOptions(
        image="debian-python",
        cpus=1,
        memory_mib=512,
        disk_size_gb=10,
        working_dir="/work",
        env=[("A", "1"), ("B", "2")],
        volumes=[(str(tmp_path), "/data", True), {"host_path": str(tmp_path), "guest": "/x"}],
        ports=[(8080, 80), {"guest_port": 53, "protocol": "udp"}],
    ).to_native("named")
    assert (native.image, native.name, native.cpus, native.memory_mib) == (
        "debian-python",
        "named",
        1,
        512,
    )
    assert native.disk_size_mib == 10 * 1024 and native.workdir == "/work"
    assert dict(native.env) == {"A": "1", "B": "2"}
    assert native.auto_remove is True  # BoxLite's default
    assert [(v.guest_path, v.read_only) for v in native.volumes] == [("/data", True), ("/x", False)]
    assert [(p.host, p.guest, p.protocol) for p in native.ports] == [
        (8080, 80, "tcp"),
        (0, 53, "udp"),
    ]
    assert boxlite.BoxOptions().to_native().image == "busybox"
    assert boxlite.BoxOptions().to_native().network == "none"
    assert boxlite.BoxOptions(network=boxlite.NetworkSpec()).to_native().network == "outbound"
    net = boxlite.NetworkSpec(allow_net=["10.0.0.0/8", "pypi.org"])
    native = boxlite.BoxOptions(network=net).to_native()
    assert (native.network, native.allow) == ("allowlist", ("10.0.0.0/8", "pypi.org"))
    assert boxlite.BoxOptions(auto_remove=False).to_native().auto_remove is False


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"rootfs_path": "/srv/rootfs"}, "rootfs_path"),
        ({"cmd": ["sleep", "1"]}, "cmd"),
        ({"detach": True}, "detach"),
        ({"network": boxlite.NetworkSpec(allow_net=["bad host!"])}, "neither a CIDR"),
        ({"volumes": [("/a", "/b", "ro")]}, "read_only"),
        ({"volumes": ["/a:/b"]}, r"volumes\[0\]"),
        ({"ports": [(0, 70000)]}, r"ports\[0\].guest"),
        ({"cpus": 0}, "cpus"),
    ],
)
def test_boxlite_options_refusals_are_config_errors(options: dict[str, object], match: str) -> None:
    with pytest.raises(boxlite.ConfigError, match=match) as ei:
        boxlite.BoxOptions(**options).to_native()  # type: ignore[arg-type]
    assert isinstance(ei.value, hutch.ConfigError) and isinstance(ei.value, RuntimeError)


def test_boxlite_error_translation_keeps_both_hierarchies() -> None:
    cases = {
        hutch.NotFoundError("x"): boxlite.NotFoundError,
        hutch.ConflictError("x"): boxlite.AlreadyExistsError,
        hutch.TimeoutError("x"): boxlite.TimeoutError,
        hutch.ParseError("x"): boxlite.ParseError,
        hutch.ConfigError("x"): boxlite.ConfigError,
        hutch.BadRequestError("x"): boxlite.InvalidArgumentError,
        hutch.UnsupportedEngineError("x"): boxlite.UnsupportedEngineError,
        hutch.SetupError("x"): boxlite.BoxliteError,
    }
    for error, expected in cases.items():
        mapped = translate(error, boxlite._ERRORS, boxlite.BoxliteError)
        assert type(mapped) is expected, error
        assert isinstance(mapped, type(error)) or expected is boxlite.BoxliteError
        assert mapped.http_status == error.http_status
        assert mapped.hint == error.hint
    assert isinstance(boxlite.TimeoutError("t"), TimeoutError)  # the builtin, too
    e = boxlite.ExecError("ls /x", 2, "no such file")
    assert str(e).startswith("Command 'ls /x' failed with exit code 2: no such file")
    assert (e.command, e.exit_code, e.stderr) == ("ls /x", 2, "no such file")


class FakeStream:
    """An output stream's async iteration, as hutch.execution.OutputStream provides it."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def _gen(self):  # type: ignore[no-untyped-def]
        for c in self.chunks:
            yield c

    def __aiter__(self):  # type: ignore[no-untyped-def]
        return self._gen()


async def test_boxlite_lines_split_chunks_and_keep_newlines() -> None:
    lines = boxlite._Lines(FakeStream([b"a\nb", b"c\n\n", b"d\xff"]))  # type: ignore[arg-type]
    assert [x async for x in lines] == ["a\n", "bc\n", "\n", "d\ufffd"]


async def test_boxlite_info_is_awaitable() -> None:
    info = boxlite.BoxInfo(
        "id", None, boxlite.BoxStateInfo("running", True, 1), None, None, "busybox", 1, 256
    )
    assert (await info) is info
    assert info.status == info.state.status == "running"
    await asyncio.sleep(0)


def test_boxlite_metrics_short_names() -> None:
    m = boxlite.BoxMetrics(3, 1, 120.5, 90.0, 12.5, 1 << 20)
    assert (m.commands, m.errors, m.total_create_ms, m.guest_boot_ms, m.cpu, m.mem) == (
        3,
        1,
        120.5,
        90.0,
        12.5,
        1 << 20,
    )
    assert repr(m).startswith("BoxMetrics(commands=3, errors=1, total_create_ms=120.5")
