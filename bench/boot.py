"""Boot benchmark: hutch create+start+first exec vs a raw QEMU boot of the same kernel+initramfs.

The raw baseline boots the same kernel and initramfs with the same machine options, with
``hutch.probe=1`` so the agent prints a marker on the serial console as soon as it runs as init;
the time is QEMU launch → marker. hutch's figure is ``Box()`` → ``start()`` → first ``exec("true")``
result. Both are measured alternately in one run; ``ratio`` = hutch median / raw median.

    python bench/boot.py [--runs 10] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import time

import hutch
from hutch.guest.kernel import kernel_cmdline
from hutch.paths import HutchPaths
from hutch.setup import load_manifest
from hutch.vm.accel import resolve_accel


async def raw_boot(kernel: str, initramfs: str, accel: str) -> float:
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu
    accel_args = (
        ["-accel", "kvm", "-cpu", "host"]
        if accel == "kvm"
        else ["-accel", "tcg,tb-size=16", "-cpu", "max"]
    )
    argv = [
        qemu,
        "-M",
        "microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off",
        *accel_args,
        "-m",
        "256M",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-display",
        "none",
        "-kernel",
        kernel,
        "-initrd",
        initramfs,
        "-append",
        kernel_cmdline(["hutch.probe=1"]),
        "-serial",
        "stdio",
    ]
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    assert proc.stdout
    seen = b""
    elapsed = float("nan")
    while chunk := await proc.stdout.read(4096):
        seen += chunk
        if b"HUTCH-PROBE-OK" in seen:
            elapsed = time.perf_counter() - t0
            break
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
    raw, total, boot = [], [], []
    for _ in range(args.runs):
        raw.append(await raw_boot(m.kernel, m.initramfs, verdict.accel))
        t, b = await hutch_boot()
        total.append(t)
        boot.append(b)
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
