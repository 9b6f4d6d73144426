"""Startup benchmark: cold boot vs restore from a snapshot vs a warm pool, and many concurrent
clones.

* **cold**: ``Runtime.create(pool=False)`` → ``start()`` (boot) → first ``exec("true")`` result.
* **restore**: ``Runtime.create(snapshot=…)`` → ``start()`` (restore) → first ``exec("true")``
  result, from a snapshot of an idle busybox box. Also reported: create → the agent's HELLO
  (``restore_hello``) and the first exec alone (under TCG most of it is translating the guest's
  fork/exec code for the first time in that QEMU process — a cold box pays it too).
* **pooled**: ``Runtime.create`` handing out a box of the runtime's warm pool (restored and
  warmed up ahead of time: ``configure_pool``) → first ``exec("true")`` result. Also reported:
  ``create`` alone (the hand-out: store row, new identity), how long the pool took to fill the
  first time (seed boot + snapshot + restore) and to refill after a hand-out.
* **clones**: K boxes restored from the snapshot at once: the time until every one is restored
  (its agent said HELLO) and until every one has answered an ``exec``; then, idle, the host memory each costs: the PSS of its QEMU process
  (``/proc/PID/smaps_rollup``: shared pages, such as the snapshot's RAM in the page cache, are
  split between the processes sharing them) and the drop in the host's ``MemAvailable``.
* **snapshot**: how long ``box.snapshot()`` takes (the source VM is paused for part of it).

Cold, restore and pooled samples alternate, so host noise hits all three alike. The pool holds
one box; after each pooled sample the bench waits until it is refilled, so that no refill runs
during another sample (the idle pooled box is there throughout).

    python bench/startup.py [--samples 30] [--clones 30] [--quick] [--json]

``--json`` prints one JSON object as the last line. ``--quick`` (8 samples, 10 clones) finishes
in well under a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import hutch


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of values."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return round(ordered[k], 1)


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": pct(values, 50), "p99": pct(values, 99), "min": round(min(values), 1)}


def mem_available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


async def cold_sample(rt: hutch.Runtime, memory: int) -> float:
    t0 = time.perf_counter()
    box = await rt.create(image="busybox", memory_mib=memory, auto_remove=True, pool=False)
    try:
        await box.start()
        (await box.exec("true")).assert_success()
        return (time.perf_counter() - t0) * 1000
    finally:
        await box.remove()


async def restore_sample(rt: hutch.Runtime, snap: hutch.Snapshot) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    box = await rt.create(snapshot=snap, auto_remove=True)
    try:
        await box.start()
        t1 = time.perf_counter()
        (await box.exec("true")).assert_success()
        t2 = time.perf_counter()
        return (t2 - t0) * 1000, (t1 - t0) * 1000, (t2 - t1) * 1000
    finally:
        await box.remove()


async def pooled_sample(rt: hutch.Runtime, memory: int) -> tuple[float, float, float]:
    """(create → first exec, create alone, hand-out → pool full again) in ms."""
    t0 = time.perf_counter()
    box = await rt.create(image="busybox", memory_mib=memory, auto_remove=True)
    t1 = time.perf_counter()
    try:
        assert box.state == "running", "the pool had no ready box"
        (await box.exec("true")).assert_success()
        t2 = time.perf_counter()
    finally:
        await box.remove()
    await rt.wait_pool(120)
    t3 = time.perf_counter()
    return (t2 - t0) * 1000, (t1 - t0) * 1000, (t3 - t1) * 1000


async def clones(rt: hutch.Runtime, snap: hutch.Snapshot, k: int) -> dict[str, Any]:
    await asyncio.sleep(1.0)
    avail_before = mem_available_kib()
    t0 = time.perf_counter()
    boxes = [await rt.create(snapshot=snap, auto_remove=True) for _ in range(k)]

    restored: list[float] = []

    async def up(box: hutch.Box) -> None:
        await box.start()
        restored.append(time.perf_counter())
        (await box.exec("true")).assert_success()

    try:
        await asyncio.gather(*(up(b) for b in boxes))
        all_ms = (time.perf_counter() - t0) * 1000
        restored_ms = (max(restored) - t0) * 1000
        await asyncio.sleep(2.0)  # idle
        pss = [pss_kib(b.qemu_pid) for b in boxes if b.qemu_pid]
        avail_after = mem_available_kib()
        answers = await asyncio.gather(*(b.exec("hostname") for b in boxes))
        assert len({a.stdout for a in answers}) == k  # every clone is itself
    finally:
        await asyncio.gather(*(b.remove() for b in boxes), return_exceptions=True)
    return {
        "clones": k,
        "all_restored_ms": round(restored_ms, 1),
        "all_answering_ms": round(all_ms, 1),
        "pss_per_clone_mib": round(statistics.mean(pss) / 1024, 1),
        "pss_max_mib": round(max(pss) / 1024, 1),
        "mem_available_drop_per_clone_mib": round((avail_before - avail_after) / k / 1024, 1),
    }


async def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--samples", type=int, default=None, help="per kind (default 30; quick 8)")
    ap.add_argument("--clones", type=int, default=None, help="concurrent (default 30; quick 10)")
    ap.add_argument("--memory", type=int, default=256, help="guest MiB (default 256)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    samples = args.samples or (8 if args.quick else 30)
    k = args.clones or (10 if args.quick else 30)

    async with hutch.Runtime() as rt:
        source = await rt.create(image="busybox", memory_mib=args.memory, auto_remove=True)
        await source.start()
        (await source.exec("true")).assert_success()
        snap_ms = []
        for _ in range(3):
            t0 = time.perf_counter()
            extra = await source.snapshot()
            snap_ms.append((time.perf_counter() - t0) * 1000)
            await rt.remove_snapshot(extra.id)
        snap = await source.snapshot()
        await source.stop()  # the source's QEMU must not compete with the samples
        try:
            t0 = time.perf_counter()
            await rt.configure_pool("busybox", memory_mib=args.memory, size=1)
            await rt.wait_pool(300)
            fill_ms = (time.perf_counter() - t0) * 1000
            await restore_sample(rt, snap)  # warm the page cache
            await cold_sample(rt, args.memory)
            await pooled_sample(rt, args.memory)
            cold, restore, hello, first = [], [], [], []
            pooled, handout, refill = [], [], []
            for _ in range(samples):
                cold.append(await cold_sample(rt, args.memory))
                total, h, f = await restore_sample(rt, snap)
                restore.append(total)
                hello.append(h)
                first.append(f)
                total, c, r = await pooled_sample(rt, args.memory)
                pooled.append(total)
                handout.append(c)
                refill.append(r)
            pool = (await rt.pool_status())[0]
            await rt.configure_pool("busybox", memory_mib=args.memory, size=0)
            many = await clones(rt, snap, k)
        finally:
            await rt.remove_snapshot(snap.id)
            await source.remove()

    result: dict[str, Any] = {
        "accel": source.accel,
        "memory_mib": args.memory,
        "samples": samples,
        "cold_create_to_first_exec_ms": summary(cold),
        "restore_create_to_first_exec_ms": summary(restore),
        "restore_create_to_hello_ms": summary(hello),
        "restore_first_exec_ms": summary(first),
        "restore_vs_cold_p50_ratio": round(pct(restore, 50) / pct(cold, 50), 3),
        "pooled_create_to_first_exec_ms": summary(pooled),
        "pooled_create_ms": summary(handout),
        "pooled_vs_cold_p50_ratio": round(pct(pooled, 50) / pct(cold, 50), 3),
        "pooled_vs_restore_p50_ratio": round(pct(pooled, 50) / pct(restore, 50), 3),
        "pool_first_fill_ms": round(fill_ms, 1),
        "pool_refill_ms": summary(refill),
        "pool_misses": pool.misses,
        "pool_failures": pool.failures,
        "snapshot_ms": summary(snap_ms),
        "snapshot_ram_mib": round(snap.ram_bytes / 2**20, 1),
        "snapshot_state_kib": round(snap.state_bytes / 1024, 1),
        **{f"clones_{key}": value for key, value in many.items()},
    }
    if not args.json:
        print(f"accelerator {result['accel']}, {samples} samples each, guest {args.memory} MiB")
        for key in (
            "cold_create_to_first_exec_ms",
            "restore_create_to_first_exec_ms",
            "restore_create_to_hello_ms",
            "restore_first_exec_ms",
            "pooled_create_to_first_exec_ms",
            "pooled_create_ms",
            "pool_refill_ms",
            "snapshot_ms",
        ):
            s = result[key]
            print(f"{key:34} p50 {s['p50']:7.1f}  p99 {s['p99']:7.1f}  min {s['min']:7.1f}")
        print(
            f"p50 ratios: restore/cold {result['restore_vs_cold_p50_ratio']}, pooled/cold "
            f"{result['pooled_vs_cold_p50_ratio']}, pooled/restore "
            f"{result['pooled_vs_restore_p50_ratio']}; the pool filled in {fill_ms:.0f} ms"
        )
        print(
            f"{k} concurrent clones: all restored after {many['all_restored_ms']:.0f} ms, all "
            f"answering an exec after {many['all_answering_ms']:.0f} ms; "
            f"per idle clone PSS {many['pss_per_clone_mib']} MiB, MemAvailable drop "
            f"{many['mem_available_drop_per_clone_mib']} MiB"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
