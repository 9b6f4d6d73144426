"""The built-in debian-python image (mmdebstrap, made on first use) boots and runs python3."""

from __future__ import annotations

import pytest

import hutch

pytestmark = [pytest.mark.vm, pytest.mark.slow]


async def test_debian_python_runs_python() -> None:
    async with hutch.Box("debian-python", memory_mib=512) as box:
        assert box.image_record is not None and box.image_record.source.startswith("archive")
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
