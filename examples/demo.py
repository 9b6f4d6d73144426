"""`make demo`: boot a box from the built-in busybox image and run commands in it."""

from __future__ import annotations

import asyncio
import time

import hutch


async def main() -> None:
    t0 = time.monotonic()
    async with hutch.Box("busybox", cpus=1, memory_mib=256) as box:
        first = await box.exec("uname", "-a")
        t1 = time.monotonic()
        first.assert_success()
        print(f"$ uname -a\n{first.stdout}", end="")
        pipeline = (
            "ls /bin | wc -l | xargs echo applets in /bin:; cat /proc/cpuinfo | grep -c ^processor"
        )
        r = (await box.exec("sh", "-c", pipeline)).assert_success()
        print(f"$ sh -c '{pipeline}'\n{r.stdout}", end="")
        assert box.hello is not None and box.boot_ms is not None
        print(
            f"\nbooted box {box.id} with {box.accel} in {box.boot_ms:.0f} ms "
            f"(kernel {box.hello.kernel}; guest kernel→agent ready "
            f"{box.hello.boot_ready_us / 1000:.0f} ms); create→first exec result "
            f"{(t1 - t0) * 1000:.0f} ms"
        )


if __name__ == "__main__":
    asyncio.run(main())
