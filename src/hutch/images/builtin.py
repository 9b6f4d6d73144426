"""The built-in ``busybox`` image: a tiny root filesystem made from Debian's ``busybox-static``.

It needs no registry and no network, builds in well under a second and is what tests and
``hutch doctor`` boot. The result is a **base ext4** file that boxes use read-only through a
per-box qcow2 overlay (``qemu-img create -f qcow2 -b /ABS/rootfs.ext4 -F raw box.qcow2``).

Ownership without root (field notes §6): the tree is built as the calling user, then ``chown`` and
``mkfs.ext4 -d TREE`` run in **one** ``fakeroot`` session, so mke2fs sees (and records) the faked
owners: everything root-owned, ``/home/hutch`` owned by 1000:1000.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path

from hutch.artifacts import ProgressFn, build_cached, hash_inputs
from hutch.errors import SetupError
from hutch.images.rootfs import MKFS_OPTIONS
from hutch.paths import HutchPaths

#: Bump when the tree or the mkfs options below change.
RECIPE_VERSION = "hutch-image-busybox-1"

BUSYBOX = Path("/bin/busybox")
IMAGE_NAME = "busybox"
ROOTFS_NAME = "rootfs.ext4"
INFO_NAME = "image.json"

#: Apparent size of the (sparse) ext4: the largest disk a box on this image can have, as ext4 can't
#: be grown from the outside without a resize step. Only written blocks take host space.
IMAGE_SIZE = 2 << 30

HUTCH_UID = 1000
HUTCH_GID = 1000

# mkfs.ext4 options: shared with every base disk (explained in hutch.images.rootfs).
_MKFS_OPTIONS = MKFS_OPTIONS

# (path, mode) of the directories of the tree, all root-owned except /home/hutch.
_DIRS: tuple[tuple[str, int], ...] = (
    ("bin", 0o755),
    ("sbin", 0o755),
    ("usr", 0o755),
    ("usr/bin", 0o755),
    ("usr/sbin", 0o755),
    ("usr/local", 0o755),
    ("usr/local/bin", 0o755),
    ("usr/local/sbin", 0o755),
    ("lib", 0o755),
    ("etc", 0o755),
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("run", 0o755),
    ("tmp", 0o1777),
    ("var", 0o755),
    ("var/tmp", 0o1777),
    ("var/log", 0o755),
    ("root", 0o700),
    ("home", 0o755),
    ("home/hutch", 0o755),
    ("mnt", 0o755),
    ("opt", 0o755),
    ("srv", 0o755),
)

_FILES: dict[str, tuple[str, int]] = {
    "etc/passwd": (
        "root:x:0:0:root:/root:/bin/sh\n"
        f"hutch:x:{HUTCH_UID}:{HUTCH_GID}:hutch:/home/hutch:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        0o644,
    ),
    "etc/group": (
        "root:x:0:\n"
        "tty:x:5:\n"
        "wheel:x:10:hutch\n"
        f"hutch:x:{HUTCH_GID}:\n"
        "nogroup:x:65534:\n",
        0o644,
    ),
    # Locked passwords: nobody logs in; the agent starts processes with the uid it is asked for.
    "etc/shadow": (
        "root:*:0:0:99999:7:::\nhutch:*:0:0:99999:7:::\nnobody:*:0:0:99999:7:::\n",
        0o600,
    ),
    "etc/hostname": ("hutch\n", 0o644),
    "etc/hosts": ("127.0.0.1\tlocalhost\n127.0.1.1\thutch\n::1\tlocalhost ip6-localhost\n", 0o644),
    "etc/resolv.conf": ("nameserver 10.0.2.3\n", 0o644),
    "etc/os-release": (
        'NAME="hutch busybox"\n'
        "ID=hutch-busybox\n"
        'PRETTY_NAME="hutch busybox (Debian busybox-static)"\n',
        0o644,
    ),
    "etc/profile": (
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
        "export PS1='\\u@\\h:\\w\\$ '\n",
        0o644,
    ),
    "etc/shells": ("/bin/sh\n/bin/ash\n", 0o644),
}

_SYMLINKS: dict[str, str] = {
    "etc/mtab": "../proc/self/mounts",
    "var/run": "../run",
}


def busybox_image_key() -> str:
    """Content key of the busybox image: the busybox binary and this recipe."""
    if not BUSYBOX.is_file():
        raise SetupError(f"{BUSYBOX} not found", hint="apt-get install busybox-static")
    return hash_inputs([RECIPE_VERSION, str(IMAGE_SIZE), BUSYBOX])


def ensure_busybox_image(paths: HutchPaths, progress: ProgressFn) -> Path:
    """Return the path of the busybox base ext4 (read-only), building it if needed."""
    key = busybox_image_key()

    def build(out: Path) -> None:
        _build(paths, out, progress)

    return build_cached(paths, f"image-{IMAGE_NAME}", key, build) / ROOTFS_NAME


def _is_static_elf(path: Path) -> bool:
    """True for an ELF64 little-endian executable without a PT_INTERP (dynamic loader)."""
    with path.open("rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:6] != b"\x7fELF\x02\x01":
            return False
        (phoff,) = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(
        struct.unpack_from("<I", table, i * phentsize)[0] != 3  # PT_INTERP
        for i in range(phnum)
    )


def _applets() -> list[str]:
    proc = subprocess.run(
        [str(BUSYBOX), "--list-full"], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SetupError(
            f"`{BUSYBOX} --list-full` failed: {proc.stderr.strip()}",
            hint="Reinstall busybox-static.",
        )
    return [a for a in proc.stdout.split() if "/" in a]  # drops "linuxrc" (initrd only)


def _make_tree(tree: Path) -> int:
    """Fill *tree* (as the calling user); return the number of applet links."""
    os.chmod(tree, 0o755)
    for rel, mode in _DIRS:
        d = tree / rel
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, mode)  # not via mkdir(mode=...): the umask would clear sticky/other bits
    shutil.copyfile(BUSYBOX, tree / "bin" / "busybox")
    os.chmod(tree / "bin" / "busybox", 0o755)
    links = 0
    for applet in _applets():
        link = tree / applet
        if link.exists() or link.is_symlink() or applet == "bin/busybox":
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(link.parent, 0o755)
        link.symlink_to("/bin/busybox")
        links += 1
    for rel, (text, mode) in _FILES.items():
        (tree / rel).write_text(text)
        os.chmod(tree / rel, mode)
    for rel, target in _SYMLINKS.items():
        (tree / rel).symlink_to(target)
    return links


def _build(paths: HutchPaths, out: Path, progress: ProgressFn) -> None:
    for tool in ("fakeroot", "mkfs.ext4", "debugfs"):
        if shutil.which(tool) is None:
            raise SetupError(
                f"`{tool}` not found; it is needed to build images without root",
                hint="apt-get install fakeroot e2fsprogs",
            )
    if not _is_static_elf(BUSYBOX):
        raise SetupError(
            f"{BUSYBOX} is not a static x86-64 executable",
            hint="apt-get install busybox-static (it replaces the dynamic busybox)",
        )
    progress(f"image {IMAGE_NAME}: building root tree")
    paths.build.mkdir(parents=True, exist_ok=True)
    image = out / ROOTFS_NAME
    with tempfile.TemporaryDirectory(prefix="image-busybox-", dir=paths.build) as tmp:
        tree = Path(tmp) / "root"
        tree.mkdir()
        links = _make_tree(tree)
        with image.open("wb") as f:
            f.truncate(IMAGE_SIZE)  # sparse
        progress(f"image {IMAGE_NAME}: mkfs.ext4 ({links} applets)")
        q = shlex.quote
        script = " && ".join(
            [
                f"chown -hR 0:0 {q(str(tree))}",
                f"chown -h {HUTCH_UID}:{HUTCH_GID} {q(str(tree / 'home' / 'hutch'))}",
                " ".join(["mkfs.ext4", *map(q, _MKFS_OPTIONS), "-d", q(str(tree)), q(str(image))]),
            ]
        )
        # One fakeroot session: the chowns above exist only inside it, for mkfs to record.
        proc = subprocess.run(
            ["fakeroot", "--", "sh", "-c", script], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise SetupError(
                f"building the {IMAGE_NAME} image failed (fakeroot mkfs.ext4 exited with "
                f"{proc.returncode}):\n{(proc.stdout + proc.stderr).strip()[-2000:]}",
                hint="Check free disk space in the hutch home and that fakeroot works.",
            )
    _check_owner(image, "/home/hutch", HUTCH_UID, HUTCH_GID)
    _check_owner(image, "/bin/busybox", 0, 0)
    image.chmod(0o444)
    st = image.stat()
    (out / INFO_NAME).write_text(
        json.dumps(
            {
                "name": IMAGE_NAME,
                "recipe": RECIPE_VERSION,
                "size": st.st_size,
                "allocated": st.st_blocks * 512,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "source": f"{BUSYBOX} (Debian busybox-static)",
                "applets": links,
                "user": {
                    "name": "hutch",
                    "uid": HUTCH_UID,
                    "gid": HUTCH_GID,
                    "home": "/home/hutch",
                },
            },
            indent=2,
        )
        + "\n"
    )
    progress(f"image {IMAGE_NAME}: done ({st.st_blocks * 512 >> 20} MiB allocated)")


def _check_owner(image: Path, path: str, uid: int, gid: int) -> None:
    """Guard against a fakeroot that silently did nothing: read the owner back with debugfs."""
    proc = subprocess.run(
        ["debugfs", "-R", f"stat {path}", str(image)], capture_output=True, text=True, check=False
    )
    fields = proc.stdout.split()
    try:
        got_uid = int(fields[fields.index("User:") + 1])
        got_gid = int(fields[fields.index("Group:") + 1])
    except (ValueError, IndexError) as e:
        raise SetupError(f"cannot read {path} back from {image}: {proc.stderr.strip()}") from e
    if (got_uid, got_gid) != (uid, gid):
        raise SetupError(
            f"{path} in {image} is owned by {got_uid}:{got_gid}, expected {uid}:{gid}",
            hint="fakeroot did not take effect; check that `fakeroot id -u` prints 0.",
        )


def register_busybox(paths: HutchPaths, base: Path) -> None:
    """Name the built-in base disk ``busybox`` in the image store (unless the user pulled or loaded
    another image under that name, which then wins, as a local tag does in Docker)."""
    from hutch.images.oci import Platform, sha256_digest
    from hutch.images.sources import rootfs_config
    from hutch.images.store import ImageRecord, ImageStore

    store = ImageStore(paths)
    ref = "docker.io/library/busybox:latest"
    config_bytes = rootfs_config("sha256:" + busybox_image_key(), cmd=("/bin/sh",))
    image_id = sha256_digest(config_bytes)
    current = store.lookup(ref)
    if current is not None and current.source != "builtin":
        return
    if current is not None and current.id == image_id and current.base == str(base):
        return
    from hutch.images.oci import ImageConfig

    record = ImageRecord(
        id=image_id,
        references=(ref,),
        source="builtin",
        platform=str(Platform.host()),
        base=str(base),
        base_size=IMAGE_SIZE,
        config=ImageConfig.parse(config_bytes),
        allocated=base.stat().st_blocks * 512,
        recipe=RECIPE_VERSION,
    )
    with store.locked():
        store.add(record, base_file=None, files={"config.json": config_bytes})
