"""The built-in debian-python image (mmdebstrap, made on first use) boots and runs python3."""

from __future__ import annotations

from pathlib import Path

import pytest

import hutch

pytestmark = [pytest.mark.vm, pytest.mark.slow]


async def test_debian_python_runs_python() -> None:
    async with hutch.Box("debian-python", memory_mib=512) as box:
        assert box.image_record is not None and box.image_record.source.startswith(
            ("builtin", "archive")
        )
        r = await box.exec(
            "python3",
            "-c",
            "import sys, json, ssl; print(json.dumps([sys.version_info[0], 6 * 7]))",
        )
        assert r.exit_code == 0, r.stderr
        assert r.stdout == "[3, 42]\n"
        # ownership and modes survived fakeroot + mkfs: root-owned binaries, sticky /tmp, setuid su
        st = await box.exec("stat", "-c", "%U:%G %a", "/usr/bin/python3", "/tmp", "/bin/su")
        assert st.stdout.split("\n")[:3] == ["root:root 777", "root:root 1777", "root:root 4755"]
        os_release = await box.exec("cat", "/etc/os-release")
        assert "bookworm" in os_release.stdout


@pytest.mark.registry
async def test_debian_python_pulled_from_a_registry(registry: object, tmp_path: Path) -> None:
    """The same root filesystem, pushed to a real registry as an image and pulled back."""
    from hutch.images.pull import pull
    from hutch.images.store import ImageStore
    from hutch.paths import HutchPaths
    from tests.support.homes import make_home
    from tests.support.push import push_image

    rec = ImageStore(HutchPaths.default()).require("debian-python")
    blob = ImageStore(HutchPaths.default()).blobs.get(rec.layers[0].digest)
    if blob is None:
        pytest.skip("the debian-python layer blob was pruned from the cache")
    url, host = registry.url, registry.host  # type: ignore[attr-defined]
    push_image(
        url,
        "it/debian-python",
        "1",
        [blob.read_bytes()],
        {
            "config": {
                "Env": ["PATH=/usr/bin:/bin"],
                "Cmd": ["python3", "-c", "print('hi from cmd')"],
            }
        },
        compression="none",
    )
    home = make_home(tmp_path / "home", base_size="2G")
    ref = f"{host}/it/debian-python:1"
    await pull(ref, paths=HutchPaths(home))
    async with hutch.Box(ref, home=home, memory_mib=512) as box:
        assert (await box.exec()).stdout == "hi from cmd\n"
        r = await box.exec("python3", "-c", "import platform; print(platform.python_version())")
        assert r.exit_code == 0 and r.stdout.startswith("3.11"), r.stderr
