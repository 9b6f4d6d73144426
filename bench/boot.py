"""Boot benchmark: hutch create+start+first exec vs a raw QEMU boot of the same kernel+initramfs.

The raw baseline runs QEMU with exactly the command line hutch uses (same kernel, initramfs,
devices, disk overlay and RAM file) plus ``hutch.probe=1``, so the agent prints a marker on the
serial console as soon as it runs as init; the time is QEMU launch → marker. hutch's figure is
``Box()`` → ``start()`` → first ``exec("true")`` result. Both are measured alternately in one run; ``ratio`` = hutch median / raw median.

    python bench/boot.py [--runs 10] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import hutch
from hutch.guest.kernel import kernel_cmdline
from hutch.paths import HutchPaths, run_root
from hutch.setup import Manifest, load_manifest
from hutch.vm.accel import resolve_accel
from hutch.vm.cmdline import VmSpec, qemu_command


async def raw_boot(m: Manifest, accel: str, workdir: Path) -> float:
    """QEMU with hutch's exact command line (same devices, disk, RAM file), launch → init marker."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    disk = workdir / "disk.qcow2"
    base = m.image_path("busybox")
    assert base is not None
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(disk)],
        check=True,
    )
    spec = VmSpec(
        kernel=m.kernel_path,
        initramfs=m.initramfs_path,
        root_disk=disk,
        cmdline=kernel_cmdline(["hutch.probe=1"]),
        portal_socket=workdir / "portal.sock",
        qmp_socket=workdir / "qmp.sock",
        console_log=workdir / "console.log",
        ram_file=workdir / "ram",
        accel=accel,
        cpus=1,
        memory_mib=256,
    )
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *qemu_command(spec), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    elapsed = float("nan")
    while proc.returncode is None and time.perf_counter() - t0 < 30:
        if b"HUTCH-PROBE-OK" in spec.console_log.read_bytes() if spec.console_log.exists() else b"":
            elapsed = time.perf_counter() - t0
            break
        await asyncio.sleep(0.001)
    if proc.returncode is None:
        proc.kill()
    await proc.wait()
    return elapsed * 1000


async def hutch_boot() -> tuple[float, float]:
    t0 = time.perf_counter()
    box = hutch.Box("busybox", memory_mib=256)
    try:
        await box.start()
        (await box.exec("true")).assert_success()
        total = (time.perf_counter() - t0) * 1000
        return total, box.boot_ms or 0.0
    finally:
        await box.remove()


async def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    paths = HutchPaths.default()
    m = load_manifest(paths)
    verdict = await resolve_accel("auto", paths, m.kernel_path, m.initramfs_path)
    await hutch_boot()  # warm the page cache for both
    workdir = Path(
        tempfile.mkdtemp(prefix="hutch-bench-", dir=run_root().parent)
    )  # tmpfs, like boxes
    raw, total, boot = [], [], []
    for _ in range(args.runs):
        raw.append(await raw_boot(m, verdict.accel, workdir))
        t, b = await hutch_boot()
        total.append(t)
        boot.append(b)
    shutil.rmtree(workdir, ignore_errors=True)
    med = statistics.median
    result = {
        "accel": verdict.accel,
        "runs": args.runs,
        "raw_qemu_to_init_ms_p50": round(med(raw), 1),
        "hutch_create_to_first_exec_ms_p50": round(med(total), 1),
        "hutch_boot_to_hello_ms_p50": round(med(boot), 1),
        "hutch_create_to_first_exec_ms_max": round(max(total), 1),
        "ratio": round(med(total) / med(raw), 3),
    }
    if not args.json:
        print(f"accelerator: {verdict.accel}; {args.runs} runs each, alternating")
        print(f"raw QEMU → init          p50 {result['raw_qemu_to_init_ms_p50']:8.1f} ms")
        print(f"hutch start → hello      p50 {result['hutch_boot_to_hello_ms_p50']:8.1f} ms")
        print(f"hutch create → 1st exec  p50 {result['hutch_create_to_first_exec_ms_p50']:8.1f} ms")
        print(f"ratio (hutch / raw)          {result['ratio']:8.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
