"""Box and runtime metrics with real values: a busy guest raises CPU, allocating raises memory."""

from __future__ import annotations

from pathlib import Path

import pytest

import hutch
from tests.support.homes import make_home

pytestmark = pytest.mark.vm


async def test_box_and_runtime_metrics(tmp_path: Path) -> None:
    async with hutch.Runtime(make_home(tmp_path / "home")) as rt:
        box = await rt.create(image="busybox", memory_mib=256)
        await box.start()
        idle = await box.metrics()
        assert idle.total_create_ms is not None and idle.total_create_ms > 0
        assert idle.guest_boot_ms is not None and 0 < idle.guest_boot_ms < idle.total_create_ms
        assert 200 << 20 < idle.memory_total_bytes <= 256 << 20
        assert 0 < idle.memory_bytes < idle.memory_total_bytes
        assert idle.qemu_rss_bytes > 0
        assert idle.commands == 0  # hutch's own /proc/meminfo read is not counted

        busy = await box.spawn("sh", "-c", "while :; do :; done")
        await box.metrics()  # starts a new CPU window
        hot = await box.metrics()
        assert hot.cpu_percent > 50, hot  # a spinning vCPU is a busy host thread
        await busy.kill()
        await busy.wait()

        hog = await box.spawn(
            "sh",
            "-c",
            "mount -t tmpfs -o size=80m none /mnt && dd if=/dev/zero of=/mnt/fill bs=1M count=64 "
            "2>/dev/null && echo ready && sleep 600",
        )
        assert await hog.stdout.read_chunk() == b"ready\n"
        full = await box.metrics()
        assert full.memory_bytes > idle.memory_bytes + (40 << 20), (idle, full)
        assert full.qemu_rss_bytes > idle.qemu_rss_bytes + (40 << 20)
        await hog.kill()
        await hog.wait()

        with pytest.raises(hutch.NotFoundError):
            await box.exec("no-such-program")
        with pytest.raises(hutch.TimeoutError):
            await box.exec("sleep", "5", timeout=0.3)
        m = await box.metrics()
        assert (m.commands, m.errors) == (3, 2)  # busy, hog, sleep started; 2 failed calls
        rm = await rt.metrics()
        assert (rm.boxes_created, rm.boxes_failed, rm.running) == (1, 0, 1)
        assert (rm.commands, rm.errors) == (3, 2)
        await box.stop()
        assert (await box.metrics()).cpu_percent == 0.0
        assert (await rt.metrics()).running == 0
