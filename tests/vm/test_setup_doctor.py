"""`hutch setup` (cached, user kernels) and `hutch doctor`, on the real host and a real guest."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import hutch
from hutch.setup import Manifest

from ..conftest import hutch_cli

pytestmark = pytest.mark.vm


def test_second_setup_is_a_no_op(manifest: Manifest) -> None:
    kernel_mtime = Path(manifest.kernel).stat().st_mtime_ns
    p = hutch_cli("setup")
    assert p.returncode == 0, p.stderr
    out = p.stderr.decode()
    assert "compiling" not in out and "writing" not in out, out
    assert Path(manifest.kernel).stat().st_mtime_ns == kernel_mtime
    assert manifest.kernel in out


def test_doctor_reports_accelerator_verdict_and_artifacts() -> None:
    p = hutch_cli("doctor", "--json")
    report = json.loads(p.stdout)
    checks = {c["check"]: c for c in report["checks"]}
    accel = checks["accelerator"]["detail"]
    assert accel.startswith(("KVM:", "TCG:")), accel
    if accel.startswith("TCG:"):  # it must say why KVM is not used
        assert "kvm" in accel.lower()
    if os.path.isdir("/sys/module/kvm_pvm"):  # this project's machines: nested PVM, TCG only
        assert accel.startswith("TCG:") and "PVM" in accel
    for name in ("qemu", "kernel", "initramfs", "agent", "disk space"):
        assert checks[name]["ok"] == "yes", checks[name]
    assert p.returncode == (0 if report["ok"] else 1)


def test_doctor_without_setup_says_what_to_do(tmp_path: Path) -> None:
    p = hutch_cli("doctor", "--json", env_extra={"HUTCH_HOME": str(tmp_path / "empty")})
    report = json.loads(p.stdout)
    assert p.returncode == 1 and not report["ok"]
    art = next(c for c in report["checks"] if c["check"] == "artifacts")
    assert art["ok"] == "no" and "hutch setup" in art["fix"]


async def test_user_supplied_vmlinux(manifest: Manifest, tmp_path: Path) -> None:
    home = tmp_path / "home"
    bad = tmp_path / "bzImage"
    bad.write_bytes(b"MZ not an elf")
    p = hutch_cli("setup", "--kernel", str(bad), env_extra={"HUTCH_HOME": str(home)})
    assert p.returncode == 125 and b"not an ELF vmlinux" in p.stderr
    p = hutch_cli("setup", "--kernel", manifest.kernel, env_extra={"HUTCH_HOME": str(home)})
    assert p.returncode == 0, p.stderr
    got = json.loads((home / "artifacts" / "manifest.json").read_text())
    assert got["kernel"] == manifest.kernel and got["kernel_source"] == "user"
    async with hutch.Box("busybox", home=home) as box:
        assert (await box.exec("true")).exit_code == 0


async def test_accel_kvm_on_a_host_without_working_kvm_is_a_clear_error(manifest: Manifest) -> None:
    from hutch.paths import HutchPaths
    from hutch.vm.accel import resolve_accel

    verdict = await resolve_accel(
        "auto", HutchPaths.default(), manifest.kernel_path, manifest.initramfs_path
    )
    box = hutch.Box("busybox", accel="kvm")
    if verdict.accel == "kvm":
        async with box:
            assert box.accel == "kvm"
        return
    with pytest.raises(hutch.UnsupportedEngineError, match="kvm") as ei:
        await box.start()
    assert "tcg" in ei.value.hint and box.qemu_pid is None
    await box.remove()
    with pytest.raises(hutch.BadRequestError, match="accel"):
        await hutch.Box("busybox", accel="hvf").start()


def test_doctor_spots_artifacts_built_from_older_sources(manifest: Manifest) -> None:
    import dataclasses

    from hutch.paths import HutchPaths
    from hutch.setup import outdated_artifacts

    paths = HutchPaths.default()
    assert outdated_artifacts(paths, manifest) == []
    old = dataclasses.replace(manifest, agent="/old/agent-0123/hutch-agent")
    assert outdated_artifacts(paths, old) == ["agent"]
