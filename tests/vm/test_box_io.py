"""Volumes, network modes and published ports, with real guests (TCG here).

Three booted boxes serve most tests: ``io_box`` (network "outbound": volumes of every kind, a fixed
and a picked tcp port, a udp port), ``many_box`` (8 volumes at once, network "none" with a
published port: the restricted NIC) and the session's plain ``box`` (no NIC at all).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import socket
import subprocess
import threading
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

import hutch
from hutch.errors import ConfigError, ConflictError
from hutch.runtime.options import Port, Volume
from tests.conftest import hutch_cli
from tests.support.homes import make_home

pytestmark = pytest.mark.vm

#: A UDP echo server for the guest (busybox's nc has no -u): static, so it runs from a volume.
UDP_ECHO_C = r"""
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>
int main(int argc, char **argv) {
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[1])) };
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) < 0) return 1;
    for (;;) {
        char buf[2048]; struct sockaddr_in from; socklen_t n = sizeof from;
        ssize_t len = recvfrom(s, buf, sizeof buf, 0, (struct sockaddr *)&from, &n);
        if (len > 0) { buf[0] ^= 0x20; sendto(s, buf, (size_t)len, 0, (struct sockaddr *)&from, n); }
    }
}
"""


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 20.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return bytes(r.read())


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_home(tmp_path_factory.mktemp("io") / "home")


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shared")
    rw, ro, tools = root / "rw", root / "ro", root / "tools"
    for d in (rw, ro, tools):
        d.mkdir()
    (ro / "fixed.txt").write_text("read-only data\n")
    (rw / "from-host.txt").write_text("written on the host\n")
    (root / "app.conf").write_text("setting=1\n")
    (root / "secret-sibling.txt").write_text("the guest must not see this\n")
    (tools / "udpecho.c").write_text(UDP_ECHO_C)
    subprocess.run(
        ["gcc", "-static", "-O2", "-o", str(tools / "udpecho"), str(tools / "udpecho.c")],
        check=True,
    )
    return {"root": root, "rw": rw, "ro": ro, "tools": tools, "file": root / "app.conf"}


@pytest.fixture(scope="module")
def host_server() -> Iterator[int]:
    """A tiny HTTP server on the host's loopback (what a box reaches at 10.0.2.2)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"hello from the host\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def fixed_port() -> int:
    return free_port()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def io_box(home: Path, shared: dict[str, Path], fixed_port: int) -> AsyncIterator[hutch.Box]:
    box = hutch.Box(
        "busybox",
        home=home,
        network="outbound",
        ports=[Port(fixed_port, 80), Port(0, 8080), Port(0, 5353, "udp")],
        volumes=[
            Volume(str(shared["rw"]), "/data"),
            Volume(str(shared["ro"]), "/srv/ro", read_only=True),
            Volume(str(shared["tools"]), "/opt/my tools", read_only=True),
            Volume(str(shared["file"]), "/etc/app.conf"),
        ],
    )
    await box.start()
    try:
        # busybox httpd on 80 and 8080, serving /www (on the box's own disk)
        (
            await box.exec(
                "sh",
                "-c",
                "mkdir -p /www && echo hello from the guest > /www/index.html && "
                "httpd -p 80 -h /www && httpd -p 8080 -h /www",
            )
        ).assert_success()
        yield box
    finally:
        await box.remove()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def many_box(
    home: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[hutch.Box, list[Path]]]:
    root = tmp_path_factory.mktemp("eight")
    folders = []
    for i in range(8):
        d = root / f"v{i}"
        d.mkdir()
        (d / "marker").write_text(f"volume {i}\n")
        folders.append(d)
    volumes = [Volume(str(d), f"/mnt/v{i}", read_only=i % 2 == 1) for i, d in enumerate(folders)]
    box = hutch.Box("busybox", home=home, volumes=volumes, ports=[Port(0, 80)])
    await box.start()
    try:
        yield box, folders
    finally:
        await box.remove()


# --- published ports ------------------------------------------------------------------------


async def test_httpd_answers_through_fixed_and_picked_ports(
    io_box: hutch.Box, fixed_port: int
) -> None:
    by_guest = {(p.guest, p.protocol): p for p in io_box.ports}
    assert by_guest[(80, "tcp")].host == fixed_port
    picked = by_guest[(8080, "tcp")].host
    assert picked not in (0, fixed_port)
    for port in (fixed_port, picked):
        body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/index.html")
        assert body == b"hello from the guest\n"
    assert by_guest[(5353, "udp")].host != 0


