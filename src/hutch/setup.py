"""Host set-up: Debian packages, guest kernel, agent, initramfs and the built-in image.

Every step is idempotent and cached under the hutch home by a content key (see
:mod:`hutch.artifacts`), so a second :func:`run_setup` only re-hashes inputs (well under a second).
The result is a :class:`Manifest` written to ``HOME/artifacts/manifest.json``; boxes read that file
instead of re-hashing anything at start-up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hutch.artifacts import ProgressFn, artifact_path, build_cached, hash_inputs
from hutch.errors import SetupError
from hutch.guest.agent import AGENT_SOURCES, build_agent
from hutch.guest.initramfs import initramfs_key, write_initramfs
from hutch.guest.kernel import ensure_kernel, kernel_key
from hutch.images.builtin import busybox_image_key, ensure_busybox_image, register_busybox
from hutch.paths import HutchPaths
from hutch.vm.disk import ensure_overlay_template

#: Debian packages hutch needs on the host (runtime and the builds of `hutch setup`).
REQUIRED_PACKAGES = [
    "qemu-system-x86",
    "qemu-utils",
    "busybox-static",
    "e2fsprogs",
    "fakeroot",
    "gcc",
    "make",
    "libc6-dev",
    "linux-source-6.1",
    "bc",
    "bison",
    "flex",
    "libelf-dev",
    "libssl-dev",
    "cpio",
    "xz-utils",
    "patch",
    "util-linux",
    "mmdebstrap",  # the built-in debian-python image
    "tar",
]

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Manifest:
    kernel: str
    initramfs: str
    agent: str
    kernel_source: str  # "built" | "user"
    images: dict[str, str] = field(default_factory=dict)

    @property
    def kernel_path(self) -> Path:
        return Path(self.kernel)

    @property
    def initramfs_path(self) -> Path:
        return Path(self.initramfs)

    def image_path(self, name: str) -> Path | None:
        p = self.images.get(name)
        return Path(p) if p else None

    def missing(self) -> list[str]:
        """Artifacts the manifest names that are no longer on disk."""
        paths = [self.kernel, self.initramfs, self.agent, *self.images.values()]
        return [p for p in paths if not os.path.exists(p)]


def missing_packages(packages: list[str] = REQUIRED_PACKAGES) -> list[str]:
    """Packages of ``packages`` that dpkg does not report as installed."""
    if shutil.which("dpkg-query") is None:
        return []  # not Debian: we cannot tell, the builds will say what is missing
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${db:Status-Abbrev}\n", *packages],
        capture_output=True,
        text=True,
        check=False,
    )
    installed = {
        line.split()[0]
        for line in proc.stdout.splitlines()
        if len(line.split()) >= 2 and line.split()[1].startswith("ii")
    }
    return [p for p in packages if p not in installed]


def install_packages(packages: list[str], progress: ProgressFn) -> None:
    if not packages:
        return
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    if os.geteuid() != 0:
        raise SetupError(
            f"missing Debian packages: {' '.join(packages)}",
            hint=f"Install them as root: sudo {' '.join(cmd)}",
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    progress(f"packages: apt-get update (missing: {' '.join(packages)})")
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, capture_output=True)
    progress(f"packages: installing {' '.join(packages)}")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise SetupError(
            f"apt-get install failed:\n{tail}", hint=f"Run it by hand: {' '.join(cmd)}"
        )


def _agent_and_initramfs(paths: HutchPaths, progress: ProgressFn) -> tuple[Path, Path]:
    agent_key = hash_inputs(AGENT_SOURCES)

    def build_agent_into(tmp: Path) -> None:
        progress("agent: compiling (static)")
        build_agent(tmp)

    agent = build_cached(paths, "agent", agent_key, build_agent_into) / "hutch-agent"
    rd_key = initramfs_key(agent_key)

    def build_initramfs(tmp: Path) -> None:
        progress("initramfs: writing")
        write_initramfs(agent, tmp / "initramfs.cpio")

    initramfs = build_cached(paths, "initramfs", rd_key, build_initramfs) / "initramfs.cpio"
    return agent, initramfs


def run_setup(
    paths: HutchPaths,
    progress: ProgressFn,
    *,
    kernel: Path | None = None,
    install: bool = True,
) -> Manifest:
    """Make every artifact a box needs; returns (and saves) the manifest."""
    paths.ensure()
    missing = missing_packages()
    if kernel is not None:
        missing = [p for p in missing if p not in ("linux-source-6.1", "bc", "bison", "flex")]
    if missing:
        if not install:
            raise SetupError(f"missing Debian packages: {' '.join(missing)}")
        install_packages(missing, progress)
    if kernel is not None:
        kernel = kernel.expanduser().absolute()
        if not kernel.is_file():
            raise SetupError(f"kernel {kernel} does not exist", hint="Pass the path of a vmlinux.")
        with kernel.open("rb") as f:
            if f.read(4) != b"\x7fELF":
                raise SetupError(
                    f"{kernel} is not an ELF vmlinux",
                    hint="QEMU microvm boots an uncompressed vmlinux with a PVH note, not a bzImage.",
                )
        vmlinux, source = kernel, "user"
    else:
        vmlinux, source = ensure_kernel(paths, progress), "built"
    agent, initramfs = _agent_and_initramfs(paths, progress)
    busybox = ensure_busybox_image(paths, progress)
    ensure_overlay_template(busybox)
    register_busybox(paths, busybox)
    manifest = Manifest(
        kernel=str(vmlinux),
        initramfs=str(initramfs),
        agent=str(agent),
        kernel_source=source,
        images={"busybox": str(busybox)},
    )
    tmp = paths.artifacts / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(asdict(manifest), indent=2))
    tmp.replace(paths.artifacts / MANIFEST)
    return manifest


def outdated_artifacts(paths: HutchPaths, manifest: Manifest) -> list[str]:
    """Names of the manifest's artifacts that no longer match their sources (hutch was upgraded,
    or the kernel config changed, since the last `hutch setup`). Hashes sources: for doctor,
    not for the boot path."""
    agent_key = hash_inputs(AGENT_SOURCES)
    expected = {
        "agent": artifact_path(paths, "agent", agent_key) / "hutch-agent",
        "initramfs": artifact_path(paths, "initramfs", initramfs_key(agent_key)) / "initramfs.cpio",
        "image busybox": artifact_path(paths, "image-busybox", busybox_image_key()) / "rootfs.ext4",
    }
    have = {
        "agent": manifest.agent,
        "initramfs": manifest.initramfs,
        "image busybox": manifest.images.get("busybox", ""),
    }
    if manifest.kernel_source == "built":
        expected["kernel"] = artifact_path(paths, "kernel", kernel_key()) / "vmlinux"
        have["kernel"] = manifest.kernel
    return [name for name, path in expected.items() if Path(have[name]) != path]


def load_manifest(paths: HutchPaths) -> Manifest:
    """The manifest written by the last `hutch setup`; SetupError if there is none or it is stale."""
    f = paths.artifacts / MANIFEST
    try:
        manifest = Manifest(**json.loads(f.read_text()))
    except FileNotFoundError:
        raise SetupError(
            f"hutch is not set up in {paths.home} (no {f.name})",
            hint="Run `hutch setup` once (builds the guest kernel, agent and built-in image).",
        ) from None
    except (OSError, ValueError, TypeError) as e:
        raise SetupError(f"cannot read {f}: {e}", hint="Run `hutch setup` again.") from e
    if gone := manifest.missing():
        raise SetupError(
            f"set-up artifacts are missing: {', '.join(gone)}", hint="Run `hutch setup` again."
        )
    return manifest


__all__ = [
    "REQUIRED_PACKAGES",
    "Manifest",
    "load_manifest",
    "missing_packages",
    "outdated_artifacts",
    "run_setup",
]
