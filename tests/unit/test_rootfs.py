"""build_base_disk (hutch.images.rootfs): real fakeroot + mkfs.ext4, read back with debugfs.

The main test builds a three-layer image full of edge cases and checks the ext4 entry by entry
(type, mode, owner, size, content, link target, device numbers, mtimes, xattrs, hard links) and
that it holds nothing else — built the fast way (mkfs.ext4 outside fakeroot + a debugfs fix-up)
and the fallback way (mkfs.ext4 in the fakeroot session), which must agree; the fallback is
also checked when it is chosen for a reason (names debugfs cannot express, device numbers it
refuses, a failed fix-up, a fix-up estimated too slow). The others check the errors: tampered
layer, bomb, full disks, missing tools, interrupt — and that scratch trees and partial outputs
are always cleaned up. Run them as root and as an ordinary user (``setpriv --reuid=nobody``):
the real tree differs (ownership), the disk must not.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hutch.errors import ImageError, SetupError, StorageError
from hutch.images import rootfs
from hutch.images.rootfs import LayerInput, build_base_disk
from tests.support.tarbuild import (
    MTIME,
    Device,
    Dir,
    Entry,
    Fifo,
    File,
    Hardlink,
    Layer,
    Opaque,
    Symlink,
    Whiteout,
    tar_bytes,
    write_blob,
    write_layer,
)

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20
CAP = bytes.fromhex("01000002" "00200000" "00000000" "00000000" "00000000")
U = 0xFFFFFFFF


def acl(*entries: tuple[int, int, int]) -> bytes:
    out = (2).to_bytes(4, "little")
    for tag, perm, ident in entries:
        out += tag.to_bytes(2, "little") + perm.to_bytes(2, "little") + ident.to_bytes(4, "little")
    return out


def normalize_acl(value: bytes) -> bytes:
    """ext4 stores no id for USER_OBJ/GROUP_OBJ/MASK/OTHER; debugfs gives them back as 0."""
    out = bytearray(value)
    for off in range(4, len(out), 8):
        if int.from_bytes(out[off : off + 2], "little") not in (2, 8):
            out[off + 4 : off + 8] = bytes(4)
    return bytes(out)


ACL_ACCESS = acl((1, 6, U), (2, 6, 1000), (4, 4, U), (0x10, 6, U), (0x20, 4, U))
ACL_DEFAULT = acl((1, 7, U), (4, 5, U), (8, 5, 1001), (0x10, 5, U), (0x20, 5, U))


def need_tools() -> None:
    for tool in ("fakeroot", "mkfs.ext4", "debugfs", "e2fsck"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")


@pytest.fixture(autouse=True)
def private_tmpfs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Point the tmpfs choice at a private folder (on /dev/shm when there is one), so the
    tests can see that scratch trees are cleaned up."""
    need_tools()
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    d = Path(tempfile.mkdtemp(prefix="hutch-test-tmpfs-", dir=base))
    monkeypatch.setattr(rootfs, "TMPFS_DIR", d)
    yield d
    leftovers = os.listdir(d)
    shutil.rmtree(d, ignore_errors=True)
    assert leftovers == [], f"scratch tree not cleaned up: {leftovers}"


def inputs(*layers: Layer) -> list[LayerInput]:
    return [LayerInput(x.path, x.media_type, x.diff_id, x.digest) for x in layers]


# --- reading an ext4 back with debugfs ------------------------------------------------------
_TYPES = {
    "regular": "file",
    "directory": "dir",
    "symlink": "symlink",
    "character special": "chr",
    "block special": "blk",
    "FIFO": "fifo",
}


@dataclass
class Ext4Node:
    type: str
    mode: int
    uid: int
    gid: int
    size: int
    ino: int
    links: int
    mtime: int
    target: str | None = None
    rdev: tuple[int, int] | None = None
    xattrs: dict[str, bytes] = field(default_factory=dict)
    data: bytes | None = None