async def test_same_host_port_twice_is_a_conflict_naming_it(
    io_box: hutch.Box, home: Path, fixed_port: int
) -> None:
    async with hutch.Runtime(home) as rt:
        other = await rt.create(image="busybox", ports=[Port(fixed_port, 81)])
        with pytest.raises(ConflictError, match=f"127.0.0.1:{fixed_port}/tcp") as info:
            await other.start()
        assert "ports[0]" in info.value.message and "0 to have a free one picked" in info.value.hint
        assert (await rt.get(other.id)).state == "created"  # refused before anything started
        # a host port taken by something else than a box, on every address
        with socket.socket() as s:
            s.bind(("0.0.0.0", 0))
            s.listen()
            taken = s.getsockname()[1]
            busy = await rt.create(image="busybox", ports=[Port(taken, 80, host_ip="0.0.0.0")])
            with pytest.raises(ConflictError, match=str(taken)):
                await busy.start()
        await rt.remove(other.id)
        await rt.remove(busy.id)


async def test_port_taken_after_the_check_is_mapped_from_qemu(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QEMU's own "could not set up host forwarding rule" (someone bound the port between the
    check and QEMU) is the same ConflictError."""
    from hutch.vm import network

    monkeypatch.setattr(network, "check_ports", lambda *args: None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        box = hutch.Box("busybox", home=home, ports=[Port(taken, 80)])
        try:
            with pytest.raises(ConflictError, match=f"127.0.0.1:{taken}/tcp"):
                await box.start()
            assert box.state == "failed"
        finally:
            await box.remove()


async def test_udp_forward(io_box: hutch.Box) -> None:
    proc = await io_box.spawn("/opt/my tools/udpecho", "5353", stdin=False)
    try:
        port = next(p.host for p in io_box.ports if p.protocol == "udp")

        def roundtrip() -> bytes:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(0.5)
                for _ in range(40):  # the server may not be bound yet
                    s.sendto(b"ping over udp", ("127.0.0.1", port))
                    with contextlib.suppress(TimeoutError):
                        return s.recvfrom(2048)[0]
            raise AssertionError("no UDP answer from the guest")

        assert await asyncio.to_thread(roundtrip) == b"Ping over udp"
    finally:
        await proc.kill()
        await proc.wait()


async def test_ports_are_recorded_for_inspect_and_ps(io_box: hutch.Box, home: Path) -> None:
    env = {"HUTCH_HOME": str(home)}
    r = await asyncio.to_thread(hutch_cli, "inspect", io_box.id, env_extra=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert sorted((p["guest"], p["protocol"], p["host"]) for p in doc["ports"]) == sorted(
        (p.guest, p.protocol, p.host) for p in io_box.ports
    )
    assert any(e["kind"] == "ports" for e in doc["events"])
    assert doc["options"]["network"] == "outbound"
    r = await asyncio.to_thread(hutch_cli, "ps", "--json", env_extra=env)
    [rec] = [b for b in json.loads(r.stdout) if b["id"] == io_box.id]
    assert len(rec["ports"]) == 3


async def test_cli_run_publishes_and_shares(home: Path, shared: dict[str, Path]) -> None:
    r = await asyncio.to_thread(
        hutch_cli,
        "run",
        "-v",
        f"{shared['ro']}:/in:ro",
        "-p",
        "80",
        "busybox",
        "--",
        "cat",
        "/in/fixed.txt",
        env_extra={"HUTCH_HOME": str(home)},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"read-only data\n"
    assert b"published 127.0.0.1:" in r.stderr and b"-> 80/tcp" in r.stderr
    bad = await asyncio.to_thread(
        hutch_cli, "run", "-p", "1:2:3:4", "busybox", env_extra={"HUTCH_HOME": str(home)}
    )
    assert bad.returncode == 125 and b"must look like" in bad.stderr


# --- volumes --------------------------------------------------------------------------------


async def test_rw_volume_both_ways(io_box: hutch.Box, shared: dict[str, Path]) -> None:
    r = await io_box.exec(
        "sh", "-c", "cat /data/from-host.txt && echo written in the guest > /data/from-guest.txt"
    )
    assert r.assert_success().stdout == "written on the host\n"
    assert (shared["rw"] / "from-guest.txt").read_text() == "written in the guest\n"
    (shared["rw"] / "later.txt").write_text("changed on the host\n")  # no caching in the guest
    assert (await io_box.exec("cat", "/data/later.txt")).stdout == "changed on the host\n"
    # a folder and a symlink made in the guest stay inside the share on the host
    await io_box.exec("sh", "-c", "mkdir -p /data/sub/dir && ln -s /etc /data/sub/link")
    assert (shared["rw"] / "sub" / "dir").is_dir()


async def test_ro_volume_refuses_writes_even_after_a_remount(
    io_box: hutch.Box, shared: dict[str, Path]
) -> None:
    r = await io_box.exec("sh", "-c", "echo x > /srv/ro/fixed.txt")
    assert r.exit_code != 0 and "Read-only file system" in r.stderr
    # guest root remounts it read-write: QEMU (readonly=on) still refuses every write
    r = await io_box.exec(
        "sh",
        "-c",
        "mount -o remount,rw /srv/ro; echo x > /srv/ro/fixed.txt; touch /srv/ro/new; "
        "rm -f /srv/ro/fixed.txt; ls /srv/ro",
    )
    assert "Read-only file system" in r.stderr
    assert r.stdout.split() == ["fixed.txt"]
    assert (shared["ro"] / "fixed.txt").read_text() == "read-only data\n"
    assert sorted(p.name for p in shared["ro"].iterdir()) == ["fixed.txt"]


async def test_single_file_volume(io_box: hutch.Box, shared: dict[str, Path]) -> None:
    r = await io_box.exec("sh", "-c", "cat /etc/app.conf; echo setting=2 >> /etc/app.conf")
    assert r.assert_success().stdout == "setting=1\n"
    assert shared["file"].read_text() == "setting=1\nsetting=2\n"
    # only the file is shared: its siblings on the host are nowhere in the guest
    r = await io_box.exec(
        "sh", "-c", "grep -rl 'must not see' /etc /data /srv /opt /run; ls /run/hutch"
    )
    assert "must not see" not in r.stdout and r.stdout.strip() == ""
    assert "No such file" in r.stderr  # the exports' hidden mounts are gone too


async def test_eight_volumes_at_once(many_box: tuple[hutch.Box, list[Path]]) -> None:
    box, folders = many_box
    r = (await box.exec("sh", "-c", "cat /mnt/v*/marker; mount | grep -c ' type 9p '")).stdout
    assert r.splitlines() == [f"volume {i}" for i in range(8)] + ["8"]
    script = "for i in 0 1 2 3 4 5 6 7; do echo $i > /mnt/v$i/out 2>/dev/null; done; true"
    await box.exec("sh", "-c", script)
    for i, d in enumerate(folders):
        assert (d / "out").exists() == (i % 2 == 0), i


async def test_volume_host_path_rechecked_at_start(home: Path, tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    async with hutch.Runtime(home) as rt:
        box = await rt.create(image="busybox", volumes=[Volume(str(gone), "/data")])
        gone.rmdir()
        with pytest.raises(ConfigError, match=r"volumes\[0\].host_path .* does not exist"):
            await box.start()
        assert (await rt.get(box.id)).state == "created"
        await rt.remove(box.id)


async def test_volume_over_a_file_of_the_image_fails_the_start(
    home: Path, shared: dict[str, Path]
) -> None:
    box = hutch.Box("busybox", home=home, volumes=[Volume(str(shared["ro"]), "/etc/passwd/x")])
    try:
        with pytest.raises(ConfigError, match="/etc/passwd/x"):
            await box.start()
        assert box.state == "failed"
    finally:
        await box.remove()


async def test_snapshot_of_a_box_with_volumes_is_refused(io_box: hutch.Box) -> None:
    with pytest.raises(ConfigError, match="has volumes"):
        await io_box.snapshot()


# --- network modes --------------------------------------------------------------------------


async def test_outbound_reaches_a_host_server_via_the_gateway(
    io_box: hutch.Box, host_server: int
) -> None:
    r = await io_box.exec("wget", "-q", "-O", "-", f"http://10.0.2.2:{host_server}/", timeout=30)
    assert r.assert_success().stdout == "hello from the host\n"
    r = await io_box.exec(
        "sh", "-c", "cat /etc/resolv.conf; ip route; cat /sys/class/net/eth0/address"
    )
    assert "nameserver 10.0.2.3" in r.stdout and "default via 10.0.2.2" in r.stdout
    mac = r.stdout.split()[-1]
    assert mac.startswith("02:") and mac == hutch_mac(io_box.id)


def hutch_mac(box_id: str) -> str:
    from hutch.vm.network import mac_for

    return mac_for(box_id)


async def test_network_none_has_no_nic(box: hutch.Box) -> None:
    r = await box.exec(
        "sh", "-c", "ls /sys/class/net; timeout 10 wget -q -O - http://10.0.2.2:80/", timeout=30
    )
    assert r.stdout.split() == ["lo"]
    assert r.exit_code != 0 and "unreachable" in r.stderr.lower()


async def test_network_none_with_ports_forwards_only(
    many_box: tuple[hutch.Box, list[Path]], host_server: int
) -> None:
    box, _ = many_box
    await box.exec("sh", "-c", "mkdir -p /www && echo restricted > /www/i && httpd -p 80 -h /www")
    [port] = box.ports
    assert await asyncio.to_thread(http_get, f"http://127.0.0.1:{port.host}/i") == b"restricted\n"
    # eth0 is there for the forwards, but no route and no DNS: nothing else is reachable
    r = await box.exec(
        "sh", "-c", f"ip route; timeout 10 wget -q -O - http://10.0.2.2:{host_server}/", timeout=30
    )
    assert "default" not in r.stdout
    assert r.exit_code != 0 and "hello from the host" not in r.stdout
    r = await box.exec("timeout", "10", "wget", "-q", "-O", "-", "http://1.1.1.1/", timeout=30)
    assert r.exit_code != 0 and "unreachable" in r.stderr.lower()


async def test_clone_of_an_outbound_box_gets_its_own_ports(home: Path, host_server: int) -> None:
    async with hutch.Runtime(home) as rt:
        src = await rt.create(image="busybox", network="outbound", ports=[Port(0, 80)])
        await src.start()
        await src.exec("sh", "-c", "mkdir -p /www && echo cloned > /www/i && httpd -p 80 -h /www")
        clone = await src.clone()
        assert clone.ports[0].host not in (0, src.ports[0].host)
        for b in (src, clone):
            url = f"http://127.0.0.1:{b.ports[0].host}/i"
            assert await asyncio.to_thread(http_get, url) == b"cloned\n"
        r = await clone.exec("wget", "-q", "-O", "-", f"http://10.0.2.2:{host_server}/", timeout=30)
        assert r.stdout == "hello from the host\n"
        await rt.remove(clone.id, force=True)
        await rt.remove(src.id, force=True)


async def test_guest_root_cannot_write_next_to_its_volumes(
    many_box: tuple[hutch.Box, list[Path]],
) -> None:
    """The exports stay busy while the box's volumes use them; guest root may unmount every
    volume and mount an export itself: it then sees the volumes' mount points, but the export's
    own folder (on the host's tmpfs) is read-only, and so is everything in the ro export.
    (Runs last: it unmounts the volumes of ``many_box``.)"""
    box, folders = many_box
    mount = "mount -t 9p -o trans=virtio,version=9p2000.L"
    r = await box.exec("sh", "-c", f"mkdir -p /tmp/x && {mount} hutchrw /tmp/x")
    assert "busy" in r.stderr
    r = await box.exec(
        "sh",
        "-c",
        "umount /mnt/v0 /mnt/v1 /mnt/v2 /mnt/v3 /mnt/v4 /mnt/v5 /mnt/v6 /mnt/v7 && mkdir -p /tmp/y"
        f" && {mount} hutchrw /tmp/x && {mount} hutchro /tmp/y && ls /tmp/x /tmp/y;"
        " touch /tmp/x/planted; touch /tmp/y/planted; touch /tmp/y/1/planted; touch /tmp/x/0/ok",
    )
    assert r.stdout.split() == ["/tmp/x:", "0", "2", "4", "6", "/tmp/y:", "1", "3", "5", "7"]
    assert r.stderr.count("Read-only file system") == 3, r.stderr
    assert (folders[0] / "ok").exists() and not (folders[1] / "planted").exists()
