"""Server benchmark: the exec round trip embedded vs through ``hutch serve``, and a bounded load run.

A real ``hutch serve`` is started on the Unix socket of a throw-away home (sharing the default
home's set-up artifacts and cache, so nothing is copied and the user's boxes are not touched):

* **round trip**: ``exec("true")`` on an in-process ``hutch.Box`` (embedded, its own throw-away
  home) and ``RemoteBox.exec("true")`` through the server, same box size, samples alternating so
  host noise hits both alike; ``ratio`` = server p50 / embedded p50 (target ≤ 2).
* **load**: C clients, each with its own connection (its own ``hutch.connect()``), run E execs each
  (``echo <client>-<i>``) at the same time against B boxes of the server; every result is checked
  (exit status and output). Reported: throughput and latency p50/p90/p99.

Everything is removed at the end, also on Ctrl-C or SIGTERM: the remote boxes, the server (SIGTERM,
it stops what it runs), the embedded box and both homes. The server runs under ``setpriv
--pdeathsig KILL`` where available, so even a killed benchmark leaves no server (nor VM) behind.

    python bench/server.py [--runs 200] [--clients 20] [--execs 50] [--boxes 3] [--quick] [--json]

``--quick``: 60 round trips, 20 clients x 10 execs on 2 boxes. ``--json`` prints only one JSON
object of the figures (always the last line). The exit status is 1 if any load result was wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

import hutch
from hutch.client import RemoteBox, RemoteRuntime, connect
from hutch.paths import HutchPaths

BOX_OPTIONS: dict[str, Any] = {"image": "busybox", "cpus": 1, "memory_mib": 256}
TARGET_RATIO = 2.0
#: Bounds, so that a stuck server or guest ends the run instead of hanging it.
SERVER_START_TIMEOUT = 30.0
LOAD_TIMEOUT = 600.0


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of values."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return round(ordered[k], 3)


def make_home(root: Path) -> Path:
    """A home that shares the default home's artifacts (kernel, agent, images) and cache."""
    default = HutchPaths.default()
    root.mkdir(parents=True)
    (root / "artifacts").symlink_to(default.artifacts)
    (root / "cache").symlink_to(default.cache)
    return root