def _debugfs(image: Path, commands: list[str]) -> list[str]:
    """Run commands in one debugfs session; return each command's stdout. (Names are bytes as
    surrogate-escaped str, no newline translation; a command holding a newline or carriage
    return, which ``-f`` cannot read, runs alone.)"""

    def run(args: list[str], script: str = "") -> str:
        proc = subprocess.run(
            ["debugfs", *(os.fsencode(a) for a in args), os.fsencode(image)],
            input=os.fsencode(script),
            capture_output=True,
            check=True,
        )
        return os.fsdecode(proc.stdout)

    if any("\n" in c or "\r" in c for c in commands):
        return [run(["-R", c]) for c in commands]
    out = run(["-f", "-"], "\n".join(commands) + "\n")
    sections = re.split(r"^debugfs: .*\n?", out, flags=re.M)[1:]
    assert len(sections) == len(commands), out[-2000:]
    return sections


def _q(path: str) -> str:
    """One debugfs argument (libss: double quotes, a quote doubled inside)."""
    return '"' + path.replace('"', '""') + '"'


def ext4_paths(image: Path) -> set[str]:
    """Every path in the filesystem (recursive ``ls -p``), without lost+found."""
    found: set[str] = set()
    todo = ["/"]
    while todo:
        dirs = todo
        todo = []
        for d, out in zip(dirs, _debugfs(image, [f"ls -p {_q(d)}" for d in dirs]), strict=True):
            # /ino/mode/uid/gid/name/size/ per entry; a name may hold a newline, never a slash
            for m in re.finditer(r"^/(\d+)/(\d+)/(\d+)/(\d+)/([^/]*)/(\d*)/$", out, flags=re.M):
                if m.group(5) in (".", ".."):
                    continue
                path = (d.rstrip("/") + "/" + m.group(5)).lstrip("/")
                if path == "lost+found":
                    continue
                found.add(path)
                if m.group(2).startswith("04"):
                    todo.append("/" + path)
    return found


def ext4_node(image: Path, path: str, scratch: Path) -> Ext4Node:
    p = "/" + path
    st, eas = _debugfs(image, [f"stat {_q(p)}", f"ea_list {_q(p)}"])
    m = re.search(r"Inode: (\d+)\s+Type: (.+?)\s+Mode:\s+(\d+)", st)
    assert m, f"{path}: {st}"
    um = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+).*?Size: (\d+)", st)
    lm = re.search(r"Links: (\d+)", st)
    tm = re.search(r"^\s*mtime: 0x([0-9a-f]+)", st, flags=re.M)
    assert um and lm and tm
    node = Ext4Node(
        type=_TYPES[m.group(2)],
        mode=int(m.group(3), 8),
        uid=int(um.group(1)),
        gid=int(um.group(2)),
        size=int(um.group(3)),
        ino=int(m.group(1)),
        links=int(lm.group(1)),
        mtime=int(tm.group(1), 16),
    )
    dev = re.search(r"Device major/minor number: (\d+):(\d+)", st)
    if dev:
        node.rdev = (int(dev.group(1)), int(dev.group(2)))
    names = re.findall(r"^\s+(\S+) \(\d+\)", eas, flags=re.M)
    commands = []
    for i, name in enumerate(names):
        commands.append(f"ea_get -f {scratch / f'ea{i}'} {_q(p)} {name}")
    fast = re.search(r'Fast link dest: "(.*)"', st)
    if node.type == "symlink" and fast:
        node.target = fast.group(1)
    elif node.type in ("file", "symlink"):
        commands.append(f"dump {_q(p)} {scratch / 'data'}")
    if commands:
        _debugfs(image, commands)
    for i, name in enumerate(names):
        node.xattrs[name] = (scratch / f"ea{i}").read_bytes()
    if node.type == "file":
        node.data = (scratch / "data").read_bytes()
    elif node.type == "symlink" and node.target is None:
        node.target = (scratch / "data").read_bytes().decode("utf-8", "surrogateescape")
    return node


