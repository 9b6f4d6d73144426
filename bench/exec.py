"""Exec benchmark on one running box: round trip of `true`, agent ping, and streaming throughput.

Baselines in the same run: the portal ping, the guest's own shell forking and exec'ing /bin/true
(the in-guest floor for any exec), and for streaming the same producer piped into a reader inside the
guest (so the ratios show what the portal costs).

    python bench/exec.py [--runs 50] [--mib 64] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import hutch


async def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    async with hutch.Box("busybox", cpus=1, memory_mib=256) as box:
        for _ in range(5):
            await box.exec("true")
        pings = [await box.ping() * 1000 for _ in range(args.runs)]
        # in-guest floor: the guest's own shell forking and exec'ing /bin/true
        loop = "i=0; while [ $i -lt 50 ]; do /bin/true; i=$((i+1)); done"
        floor = [(await box.exec("sh", "-c", loop)).duration_ms / 50 for _ in range(3)]
        rtts = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            await box.exec("true")
            rtts.append((time.perf_counter() - t0) * 1000)
        size = args.mib << 20
        count = size // (64 << 10)
        produce = f"dd if=/dev/zero bs=64k count={count} 2>/dev/null"
        # guest-only baseline: the same producer into a pipe read inside the guest
        r = await box.exec("sh", "-c", f"{produce} | dd of=/dev/null bs=64k 2>/dev/null")
        guest_only_s = r.duration_ms / 1000
        t0 = time.perf_counter()
        ex = await box.spawn("sh", "-c", produce, stdin=False)
        n = 0
        async for chunk in ex.stdout:
            n += len(chunk)
        await ex.wait()
        stream_s = time.perf_counter() - t0
        assert n == size
    q = statistics.quantiles
    result = {
        "ping_ms_p50": round(statistics.median(pings), 3),
        "exec_true_ms_p50": round(statistics.median(rtts), 3),
        "exec_true_ms_p99": round(q(rtts, n=100)[98], 3),
        "guest_sh_fork_exec_ms": round(statistics.median(floor), 3),
        "exec_over_guest_fork_exec_ratio": round(
            statistics.median(rtts) / statistics.median(floor), 2
        ),
        "stdout_stream_mb_s": round(size / stream_s / 1e6, 1),
        "guest_pipe_mb_s": round(size / max(guest_only_s, 0.01) / 1e6, 1),
        "stream_mib": args.mib,
    }
    if not args.json:
        print(f"ping p50              {result['ping_ms_p50']:8.3f} ms")
        print(f"guest sh fork+exec    {result['guest_sh_fork_exec_ms']:8.3f} ms (in-guest floor)")
        print(
            f"exec true p50 / p99   {result['exec_true_ms_p50']:8.3f} / {result['exec_true_ms_p99']:.3f} ms"
        )
        print(
            f"stdout streaming      {result['stdout_stream_mb_s']:8.1f} MB/s "
            f"(same producer into a pipe read in the guest: {result['guest_pipe_mb_s']} MB/s)"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