class Server:
    """``hutch serve`` on ``home``'s Unix socket, in a session of its own (a Ctrl-C in the
    terminal reaches the benchmark only, which then stops the server in order)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.socket = home / "hutch.sock"
        self.url = f"unix://{self.socket}"
        self.log = home / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = Path(sys.executable).parent / "hutch"
        argv = [str(exe), "serve"] if exe.exists() else [sys.executable, "-m", "hutch", "serve"]
        guard = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [*guard, *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, "HUTCH_HOME": str(self.home)},
                start_new_session=True,
            )
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        transport = httpx.HTTPTransport(uds=str(self.socket))
        with httpx.Client(transport=transport, base_url="http://hutch", timeout=1) as c:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"hutch serve exited with {self.proc.returncode}: {self.tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if c.get("/health").status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"hutch serve did not answer in time: {self.tail()}")
                time.sleep(0.05)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # the server stops the boxes it runs, then exits
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


async def round_trips(
    box: hutch.Box, remote: RemoteBox, runs: int
) -> tuple[list[float], list[float]]:
    for _ in range(10):  # warm both paths (guest code translation, connections)
        await box.exec("true")
        await remote.exec("true")
    embedded: list[float] = []
    served: list[float] = []
    for _ in range(runs):
        t0 = time.perf_counter()
        (await box.exec("true")).assert_success()
        embedded.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        (await remote.exec("true")).assert_success()
        served.append((time.perf_counter() - t0) * 1000)
    return embedded, served


async def client(
    url: str, box_id: str, n: int, execs: int, start: asyncio.Event
) -> tuple[list[float], list[str]]:
    """One load client on its own connection: ``execs`` echo commands, each result checked."""
    latencies: list[float] = []
    wrong: list[str] = []
    async with connect(url) as rt:
        box = await rt.get(box_id)
        await start.wait()
        for i in range(execs):
            expected = f"{n}-{i}\n"
            t0 = time.perf_counter()
            try:
                r = await box.exec("echo", f"{n}-{i}")
            except hutch.HutchError as e:
                wrong.append(f"client {n} exec {i}: {type(e).__name__}: {e.message}")
                continue
            latencies.append((time.perf_counter() - t0) * 1000)
            if r.exit_code != 0 or r.stdout != expected or r.stderr:
                wrong.append(f"client {n} exec {i}: {r.exit_code} {r.stdout!r} {r.stderr!r}")
    return latencies, wrong


async def load(
    url: str, boxes: list[RemoteBox], clients: int, execs: int
) -> tuple[list[float], list[str], float]:
    start = asyncio.Event()
    tasks = [
        asyncio.create_task(client(url, boxes[n % len(boxes)].id, n, execs, start))
        for n in range(clients)
    ]
    await asyncio.sleep(0.5)  # let every client connect and find its box first
    t0 = time.perf_counter()
    start.set()
    try:
        results = await asyncio.wait_for(asyncio.gather(*tasks), LOAD_TIMEOUT)
    finally:
        for t in tasks:
            t.cancel()
    wall = time.perf_counter() - t0
    latencies = [x for lat, _ in results for x in lat]
    wrong = [w for _, bad in results for w in bad]
    return latencies, wrong, wall


async def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    server = Server(make_home(work / "srv"))
    embedded: hutch.Box | None = None
    rt: RemoteRuntime | None = None
    made: list[RemoteBox] = []
    try:
        await asyncio.to_thread(server.start)
        rt = await connect(server.url)
        embedded = hutch.Box(home=make_home(work / "emb"), **BOX_OPTIONS)
        remote = await rt.create(name="bench-0", **BOX_OPTIONS)
        made.append(remote)
        await asyncio.gather(embedded.start(), remote.start())
        emb_ms, srv_ms = await round_trips(embedded, remote, args.runs)
        accel = embedded.accel
        await embedded.remove()  # its CPU goes to the load run
        embedded = None

        for k in range(1, args.boxes):
            made.append(await rt.create(name=f"bench-{k}", **BOX_OPTIONS))
        await asyncio.gather(*(b.start() for b in made[1:]))
        latencies, wrong, wall = await load(server.url, made, args.clients, args.execs)
    finally:
        with contextlib.suppress(BaseException):
            if embedded is not None:
                await embedded.remove()
        for b in made:
            with contextlib.suppress(BaseException):
                await b.remove()
        if rt is not None:
            with contextlib.suppress(BaseException):
                await rt.close()
        await asyncio.to_thread(server.stop)
    total = args.clients * args.execs
    return {
        "accel": accel,
        "runs": args.runs,
        "embedded_exec_ms_p50": pct(emb_ms, 50),
        "embedded_exec_ms_p99": pct(emb_ms, 99),
        "server_exec_ms_p50": pct(srv_ms, 50),
        "server_exec_ms_p99": pct(srv_ms, 99),
        "ratio": round(pct(srv_ms, 50) / pct(emb_ms, 50), 3),
        "ratio_p99": round(pct(srv_ms, 99) / pct(emb_ms, 99), 3),
        "target_ratio": TARGET_RATIO,
        "load_clients": args.clients,
        "load_execs_per_client": args.execs,
        "load_boxes": args.boxes,
        "load_execs": total,
        "load_ok": total - len(wrong),
        "load_wrong": len(wrong),
        "load_wrong_examples": wrong[:5],
        "load_wall_s": round(wall, 3),
        "load_execs_per_s": round(len(latencies) / wall, 1) if wall > 0 else 0.0,
        "load_ms_p50": pct(latencies, 50) if latencies else None,
        "load_ms_p90": pct(latencies, 90) if latencies else None,
        "load_ms_p99": pct(latencies, 99) if latencies else None,
        "load_ms_max": round(max(latencies), 3) if latencies else None,
    }


async def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--runs", type=int, default=200, help="round trips of each kind")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--execs", type=int, default=50, help="execs per client")
    ap.add_argument("--boxes", type=int, default=3, help="server boxes the clients share")
    ap.add_argument("--quick", action="store_true", help="60 round trips, 20 x 10 execs, 2 boxes")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.execs, args.boxes = 60, 10, 2
    if min(args.runs, args.clients, args.execs, args.boxes) < 1:
        ap.error("--runs, --clients, --execs and --boxes must be at least 1")

    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)  # SIGTERM cleans up like Ctrl-C
    # A short path: the server's Unix socket must fit in 107 bytes.
    work = Path(tempfile.mkdtemp(prefix="hutch-bench-srv-", dir="/tmp"))
    try:
        result = await bench(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not args.json:
        print(f"accelerator: {result['accel']}; {args.runs} round trips of each, alternating")
        print(
            f"embedded exec true   p50 {result['embedded_exec_ms_p50']:8.3f} ms   "
            f"p99 {result['embedded_exec_ms_p99']:8.3f} ms"
        )
        print(
            f"server   exec true   p50 {result['server_exec_ms_p50']:8.3f} ms   "
            f"p99 {result['server_exec_ms_p99']:8.3f} ms   (Unix socket)"
        )
        print(f"ratio (server / embedded, p50) {result['ratio']:.3f}  (target <= {TARGET_RATIO})")
        print(
            f"load: {args.clients} clients x {args.execs} execs on {args.boxes} boxes: "
            f"{result['load_execs_per_s']} exec/s over {result['load_wall_s']} s; "
            f"p50 {result['load_ms_p50']} / p90 {result['load_ms_p90']} / "
            f"p99 {result['load_ms_p99']} ms; wrong results: {result['load_wrong']}"
        )
        for line in result["load_wrong_examples"]:
            print(f"  {line}")
    print(json.dumps(result))
    return 1 if result["load_wrong"] else 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except KeyboardInterrupt:  # Ctrl-C: the finally blocks above have cleaned up
        print("bench/server.py: interrupted; cleaned up", file=sys.stderr)
        sys.exit(130)
    except asyncio.CancelledError:  # SIGTERM: the same
        print("bench/server.py: terminated; cleaned up", file=sys.stderr)
        sys.exit(143)
