"""Image benchmark: hutch pull + base-disk build vs `skopeo copy` + fakeroot `mkfs.ext4 -d`.

Both sides fetch the same Debian bookworm + python3 image (one gzip layer of ≈216 MB, pushed by
this script to a real `docker-registry` on loopback) and end with an 8 GiB sparse ext4 holding it:

- baseline: ``skopeo copy docker://… oci:DIR`` then, in one fakeroot session on tmpfs,
  ``tar -xzf`` of every layer and ``mkfs.ext4 -d TREE`` with hutch's mkfs options;
- hutch: ``hutch.images.pull.pull`` into an empty hutch home (digest checks, blob cache,
  whiteout-aware layer applier, base disk, store record).

Rounds alternate; ``ratio`` = hutch median / baseline median. Then, with the registry stopped, the
image work of creating another box from the cached image (``ensure_image``, what ``Box.start``
does before booting) is timed 30 times.

    python bench/images.py [--rounds 3] [--json]

Needs: docker-registry, skopeo, fakeroot, mmdebstrap (the image is made once and cached in
/var/tmp/hutch-bench).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # for tests.support (registry server, pusher)

from tests.support.push import push_image  # noqa: E402
from tests.support.registry import RegistryServer  # noqa: E402

from hutch.images.pull import ensure_image, pull  # noqa: E402
from hutch.images.rootfs import MKFS_OPTIONS  # noqa: E402
from hutch.paths import HutchPaths  # noqa: E402

CACHE = Path("/var/tmp/hutch-bench")
BASE_SIZE = 8 << 30


def debian_rootfs() -> Path:
    out = CACHE / "debian-python.tar"
    if not out.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        print("making the Debian + python3 rootfs with mmdebstrap (once, ~35 s)", file=sys.stderr)
        tmp = out.with_suffix(".tmp.tar")
        subprocess.run(
            [
                "mmdebstrap",
                "--quiet",
                "--variant=minbase",
                "--include=python3",
                "bookworm",
                str(tmp),
            ],
            check=True,
        )
        tmp.replace(out)
    return out


def baseline(host: str, ref: str, work: Path) -> float:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tree = Path(tempfile.mkdtemp(prefix="bench-tree-", dir="/dev/shm"))
    try:
        t0 = time.perf_counter()
        subprocess.run(
            [
                "skopeo",
                "copy",
                "--quiet",
                "--src-tls-verify=false",
                f"docker://{host}/{ref}",
                f"oci:{work / 'oci'}:1",
            ],
            check=True,
        )
        index = json.loads((work / "oci" / "index.json").read_text())
        mdig = index["manifests"][0]["digest"].split(":")[1]
        manifest = json.loads((work / "oci" / "blobs" / "sha256" / mdig).read_text())
        image = work / "base.ext4"
        with image.open("wb") as f:
            f.truncate(BASE_SIZE)
        q = shlex.quote
        steps = [
            f"tar -xzf {q(str(work / 'oci' / 'blobs' / 'sha256' / layer['digest'].split(':')[1]))} "
            f"-C {q(str(tree))}"
            for layer in manifest["layers"]
        ]
        steps.append(
            " ".join(["mkfs.ext4", *map(q, MKFS_OPTIONS), "-d", q(str(tree)), q(str(image))])
        )
        subprocess.run(
            ["fakeroot", "--", "sh", "-c", " && ".join(steps)], check=True, capture_output=True
        )
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(tree, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def hutch_pull(ref: str, home: Path) -> float:
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    (home / "config.toml").write_text(f"[images]\nbase_size = {BASE_SIZE}\n")
    t0 = time.perf_counter()
    asyncio.run(pull(ref, paths=HutchPaths(home)))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    for tool in ("skopeo", "docker-registry", "fakeroot", "mmdebstrap"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed: apt-get install {tool}")
    rootfs = debian_rootfs()
    with tempfile.TemporaryDirectory(prefix="hutch-bench-images-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        with RegistryServer(root / "registry") as registry:
            print("pushing the image (gzip) to the local registry", file=sys.stderr)
            push_image(
                registry.url,
                "bench/debian-python",
                "1",
                [rootfs.read_bytes()],
                {"config": {"Cmd": ["python3"]}},
                compression="gzip",
            )
            ref = f"{registry.host}/bench/debian-python:1"
            base_s: list[float] = []
            hutch_s: list[float] = []
            for i in range(args.rounds):
                base_s.append(baseline(registry.host, "bench/debian-python:1", root / "skopeo"))
                hutch_s.append(hutch_pull(ref, root / "home"))
                print(
                    f"round {i + 1}: baseline {base_s[-1]:.2f} s, hutch {hutch_s[-1]:.2f} s",
                    file=sys.stderr,
                )
            registry.stop()  # from here on, any network I/O would fail
            paths = HutchPaths(root / "home")
            ensure_ms: list[float] = []
            for _ in range(30):
                t0 = time.perf_counter()
                asyncio.run(ensure_image(ref, paths=paths))
                ensure_ms.append((time.perf_counter() - t0) * 1000)
    ensure_ms.sort()
    result = {
        "image": "debian bookworm + python3 (1 gzip layer)",
        "layer_mb": round(os.path.getsize(rootfs) / 1e6, 1),
        "rounds": args.rounds,
        "baseline_skopeo_mkfs_s_p50": round(statistics.median(base_s), 3),
        "hutch_pull_build_s_p50": round(statistics.median(hutch_s), 3),
        "ratio": round(statistics.median(hutch_s) / statistics.median(base_s), 3),
        "cached_image_work_ms_p50": round(ensure_ms[len(ensure_ms) // 2], 2),
        "cached_image_work_ms_max": round(ensure_ms[-1], 2),
    }
    if not args.json:
        print(
            f"baseline skopeo copy + fakeroot mkfs.ext4 -d  p50 {result['baseline_skopeo_mkfs_s_p50']:7.2f} s"
        )
        print(
            f"hutch pull + base disk                        p50 {result['hutch_pull_build_s_p50']:7.2f} s"
        )
        print(f"ratio (hutch / baseline)                          {result['ratio']:7.3f}")
        print(
            f"second box from cached image: image work      p50 {result['cached_image_work_ms_p50']:7.2f} ms (no registry)"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
