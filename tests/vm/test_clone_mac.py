"""Identity after a restore, the network part: a clone of a box with ``network="outbound"`` must
show the guest a MAC of its own (issue 6, *Identity after every restore*), the one its QEMU
command line gives its NIC (:func:`hutch.vm.network.mac_for` of the clone's id), and its network
must keep working with it (RESTORE's ``MAC``, protocol 1.4)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import hutch
from hutch.vm.network import GATEWAY, mac_for
from tests.support.homes import make_home

pytestmark = pytest.mark.vm

MAC_FILE = "/sys/class/net/eth0/address"


async def test_clone_of_an_outbound_box_gets_a_new_mac(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 9\r\n\r\nfrom-host")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, hutch.Runtime(home) as rt:
        src = await rt.create(image="busybox", network="outbound")
        await src.start()
        try:
            src_mac = (await src.exec("cat", MAC_FILE)).stdout.strip()
            assert src_mac == mac_for(src.id)
            clone = await src.clone()
            try:
                clone_mac = (await clone.exec("cat", MAC_FILE)).stdout.strip()
                assert clone_mac == mac_for(clone.id) and clone_mac != src_mac
                # the network still works with the new address: a round trip through slirp
                # (frames back to the guest are addressed to its new MAC)
                # (no `wget -T`: Debian's busybox 1.35 wget crashes with SIGSEGV when given it)
                r = await clone.exec(
                    "wget", "-q", "-O", "-", f"http://{GATEWAY}:{port}/", timeout=30
                )
                assert r.assert_success().stdout == "from-host"
            finally:
                await rt.remove(clone.id, force=True)
        finally:
            await rt.remove(src.id, force=True)
