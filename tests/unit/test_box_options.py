"""BoxOptions: every validation rule (the message names the field, the value and what is allowed),
Port/Volume parsing, and the JSON round trip the box store relies on."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from hutch.errors import BadRequestError, ConfigError
from hutch.runtime.options import BoxOptions, Port, Volume

HOST_CPUS = os.cpu_count() or 1


def fails(match: list[str], **kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        BoxOptions(**kwargs)
    message = str(info.value)
    for part in match:
        assert part in message, f"{part!r} not in {message!r}"
    assert isinstance(info.value, BadRequestError)  # the server sends it as 400
    return info.value


def test_defaults_are_valid() -> None:
    o = BoxOptions()
    assert (o.image, o.name, o.cpus, o.memory_mib, o.disk_size_mib) == (
        "busybox",
        None,
        1,
        256,
        None,
    )
    assert dict(o.env) == {} and o.ports == () and o.volumes == () and o.accel == "auto"


@pytest.mark.parametrize(
    ("kwargs", "parts"),
    [
        ({"cpus": 0}, ["cpus", "between 1 and", "this host's CPUs", "not 0"]),
        ({"cpus": HOST_CPUS + 1}, ["cpus", f"between 1 and {HOST_CPUS}", f"not {HOST_CPUS + 1}"]),
        ({"cpus": True}, ["cpus", "not True"]),
        ({"cpus": 1.5}, ["cpus", "integer", "not 1.5"]),
        ({"memory_mib": 127}, ["memory_mib", "between 128 and 65536", "not 127"]),
        ({"memory_mib": 65537}, ["memory_mib", "between 128 and 65536", "not 65537"]),
        ({"disk_size_mib": 255}, ["disk_size_mib", "between 256 and 2097152", "2 TiB", "not 255"]),
        ({"disk_size_mib": 2097153}, ["disk_size_mib", "2097152", "not 2097153"]),
        ({"name": "Web"}, ["name", "[a-z0-9][a-z0-9_.-]{0,62}", "'Web'"]),
        ({"name": ""}, ["name", "not ''"]),
        ({"name": "-web"}, ["name", "'-web'"]),
        ({"name": "a" * 64}, ["name", "{0,62}"]),
        ({"name": "web box"}, ["name", "'web box'"]),
        ({"accel": "hvf"}, ["accel", "auto, kvm, tcg", "'hvf'"]),
        ({"boot_timeout": 0}, ["boot_timeout", "> 0", "not 0"]),
        ({"boot_timeout": -1.0}, ["boot_timeout", "not -1.0"]),
        ({"boot_timeout": float("nan")}, ["boot_timeout", "nan"]),
        ({"image": ""}, ["image", "empty"]),
        ({"image": "bad image"}, ["image", "whitespace"]),
        ({"env": {"1X": "v"}}, ["env name", "'1X'", "[A-Za-z_][A-Za-z0-9_]*"]),
        ({"env": {"A-B": "v"}}, ["env name", "'A-B'"]),
        ({"env": {"A=B": "v"}}, ["env name", "'A=B'"]),
        ({"env": {"": "v"}}, ["env name", "''"]),
        ({"env": {"A": "x\0y"}}, ["env['A']", "NUL"]),
        ({"env": {"A": 1}}, ["env['A']", "string", "not 1"]),
        ({"env": ["A=1"]}, ["env", "mapping"]),
        ({"workdir": "srv"}, ["workdir", "absolute", "'srv'"]),
        ({"user": ""}, ["user", "empty"]),
        ({"user": "a b"}, ["user", "'a b'"]),
        ({"auto_remove": "yes"}, ["auto_remove", "'yes'"]),
        ({"labels": {"-x": "1"}}, ["label name", "'-x'"]),
        ({"labels": {"x": "\0"}}, ["labels['x']", "NUL"]),
        ({"ports": [Port(70000, 80)]}, ["ports[0].host", "between 0 and 65535", "not 70000"]),
        ({"ports": [Port(-1, 80)]}, ["ports[0].host", "0 = pick", "not -1"]),
        ({"ports": [Port(8080, 0)]}, ["ports[0].guest", "between 1 and 65535", "not 0"]),
        ({"ports": [Port(1, 2), Port(8080, 65536)]}, ["ports[1].guest", "not 65536"]),
        ({"ports": [Port(8080, 80, "sctp")]}, ["ports[0].protocol", "tcp, udp", "'sctp'"]),
        ({"ports": [Port(8080, 80, host_ip="localhost")]}, ["ports[0].host_ip", "'localhost'"]),
        ({"ports": ["8080:80"]}, ["ports[0]", "must be a Port"]),
        (
            {"ports": [Port(8080, 80), Port(8080, 81)]},
            ["ports[1]", "host port", "8080", "ports[0]"],
        ),
        ({"ports": [Port(8080, 80, host_ip="0.0.0.0"), Port(8080, 81)]}, ["ports[1]", "8080"]),
        (
            {"ports": [Port(8080, 80), Port(8081, 80)]},
            ["ports[1]", "guest port 80/tcp", "ports[0]"],
        ),
        (
            {"volumes": [Volume("relative", "/data")]},
            ["volumes[0].host_path", "absolute", "'relative'"],
        ),
        (
            {"volumes": [Volume("/no/such/folder/x", "/data")]},
            ["volumes[0].host_path", "does not exist"],
        ),
        ({"volumes": [Volume("/tmp", "data")]}, ["volumes[0].guest_path", "absolute", "'data'"]),
        ({"volumes": [Volume("/tmp", "/")]}, ["volumes[0].guest_path", "must not be '/'"]),
        ({"volumes": [Volume("/tmp", "/data/..")]}, ["volumes[0].guest_path", "'/data/..'"]),
        ({"volumes": [Volume("/tmp", "/proc/x")]}, ["volumes[0].guest_path", "'/proc'"]),
        (
            {"volumes": [Volume("/tmp", "/d"), Volume("/tmp", "/d/")]},
            ["volumes[1].guest_path", "volumes[0]"],
        ),
        ({"volumes": [Volume("/tmp", "/d", read_only="no")]}, ["volumes[0].read_only"]),
    ],
)
def test_invalid_options_name_the_field_and_range(kwargs: dict[str, Any], parts: list[str]) -> None:
    fails(parts, **kwargs)


def test_valid_edges() -> None:
    BoxOptions(cpus=HOST_CPUS, memory_mib=128, disk_size_mib=256, name="a")
    BoxOptions(memory_mib=65536, disk_size_mib=2 * 1024 * 1024, name="a" * 63)
    BoxOptions(name="0web_1.x-y", env={"_A1": "", "PATH": "/bin"}, boot_timeout=0.5)
    # the same host port on different protocols / addresses of different families, host 0 twice
    BoxOptions(
        ports=[
            Port(8080, 80),
            Port(8080, 80, "udp"),
            Port(8080, 81, host_ip="::1"),
            Port(0, 82),
            Port(0, 83),
            Port(65535, 65535, host_ip="10.0.0.1"),
        ]
    )


def test_name_hint_explains_the_shape() -> None:
    err = fails(["name"], name="UPPER")
    assert "lowercase" in err.hint


def test_port_and_volume_parse() -> None:
    assert Port.parse("8080:80") == Port(8080, 80)
    assert Port.parse("80/udp") == Port(0, 80, "udp")
    assert Port.parse("0.0.0.0:53:53/udp") == Port(53, 53, "udp", "0.0.0.0")
    assert Port.parse("[::1]:8080:80") == Port(8080, 80, "tcp", "::1")
    for bad in ("", "a:b", "1:2:3:4", "8080:80/sctp", "99999:80", "[::1:80"):
        with pytest.raises(ConfigError):
            Port.parse(bad)
    assert Volume.parse("/tmp:/data:ro") == Volume("/tmp", "/data", True)
    assert Volume.parse("/tmp:/data") == Volume("/tmp", "/data", False)
    for bad in ("/tmp", "/tmp:/data:rx", "a:b:c:d"):
        with pytest.raises(ConfigError):
            Volume.parse(bad)


def test_options_are_immutable_and_hashable() -> None:
    env = {"A": "1"}
    o = BoxOptions(env=env, ports=[Port(1, 2)])
    env["A"] = "changed"  # the caller's dict is copied
    assert o.env["A"] == "1"
    with pytest.raises(TypeError):
        o.env["B"] = "2"  # type: ignore[index]
    assert isinstance(o.ports, tuple)
    assert hash(o) == hash(BoxOptions(env={"A": "1"}, ports=(Port(1, 2),)))
    assert o == BoxOptions(env={"A": "1"}, ports=(Port(1, 2),))
    assert o != BoxOptions(env={"A": "2"}, ports=(Port(1, 2),))


def test_json_round_trip(tmp_path: Path) -> None:
    o = BoxOptions(
        image="docker.io/library/alpine:3",
        name="web",
        cpus=1,
        memory_mib=512,
        disk_size_mib=4096,
        env={"A": "1", "B": "x y"},
        workdir="/srv",
        user="1000:1000",
        ports=[Port(8080, 80), Port(0, 53, "udp", "0.0.0.0")],
        volumes=[Volume(str(tmp_path), "/data", read_only=True)],
        auto_remove=True,
        accel="tcg",
        boot_timeout=12.5,
        labels={"com.example/team": "infra"},
    )
    text = json.dumps(o.to_json())
    back = BoxOptions.from_json(json.loads(text))
    assert back == o
    assert back.to_json() == o.to_json()


def test_from_json_tolerates_vanished_host_facts_and_unknown_keys(tmp_path: Path) -> None:
    """Stored options stay readable when a volume folder is deleted later (start re-checks)."""
    folder = tmp_path / "vol"
    folder.mkdir()
    o = BoxOptions(volumes=[Volume(str(folder), "/data")])
    data = o.to_json()
    folder.rmdir()
    data["from_a_newer_hutch"] = 1
    back = BoxOptions.from_json(data)
    assert back == o
    with pytest.raises(ConfigError, match="does not exist"):
        back.validate()
    back.validate(host=False)
    # shape rules are still enforced on load
    data["memory_mib"] = 1
    with pytest.raises(ConfigError, match="memory_mib"):
        BoxOptions.from_json(data)
    # missing keys take their defaults
    assert BoxOptions.from_json({"image": "busybox"}) == BoxOptions()
