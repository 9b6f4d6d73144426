"""Volumes, network and published ports without a guest: QEMU arguments, kernel command-line
entries, host checks, and reading back what QEMU bound."""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from hutch.errors import ConfigError, ConflictError, EngineError
from hutch.runtime.options import MAX_VOLUMES, BoxOptions, Port, Volume
from hutch.vm import attach, network, volumes
from hutch.vm.cmdline import KERNEL_CMDLINE_MAX, VmSpec, check_kernel_cmdline, qemu_command

# --- options ----------------------------------------------------------------------------------


def test_network_option_validated_and_stored() -> None:
    assert BoxOptions().network == "none"
    assert BoxOptions(network="outbound").to_json()["network"] == "outbound"
    with pytest.raises(ConfigError, match="network must be one of none, outbound, allowlist, not 'bridge'"):
        BoxOptions(network="bridge")  # type: ignore[arg-type]
    # rows stored before the field existed read back with the default
    old = BoxOptions().to_json()
    del old["network"]
    assert BoxOptions.from_json(old).network == "none"
    assert BoxOptions.from_json(BoxOptions(network="outbound").to_json()).network == "outbound"


def test_volume_limits_and_kinds(tmp_path: Path) -> None:
    BoxOptions(volumes=[Volume(str(tmp_path), f"/v{i}") for i in range(MAX_VOLUMES)])
    with pytest.raises(ConfigError, match=f"at most {MAX_VOLUMES}"):
        BoxOptions(volumes=[Volume(str(tmp_path), f"/v{i}") for i in range(MAX_VOLUMES + 1)])
    fifo = tmp_path / "fifo"
    subprocess.run(["mkfifo", str(fifo)], check=True)
    with pytest.raises(ConfigError, match="must be a folder or a regular file"):
        BoxOptions(volumes=[Volume(str(fifo), "/x")])


# --- volumes ----------------------------------------------------------------------------------


def test_guest_paths_are_encoded_for_the_kernel_command_line() -> None:
    for path in ("/data", "/with space/x", "/a:b%c", '/q"uote', "/ünï/cödé", "/a,b=c+d@e~f"):
        enc = volumes.encode_guest_path(path)
        assert not any(c in enc for c in ' :"\t') and enc.isascii()
        assert urllib.parse.unquote(enc) == path
    assert volumes.encode_guest_path("/srv/my data") == "/srv/my%20data"