# --- the edge-case image --------------------------------------------------------------------
LONG = "L" * 200 + "/" + "n" * 255
BIG = os.urandom(200_000)
SELINUX = b"system_u:object_r:etc_t:s0\x00"
ACL_DIR = acl((1, 7, U), (2, 5, 1002), (4, 5, U), (0x10, 5, U), (0x20, 5, U))
#: Names debugfs's script parser must be given quoted, or with ./ in front (<N> is an inode
#: number to debugfs, -x an option), or raw bytes that are not UTF-8. Each has an xattr, so
#: that the fix-up has to name it even as root.
ODD_NAMES = ["with space", 'q"uo"te', "tab\there", "-dash", "<12>", "lat\udce9", "back\\slash"]


def edge_case_layers(blobs: Path) -> list[Layer]:
    base = write_layer(
        blobs,
        [
            # mke2fs -d does not copy the root's mode: fixed after
            Dir(".", mode=0o751, xattrs={"user.root": b"r", "trusted.root": b"\x00"}),
            Dir("etc"),
            File("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
            File("etc/shadow", b"root:*:::::::\n", mode=0o640, gid=42),
            Dir("usr"),
            Dir("usr/bin"),
            Dir("usr/lib"),
            Symlink("bin", "usr/bin"),
            Symlink("lib", "usr/lib"),
            File("usr/bin/ping", b"\x7fELF ping", mode=0o755, xattrs={"security.capability": CAP}),
            File("usr/bin/sudo", b"\x7fELF sudo", mode=0o4755),
            File("usr/bin/wall", b"\x7fELF wall", mode=0o2755, gid=5),
            File("usr/bin/big", BIG, mode=0o700, uid=1000, gid=1000),
            Dir("tmp", mode=0o700),  # unusual, but the image's: the boot dir must not change it
            Symlink("run", "/var/run"),  # likewise
            Dir("dev"),
            Device("dev/null", "chr", 1, 3, mode=0o666),
            Device("dev/sda", "blk", 8, 0, mode=0o660, gid=6),
            Device("dev/nvme0n1p9", "blk", 259, 300, mode=0o640, uid=3, gid=6),  # > 255: new form
            Fifo("dev/initctl", mode=0o600),
            # a hard-linked device with an xattr, linked from another directory too
            Device(
                "dev/console", "chr", 5, 1, mode=0o620, gid=5, xattrs={"security.selinux": SELINUX}
            ),
            Hardlink("dev/console-link", "dev/console"),
            Hardlink("console-elsewhere", "dev/console"),
            Fifo("fifo", mode=0o4640, uid=7, gid=8, xattrs={"trusted.f": b"fifo"}),
            Dir(
                "data",
                mode=0o2775,
                uid=1000,
                gid=1000,
                xattrs={
                    "system.posix_acl_default": ACL_DEFAULT,
                    "system.posix_acl_access": ACL_DIR,
                    "user.dir": b"d",
                },
            ),
            File(
                "data/acl",
                b"acl",
                mode=0o664,
                xattrs={
                    "system.posix_acl_access": ACL_ACCESS,
                    "trusted.t": b"\x00\xff",
                    "user.u": b"value",
                    "user.empty": b"",
                    "security.selinux": SELINUX,
                },
            ),
            Hardlink("data/acl-link", "data/acl"),  # hard-linked, with xattrs and an ACL
            Dir("secret", mode=0o000),  # mkfs, outside fakeroot, must still read them
            File("secret/f", b"s", mode=0o000, uid=5),
            Dir("names"),
            *[
                File(f"names/{n}", n.encode(errors="surrogateescape"), xattrs={"user.n": b"n"})
                for n in ODD_NAMES
            ],  # fmt: skip
            Device("names/-dev <1>", "chr", 1, 7, mode=0o644),  # mknod takes the name raw
            Hardlink('names/"link"', "names/-dev <1>"),
            Dir("opaque"),
            File("opaque/lower1", b"lower"),
            Dir("opaque/sub"),
            File("opaque/sub/lower2", b"lower"),
            File("gone", b"deleted later"),
            Dir("gone-dir"),
            File("gone-dir/x"),
            File("shared", b"old shared"),
            Hardlink("shared-alias", "shared"),
            Dir("d2f"),
            File("d2f/x"),
            File("f2d", b"file"),
            Symlink("l2d", "usr"),
            Dir("d2l"),
            File("utf8-é/日本語", b"utf8"),
            File(LONG, b"long name"),
            Symlink("longlink", "t" * 100),
        ],
        "gzip",
    )
    middle = write_layer(
        blobs,
        [
            Whiteout("gone"),
            Whiteout("gone-dir"),
            File("opaque/new", b"upper"),
            Opaque("opaque"),  # after its sibling: opaque/new must survive
            File("shared", b"new shared"),
            Hardlink("to-new-shared", "shared"),  # to the file replaced just above
            Hardlink("usr/bin/ping6", "usr/bin/ping"),  # to a lower layer's file
            File("d2f", b"file now", mode=0o600),
            Dir("f2d", mode=0o711),
            File("f2d/c", b"child"),
            Dir("l2d", mode=0o700),
            Symlink("d2l", "/etc"),
            File("lib/libc.so.6", b"libc"),  # through lib -> usr/lib
            # On the host, ../.. from the tree is the test's private tmpfs folder (which must
            # stay empty); inside the root it is the root: this lands in /escaped.
            Symlink("evil", "../.."),
            File("evil/escaped", b"stays inside"),
        ],
        "zstd",
    )
    top = write_layer(blobs, [File("etc/hostname", b"img\n"), Whiteout("etc/shadow")], "")
    return [base, middle, top]


@dataclass
class Want:
    type: str
    mode: int
    uid: int = 0
    gid: int = 0
    data: bytes | None = None
    target: str | None = None
    rdev: tuple[int, int] | None = None
    xattrs: dict[str, bytes] = field(default_factory=dict)
    mtime: int | None = None


def F(data: bytes, mode: int = 0o644, **kw: object) -> Want:
    return Want("file", mode, data=data, mtime=kw.pop("mtime", MTIME), **kw)  # type: ignore[arg-type]


def D(mode: int = 0o755, **kw: object) -> Want:
    return Want("dir", mode, **kw)  # type: ignore[arg-type]


def S(target: str) -> Want:
    return Want("symlink", 0o777, target=target, mtime=MTIME)


def C(major: int, minor: int, mode: int, kind: str = "chr", **kw: object) -> Want:
    return Want(kind, mode, rdev=(major, minor), mtime=MTIME, **kw)  # type: ignore[arg-type]


EXTRA = {"etc/hutch/agent.conf": b"x = 1\n", "usr/local/bin/hutch-agent": b"\x7fELF agent"}

ACL_FILE_XATTRS = {
    "system.posix_acl_access": ACL_ACCESS,
    "trusted.t": b"\x00\xff",
    "user.u": b"value",
    "user.empty": b"",
    "security.selinux": SELINUX,
}
CONSOLE = C(5, 1, 0o620, gid=5, xattrs={"security.selinux": SELINUX})
EXPECTED: dict[str, Want] = {
    "etc": D(),
    "etc/passwd": F(b"root:x:0:0::/root:/bin/sh\n"),
    "etc/hostname": F(b"img\n"),
    "etc/hutch": D(),
    "etc/hutch/agent.conf": F(b"x = 1\n", mtime=None),
    "usr": D(),
    "usr/bin": D(),
    "usr/lib": D(),
    "usr/local": D(),
    "usr/local/bin": D(),
    "usr/local/bin/hutch-agent": F(b"\x7fELF agent", 0o755, mtime=None),
    "bin": S("usr/bin"),
    "lib": S("usr/lib"),
    "usr/bin/ping": F(b"\x7fELF ping", 0o755, xattrs={"security.capability": CAP}),
    "usr/bin/ping6": F(b"\x7fELF ping", 0o755, xattrs={"security.capability": CAP}),
    "usr/bin/sudo": F(b"\x7fELF sudo", 0o4755),
    "usr/bin/wall": F(b"\x7fELF wall", 0o2755, gid=5),
    "usr/bin/big": F(BIG, 0o700, uid=1000, gid=1000),
    "usr/lib/libc.so.6": F(b"libc"),
    "tmp": D(0o700),
    "run": S("/var/run"),
    "dev": D(mtime=MTIME),  # the fix-up's rm/mknod/ln must not touch it
    "dev/null": C(1, 3, 0o666),
    "dev/sda": C(8, 0, 0o660, "blk", gid=6),
    "dev/nvme0n1p9": C(259, 300, 0o640, "blk", uid=3, gid=6),
    "dev/initctl": Want("fifo", 0o600, mtime=MTIME),
    "dev/console": CONSOLE,
    "dev/console-link": CONSOLE,
    "console-elsewhere": CONSOLE,
    "fifo": Want("fifo", 0o4640, uid=7, gid=8, xattrs={"trusted.f": b"fifo"}, mtime=MTIME),
    "proc": D(0o555),  # boot dirs the image lacked
    "sys": D(0o555),
    "data": D(
        0o2775,
        uid=1000,
        gid=1000,
        xattrs={
            "system.posix_acl_default": ACL_DEFAULT,
            "system.posix_acl_access": ACL_DIR,
            "user.dir": b"d",
        },
        mtime=MTIME,
    ),
    "data/acl": F(b"acl", 0o664, xattrs=ACL_FILE_XATTRS),
    "data/acl-link": F(b"acl", 0o664, xattrs=ACL_FILE_XATTRS),
    "secret": D(0o000, mtime=MTIME),
    "secret/f": F(b"s", 0o000, uid=5),
    "names": D(mtime=MTIME),
    **{
        f"names/{n}": F(n.encode(errors="surrogateescape"), xattrs={"user.n": b"n"})
        for n in ODD_NAMES
    },
    "names/-dev <1>": C(1, 7, 0o644),
    'names/"link"': C(1, 7, 0o644),
    "opaque": D(),
    "opaque/new": F(b"upper"),
    "shared": F(b"new shared"),
    "to-new-shared": F(b"new shared"),
    "shared-alias": F(b"old shared"),
    "d2f": F(b"file now", 0o600),
    "f2d": D(0o711),
    "f2d/c": F(b"child"),
    "l2d": D(0o700),
    "d2l": S("/etc"),
    "utf8-é": D(),
    "utf8-é/日本語": F(b"utf8"),
    LONG.split("/")[0]: D(),
    LONG: F(b"long name"),
    "longlink": S("t" * 100),
    "evil": S("../.."),
    "escaped": F(b"stays inside"),
}
ROOT = Want("dir", 0o751, xattrs={"user.root": b"r", "trusted.root": b"\x00"})
#: Names of one inode (and nothing else links to it).
SAME_INODE = [
    ("usr/bin/ping", "usr/bin/ping6"),
    ("shared", "to-new-shared"),
    ("data/acl", "data/acl-link"),
    ("dev/console", "dev/console-link", "console-elsewhere"),
    ("names/-dev <1>", 'names/"link"'),
]


def check_disk(
    out: Path, expected: dict[str, Want], same_inode: list[tuple[str, ...]], scratch: Path
) -> None:
    """The ext4 at ``out`` passes e2fsck and holds exactly ``expected``, entry by entry."""
    fsck = subprocess.run(["e2fsck", "-fn", str(out)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    # Exactly the expected entries...
    assert ext4_paths(out) == set(expected)
    # ...each as the layers say.
    scratch.mkdir(exist_ok=True)
    got = {path: ext4_node(out, path, scratch) for path in [*expected, ""]}
    for path, want in [*expected.items(), ("", ROOT)]:
        node = got[path]
        assert (node.type, oct(node.mode), node.uid, node.gid) == (
            want.type,
            oct(want.mode),
            want.uid,
            want.gid,
        ), path
        if want.data is not None:
            assert node.data == want.data and node.size == len(want.data), path
        if want.target is not None:
            assert node.target == want.target and node.size == len(want.target), path
        assert node.rdev == want.rdev, path
        have = {k: normalize_acl(v) if "posix_acl" in k else v for k, v in node.xattrs.items()}
        wanted = {k: normalize_acl(v) if "posix_acl" in k else v for k, v in want.xattrs.items()}
        assert have == wanted, path
        if want.mtime is not None:
            assert node.mtime == want.mtime, path
    linked = set()
    for names in same_inode:
        assert len({got[n].ino for n in names}) == 1, names
        assert got[names[0]].links == len(names), names
        linked.update(names)
    for path, node in got.items():
        if path not in linked and node.type != "dir":
            assert node.links == 1, path
    assert got["shared-alias"].ino != got["shared"].ino


@pytest.mark.parametrize("plain", [True, False], ids=["plain-mkfs", "fakeroot-mkfs"])
def test_build_base_disk_matches_the_layers_entry_by_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plain: bool
) -> None:
    monkeypatch.setattr(rootfs, "PLAIN_MKFS", plain)
    layers = edge_case_layers(tmp_path / "blobs")
    out = tmp_path / "img" / "base.ext4"
    messages: list[str] = []
    info = build_base_disk(
        inputs(*layers), out, size_bytes=128 * MIB, progress=messages.append, extra_files=EXTRA
    )

    # The fast path when asked for, with the real tree's differences fixed up by debugfs.
    assert info.mkfs_mode == ("plain" if plain else "fakeroot")
    assert any("metadata fix-ups" in m for m in messages) == plain
    # The disk file: complete, read-only, sparse, nothing left beside it.
    st = out.stat()
    assert st.st_mode & 0o777 == 0o444
    assert info.size == st.st_size == 128 * MIB
    assert 0 < info.allocated == st.st_blocks * 512 < 64 * MIB
    assert os.listdir(out.parent) == ["base.ext4"]
    assert info.diff_ids == tuple(x.diff_id for x in layers)
    assert info.bytes_applied == sum(len(_untar(x)) for x in layers)
    assert info.file_count == len(EXPECTED)
    assert info.tree_on_tmpfs
    assert any("layer 1/3" in m for m in messages) and any("layer 3/3" in m for m in messages)
    assert any("mkfs.ext4" in m for m in messages)
    check_disk(out, EXPECTED, SAME_INODE, tmp_path / "debugfs")


def _fail_fixup(real: Callable[[Path, Path], str | None]) -> Callable[[Path, Path], str | None]:
    def run(image: Path, script: Path) -> str | None:
        assert real(image, script) is None  # it did run, and left its marks on the disk
        return "simulated failure"

    return run


@pytest.mark.parametrize(
    "case",
    [
        "newline-name",
        "carriage-return-name",
        "huge-device-number",
        "fixup-fails",
        "mkfs-fails",
        "slow",
    ],
)
def test_fallback_to_mkfs_under_fakeroot_builds_the_same_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """When the fix-up cannot be written (or fails, or would be slow), mkfs runs in the fakeroot
    session instead, and the disk is the same."""
    layers = edge_case_layers(tmp_path / "blobs")
    expected = dict(EXPECTED)
    extra: list[Entry] = []
    if case == "newline-name":
        extra = [File("new\nline", b"nl", xattrs={"user.n": b"n"})]
        expected["new\nline"] = F(b"nl", xattrs={"user.n": b"n"})
    elif case == "carriage-return-name":
        extra = [File("car\rriage", b"cr", xattrs={"user.n": b"n"})]
        expected["car\rriage"] = F(b"cr", xattrs={"user.n": b"n"})
    elif case == "huge-device-number":  # debugfs's mknod takes at most 65535:65535
        extra = [Device("big-minor", "chr", 240, 70_000, mode=0o600)]
        expected["big-minor"] = C(240, 70_000, 0o600)
    elif case == "fixup-fails":
        monkeypatch.setattr(rootfs, "_run_debugfs_script", _fail_fixup(rootfs._run_debugfs_script))
    elif case == "mkfs-fails":

        def wait_mkfs(proc: subprocess.Popen[str], *args: object) -> None:
            proc.wait()
            raise ImageError("simulated mkfs failure")

        monkeypatch.setattr(rootfs, "wait_mkfs", wait_mkfs)
    else:
        monkeypatch.setattr(rootfs, "_FAKEROOT_PER_ENTRY", 0.0)
    if extra:
        layers.append(write_layer(tmp_path / "blobs", extra))
    out = tmp_path / "img" / "base.ext4"
    messages: list[str] = []
    info = build_base_disk(
        inputs(*layers), out, size_bytes=128 * MIB, progress=messages.append, extra_files=EXTRA
    )
    assert info.mkfs_mode == "fakeroot"
    reason = {
        "newline-name": "newline or carriage return",
        "carriage-return-name": "newline or carriage return",
        "huge-device-number": "too large for debugfs",
        "fixup-fails": "simulated failure",
        "mkfs-fails": "simulated mkfs failure",
        "slow": "would take",
    }[case]
    assert any(reason in m for m in messages), messages
    assert os.listdir(out.parent) == ["base.ext4"]
    check_disk(out, expected, SAME_INODE, tmp_path / "debugfs")


def test_debugfs_script_failures_are_detected(tmp_path: Path) -> None:
    """debugfs exits 0 whatever its commands do: the fix-up's outcome is read from its output."""
    image = tmp_path / "x.ext4"
    with image.open("wb") as f:
        f.truncate(16 * MIB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    script = tmp_path / "s.debugfs"
    script.write_bytes(b'sif "/lost+found" uid 5\nmknod x p\n')
    assert rootfs._run_debugfs_script(image, script) is None
    for bad in (b"sif /missing uid 5\n", b"ea_set / user.x\n", b"no_such_command\n"):
        script.write_bytes(bad)
        assert rootfs._run_debugfs_script(image, script) is not None, bad


def _untar(layer: Layer) -> bytes:
    import gzip

    import zstandard

    blob = layer.path.read_bytes()
    if layer.compression == "gzip":
        return gzip.decompress(blob)
    if layer.compression == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(blob)
    return blob


# --- errors and cleanup ---------------------------------------------------------------------
def test_tampered_layer_is_an_image_error_and_leaves_nothing(tmp_path: Path) -> None:
    layer = write_layer(tmp_path / "blobs", [File("etc/passwd", b"evil")], "gzip")
    tampered = LayerInput(layer.path, layer.media_type, "sha256:" + "1" * 64, layer.digest)
    out = tmp_path / "out" / "base.ext4"
    with pytest.raises(ImageError) as err:
        build_base_disk([tampered], out, size_bytes=64 * MIB, progress=lambda m: None)
    assert layer.digest in err.value.message and layer.diff_id in err.value.message
    assert "sha256:" + "1" * 64 in err.value.message
    assert err.value.hint
    assert os.listdir(out.parent) == []


def test_bomb_is_stopped_by_the_limits(tmp_path: Path) -> None:
    from hutch.images.layers import LayerLimits

    bomb = write_blob(tmp_path / "blobs", tar_bytes([File("a", bytes(32 * MIB))]), "zstd")
    with pytest.raises(ImageError, match="exceeds the image size limit"):
        build_base_disk(
            inputs(bomb),
            tmp_path / "base.ext4",
            size_bytes=64 * MIB,
            progress=lambda m: None,
            limits=LayerLimits(max_bytes=4 * MIB),
        )
    assert not (tmp_path / "base.ext4").exists()


def _tiny_tmpfs(where: Path, size: str) -> Path:
    where.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    return where


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = _tiny_tmpfs(tmp_path / "tiny", "4m")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_output_on_a_full_filesystem_is_a_storage_error(tmp_path: Path, tiny_fs: Path) -> None:
    layer = write_layer(tmp_path / "blobs", [File("a", b"a")])
    with pytest.raises(StorageError) as err:
        build_base_disk(
            inputs(layer), tiny_fs / "base.ext4", size_bytes=256 * MIB, progress=lambda m: None
        )
    assert str(tiny_fs) in err.value.message and "MiB free" in err.value.message
    assert os.listdir(tiny_fs) == []


def test_scratch_filling_up_mid_build_is_a_storage_error(
    tmp_path: Path, tiny_fs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Compresses ~1000:1, so the estimate fits the 4 MiB scratch but the tree does not.
    layer = write_layer(tmp_path / "blobs", [File("zeros", bytes(16 * MIB))], "gzip")
    monkeypatch.setattr(rootfs, "TMPFS_DIR", tmp_path / "no-tmpfs")
    with pytest.raises(StorageError) as err:
        build_base_disk(
            inputs(layer),
            tmp_path / "out" / "base.ext4",
            size_bytes=64 * MIB,
            progress=lambda m: None,
            scratch=tiny_fs,
        )
    assert str(tiny_fs) in err.value.message and "MiB free" in err.value.message
    assert os.listdir(tiny_fs) == []  # the tree was removed
    assert os.listdir(tmp_path / "out") == []


def test_image_larger_than_the_disk_is_a_storage_error(tmp_path: Path) -> None:
    layer = write_layer(tmp_path / "blobs", [File("random", os.urandom(40 * MIB))])
    with pytest.raises(StorageError, match="does not fit in a 48 MiB base disk") as err:
        build_base_disk(
            inputs(layer), tmp_path / "base.ext4", size_bytes=48 * MIB, progress=lambda m: None
        )
    assert "base_size" in err.value.hint
    assert not (tmp_path / "base.ext4").exists()


def test_missing_tools_are_a_setup_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda t: None if t == "fakeroot" else real_which(t))
    with pytest.raises(SetupError, match="fakeroot") as err:
        build_base_disk([], tmp_path / "base.ext4", size_bytes=64 * MIB, progress=lambda m: None)
    assert err.value.hint == "apt-get install fakeroot e2fsprogs"


def test_interrupt_kills_the_helper_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layers = [write_layer(tmp_path / "blobs", [File(f"f{i}", b"x")]) for i in range(3)]
    out = tmp_path / "out" / "base.ext4"
    seen: list[str] = []
    procs: list[subprocess.Popen[str]] = []
    real_popen = subprocess.Popen

    def popen(*args: object, **kwargs: object) -> subprocess.Popen[str]:
        proc: subprocess.Popen[str] = real_popen(*args, **kwargs)  # type: ignore[call-overload]
        procs.append(proc)
        return proc

    monkeypatch.setattr(subprocess, "Popen", popen)

    def progress(message: str) -> None:
        seen.append(message)
        if "layer 1/3" in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_base_disk(inputs(*layers), out, size_bytes=64 * MIB, progress=progress)
    assert os.listdir(out.parent) == []
    assert len(procs) == 1 and procs[0].returncode is not None  # stopped and reaped
    assert seen[-1].startswith("layer 1/3")