def test_volume_plan_orders_parents_first_and_detects_files(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("x")
    mounts = volumes.plan(
        [
            Volume(str(tmp_path), "/data/sub/deeper/"),
            Volume(str(tmp_path / "f.txt"), "/etc/f.txt", read_only=True),
            Volume(str(tmp_path), "/data"),
        ]
    )
    assert [(m.index, m.guest_path, m.file) for m in mounts] == [
        (2, "/data", False),
        (1, "/etc/f.txt", True),
        (0, "/data/sub/deeper", False),
    ]
    assert [m.kernel_arg() for m in mounts] == [
        "hutch.vol=hutchrw/2:rw:d:/data",
        "hutch.vol=hutchro/1:ro:f:/etc/f.txt",
        "hutch.vol=hutchrw/0:rw:d:/data/sub/deeper",
    ]


def test_volume_plan_rechecks_the_host(tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    opts = BoxOptions(volumes=[Volume(str(tmp_path), "/a"), Volume(str(gone), "/b")])
    gone.rmdir()
    with pytest.raises(ConfigError, match=r"volumes\[1\].host_path .* does not exist"):
        volumes.plan(opts.volumes)


def test_staging_and_qemu_arguments(tmp_path: Path) -> None:
    host = tmp_path / "host,with,commas"
    host.mkdir()
    (host / "f").write_text("x")
    mounts = volumes.plan(
        [Volume(str(host), "/rw"), Volume(str(host / "f"), "/ro/f", read_only=True)]
    )
    staging = tmp_path / "run" / "vols"
    volumes.stage(mounts, staging)
    assert (staging / "rw" / "0").is_dir() and (staging / "ro" / "1").is_file()
    assert list((staging / "rw" / "0").iterdir()) == []  # mount points only: binds are QEMU's
    args = volumes.qemu_args(mounts, staging, model="none")
    assert args == [
        "-fsdev",
        f"local,id=hutchrw,path={staging}/rw,security_model=none,readonly=off,multidevs=remap",
        "-device",
        "virtio-9p-device,fsdev=hutchrw,mount_tag=hutchrw",
        "-fsdev",
        f"local,id=hutchro,path={staging}/ro,security_model=none,readonly=on,multidevs=remap",
        "-device",
        "virtio-9p-device,fsdev=hutchro,mount_tag=hutchro",
    ]
    # only the exports that are needed
    ro_only = [m for m in mounts if m.read_only]
    assert "hutchrw" not in " ".join(volumes.qemu_args(ro_only, staging, model="none"))
    # a comma in a host path is doubled for QEMU's option parser
    comma_root = tmp_path / "a,b"
    assert "path=" + str(comma_root).replace(",", ",,") + "/rw," in " ".join(
        volumes.qemu_args(mounts, comma_root, model="none")
    )
    volumes.stage(mounts, staging)  # again (a restart): recreated from scratch


def test_security_model_follows_the_user() -> None:
    assert volumes.security_model(0) == "mapped-xattr"
    assert volumes.security_model(1000) == "none"


def test_launcher_binds_in_a_private_mount_namespace(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    mounts = volumes.plan(
        [Volume(str(tmp_path), "/rw"), Volume(str(tmp_path / "f"), "/f", read_only=True)]
    )
    staging = tmp_path / "vols"
    assert volumes.launcher([], staging) == []
    root = volumes.launcher(mounts, staging, euid=0)
    user = volumes.launcher(mounts, staging, euid=1000)
    assert root[1:3] == ["--mount", "--"]
    assert user[1:5] == ["--user", "--map-root-user", "--mount", "--"]
    i = root.index("hutch-volumes")
    assert root[i + 1 :] == [
        f"{staging}/rw", f"{staging}/rw", "ro",
        str(tmp_path), f"{staging}/rw/0", "rw",
        str(tmp_path / "f"), f"{staging}/ro/1", "ro",
        "--",
    ]  # fmt: skip


def test_mount_script_binds_then_execs(tmp_path: Path) -> None:
    """The script itself, with a fake ``mount`` that records its calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    (bin_dir / "mount").write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    (bin_dir / "mount").chmod(0o755)
    out = subprocess.run(
        ["sh", "-c", volumes.MOUNT_SCRIPT, "x", "/a", "/b", "rw", "/c", "/d", "ro", "--", "echo",
         "exec'd", "$HOME"],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )  # fmt: skip
    assert out.stdout == "exec'd $HOME\n"
    assert log.read_text().splitlines() == [
        "--bind -- /a /b",
        "--bind -- /c /d",
        "-o remount,bind,ro -- /d",
    ]


# --- network ----------------------------------------------------------------------------------


def test_mac_is_stable_local_and_unicast() -> None:
    mac = network.mac_for("1a2b3c")
    assert mac == network.mac_for("1a2b3c") != network.mac_for("1a2b3d")
    first = int(mac.split(":")[0], 16)
    assert first & 0b10 and not first & 0b01 and len(mac.split(":")) == 6


RUN = Path("/run/hutch-test/box")


def test_network_plans() -> None:
    assert network.plan(BoxOptions(), "b1", RUN) is None
    out = network.plan(BoxOptions(network="outbound"), "b1", RUN)
    assert out is not None and not out.restricted
    assert out.kernel_args() == ["hutch.net=10.0.2.15/24,10.0.2.2,10.0.2.3"]
    assert out.qemu_args() == [
        "-netdev",
        "user,id=net0,restrict=off,ipv6=off",
        "-device",
        f"virtio-net-device,netdev=net0,mac={network.mac_for('b1')}",
    ]
    ports = [Port(8080, 80), Port(0, 53, "udp", "0.0.0.0")]
    fwd = network.plan(BoxOptions(ports=ports), "b1", RUN)
    assert fwd is not None and fwd.restricted
    assert fwd.kernel_args() == ["hutch.net=10.0.2.15/24"]  # no route, no DNS
    assert fwd.qemu_args()[1] == (
        "user,id=net0,restrict=on,ipv6=off,"
        "hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=udp:0.0.0.0:0-:53"
    )
    allow = network.plan(BoxOptions(network="allowlist", allow=["pypi.org"]), "b1", RUN)
    assert allow is not None and allow.restricted and allow.proxy_socket == RUN / "egress.sock"
    assert allow.kernel_args() == ["hutch.net=10.0.2.15/24"]
    netdev = allow.qemu_args()[1]
    assert "restrict=on" in netdev and "guestfwd=tcp:10.0.2.100:3128-cmd:" in netdev
    assert netdev.endswith(str(RUN / "egress.sock"))


def test_check_ports_names_a_taken_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        ports = [Port(0, 22), Port(taken, 80)]
        with pytest.raises(ConflictError, match=rf"127.0.0.1:{taken}/tcp \(ports\[1\]"):
            network.check_ports(ports)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        taken = s.getsockname()[1]
        with pytest.raises(ConflictError, match=f"{taken}/udp"):
            network.check_ports([Port(taken, 53, "udp")])
    network.check_ports([Port(0, 1), Port(0, 2, "udp")])  # port 0 is never checked


def test_check_ports_refuses_what_slirp_cannot_forward() -> None:
    with pytest.raises(ConfigError, match=r"ports\[0\].host_ip must be an IPv4 address"):
        network.check_ports([Port(8080, 80, host_ip="::1")])
    with pytest.raises(ConfigError, match="not an address of this host"):
        network.check_ports([Port(8080, 80, host_ip="192.0.2.77")])


def test_udp_ports_need_outbound() -> None:
    """Restricted slirp (network "none") drops all guest UDP, replies to forwards included."""
    with pytest.raises(ConfigError, match=r"ports\[1\] publishes UDP port 53, which needs"):
        network.check_ports([Port(0, 80), Port(0, 53, "udp")], "none")
    network.check_ports([Port(0, 53, "udp")], "outbound")
    network.check_ports([Port(0, 80)], "none")


def test_qemu_forwarding_failure_is_a_conflict() -> None:
    out = (
        "qemu-system-x86_64: -netdev user,id=net0,hostfwd=tcp:127.0.0.1:45783-:80: "
        "Could not set up host forwarding rule 'tcp:127.0.0.1:45783-:80'\n"
    )
    ports = [Port(0, 22), Port(45783, 80)]
    err = network.forward_failure(out, ports)
    assert isinstance(err, ConflictError)
    assert "127.0.0.1:45783/tcp (ports[1]" in err.message
    assert network.forward_failure("qemu: something else\n", ports) is None


USERNET = (
    "Hub -1 (net0):\r\n"
    "  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n"
    "  TCP[HOST_FORWARD]  11       127.0.0.1 40409       10.0.2.15    80     0     0\r\n"
    "  TCP[HOST_FORWARD]   8               * 44405       10.0.2.15    81     0     0\r\n"
    "  UDP[HOST_FORWARD]   9       127.0.0.1 44037       10.0.2.15    53     0     0\r\n"
    "  TCP[ESTABLISHED]   12       127.0.0.1 50000       10.0.2.15    80     0     0\r\n"
)


def test_picked_host_ports_are_read_back() -> None:
    assert network.parse_usernet(USERNET) == [
        ("tcp", "127.0.0.1", 40409, 80),
        ("tcp", "0.0.0.0", 44405, 81),
        ("udp", "127.0.0.1", 44037, 53),
    ]
    ports = [Port(0, 80), Port(9000, 81, host_ip="0.0.0.0"), Port(0, 53, "udp")]
    assert network.resolve_ports(ports, USERNET) == (
        Port(40409, 80),
        Port(9000, 81, host_ip="0.0.0.0"),
        Port(44037, 53, "udp"),
    )
    with pytest.raises(EngineError, match="guest port 99/tcp"):
        network.resolve_ports([Port(0, 99)], USERNET)


def test_published_ports_file(tmp_path: Path) -> None:
    ports = (Port(40409, 80), Port(44037, 53, "udp"))
    attach.write_ports(tmp_path, ports)
    assert attach.read_ports(tmp_path) == [p.to_json() for p in ports]
    assert json.loads((tmp_path / attach.PORTS_FILE).read_text())[0]["host"] == 40409
    assert attach.describe(ports) == "127.0.0.1:40409->80/tcp, 127.0.0.1:44037->53/udp"
    attach.clear_ports(tmp_path)
    assert attach.read_ports(tmp_path) == []


# --- the assembled command line ----------------------------------------------------------------


def spec(tmp_path: Path, **kw: object) -> VmSpec:
    return VmSpec(
        kernel=tmp_path / "k",
        initramfs=tmp_path / "i",
        root_disk=tmp_path / "d",
        cmdline=str(kw.pop("cmdline", "console=ttyS0")),
        portal_socket=tmp_path / "p",
        qmp_socket=tmp_path / "q",
        console_log=tmp_path / "c",
        ram_file=tmp_path / "r",
        **kw,  # type: ignore[arg-type]
    )


def test_devices_and_launcher_in_the_qemu_command(tmp_path: Path) -> None:
    io = attach.prepare(
        BoxOptions(volumes=[Volume(str(tmp_path), "/data")], network="outbound"),
        "b1",
        tmp_path / "run",
    )
    assert io.kernel_args == ["hutch.vol=hutchrw/0:rw:d:/data", "hutch.net=10.0.2.15/24,10.0.2.2,10.0.2.3"]  # fmt: skip
    argv = qemu_command(spec(tmp_path, devices=io.devices, launcher=io.launcher))
    assert argv[argv.index("virtio-rng-device") + 1 :][:8] == io.devices[:8]
    assert io.launcher[-1] == "--" and io.launcher[0].endswith("unshare")
    assert not attach.prepare(BoxOptions(), "b2", tmp_path / "run2").devices


def test_kernel_command_line_budget(tmp_path: Path) -> None:
    check_kernel_cmdline("x" * 100, ["virtio-blk-device,drive=root"])
    devices = ["-device", "virtio-9p-device,x", "-device", "virtio-net-device,y"]
    with pytest.raises(ConfigError, match="shorter volume guest paths"):
        check_kernel_cmdline("x" * (KERNEL_CMDLINE_MAX - 60), devices)
    with pytest.raises(ConfigError, match=f"more than the {KERNEL_CMDLINE_MAX}"):
        qemu_command(spec(tmp_path, cmdline="y" * 2100))


# --- what the agent reports ---------------------------------------------------------------------


async def test_hello_carries_setup_errors_bounded() -> None:
    import asyncio

    from hutch.portal import PortalChannel
    from hutch.portal.codec import Frame, MsgType, Tag, encode_tlv

    a, b = socket.socketpair()
    r, w = await asyncio.open_connection(sock=a)
    _, gw = await asyncio.open_connection(sock=b)
    channel = PortalChannel(r, w)
    tlv: list[tuple[Tag, int | str | bytes]] = [(Tag.VERSION, 1), (Tag.MINOR, 2)]
    tlv += [(Tag.SETUP_ERROR, f"volume /v{i}: " + "x" * 500) for i in range(20)]
    gw.write(Frame(MsgType.HELLO, 0, encode_tlv(tlv)).encode())
    hello = await asyncio.wait_for(channel.wait_hello(), 5)
    assert len(hello.setup_errors) == 8 and all(len(e) == 256 for e in hello.setup_errors)
    assert hello.setup_errors[0].startswith("volume /v0: ")
    await channel.close()
    gw.close()


async def test_finish_fails_the_start_on_what_the_agent_reports(tmp_path: Path) -> None:
    from hutch.errors import SetupError
    from hutch.portal import Hello

    io = attach.prepare(BoxOptions(volumes=[Volume(str(tmp_path), "/d")]), "b", tmp_path / "r")

    def hello(minor: int = 2, errors: tuple[str, ...] = ()) -> Hello:
        return Hello(1, "a", "k", 0, 0, minor=minor, setup_errors=errors)

    qemu: Any = None  # not reached: no port 0 to read back
    assert await attach.finish(qemu, hello(), io, 0.0) == ()
    with pytest.raises(SetupError, match="hutch setup"):
        await attach.finish(qemu, hello(minor=1), io, 0.0)
    with pytest.raises(ConfigError, match="volume /d: mounting: No such device"):
        await attach.finish(qemu, hello(errors=("volume /d: mounting: No such device",)), io, 0.0)
    with pytest.raises(EngineError, match="network: no eth0"):
        await attach.finish(qemu, hello(errors=("network: no eth0",)), io, 0.0)
    # a box with neither volumes nor a NIC does not care what the agent is
    assert await attach.finish(qemu, hello(minor=0), attach.Attachments(), 0.0) == ()


def test_launch_failures_are_explained(tmp_path: Path) -> None:
    class FakeQemu:
        log_path = tmp_path / "qemu.log"
        log_offset = 0

    opts = BoxOptions(volumes=[Volume(str(tmp_path), "/d")], ports=[Port(8080, 80)])
    qemu: Any = FakeQemu()
    FakeQemu.log_path.write_text("unshare: unshare failed: Operation not permitted\n")
    err = attach.failure(qemu, opts)
    assert isinstance(err, EngineError) and "user namespaces" in err.hint
    FakeQemu.log_path.write_text("mount: /x: special device /gone does not exist.\n")
    assert isinstance(attach.failure(qemu, opts), ConfigError)
    FakeQemu.log_path.write_text(
        "old run: Could not set up host forwarding rule 'tcp:127.0.0.1:8080-:80'\n"
    )
    assert isinstance(attach.failure(qemu, opts), ConflictError)
    FakeQemu.log_offset = FakeQemu.log_path.stat().st_size  # an earlier run's output is ignored
    assert attach.failure(qemu, opts) is None
