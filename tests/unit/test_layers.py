"""The layer applier (hutch.images.layers): OCI semantics, metadata, and hostile layers.

Layers are built here with ``tarfile`` (tests/support/tarbuild.py) and applied by one helper
process running under ``fakeroot`` (tests/support/fakeroot_apply.py), as production does, so
ownership, device nodes and privileged xattrs are real as far as the session is concerned.
Hostile tests also check that nothing next to the root changed. Every apply onto an empty root
also checks the applier's record of what the image wants at each path (``TreeMeta``, which lets
``mkfs.ext4`` run outside fakeroot) against what the fakeroot session says.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hutch.errors import ImageError
from tests.support.fakeroot_apply import FakerootApplier
from tests.support.tarbuild import (
    MEDIA_TYPES,
    MTIME,
    Device,
    Dir,
    Entry,
    Fifo,
    File,
    Hardlink,
    Layer,
    Opaque,
    Raw,
    Symlink,
    Whiteout,
    tar_bytes,
    write_blob,
    write_layer,
)

pytestmark = pytest.mark.timeout(60)

CAP_NET_RAW = bytes.fromhex("01000002" "00200000" "00000000" "00000000" "00000000")


def acl(*entries: tuple[int, int, int]) -> bytes:
    """A POSIX ACL in Linux xattr form: version 2, then (tag, perm, id) entries."""
    out = (2).to_bytes(4, "little")
    for tag, perm, ident in entries:
        out += tag.to_bytes(2, "little") + perm.to_bytes(2, "little") + ident.to_bytes(4, "little")
    return out


U = 0xFFFFFFFF  # ACL_UNDEFINED_ID
ACL_ACCESS = acl((1, 6, U), (2, 6, 1000), (4, 4, U), (0x10, 6, U), (0x20, 4, U))
ACL_DEFAULT = acl((1, 7, U), (4, 5, U), (8, 5, 1001), (0x10, 5, U), (0x20, 5, U))


@pytest.fixture(scope="module")
def fr() -> Iterator[FakerootApplier]:
    with FakerootApplier() as applier:
        yield applier


@dataclass
class Sandbox:
    """``root`` (where layers go) next to ``outside`` (must never change)."""

    tmp: Path
    root: Path
    outside: Path

    def layer(self, *entries: Entry, compression: str = "", fmt: int = tarfile.PAX_FORMAT) -> Layer:
        return write_layer(self.tmp / "blobs", entries, compression, format=fmt)

    def snapshot(self) -> dict[str, tuple[object, ...]]:
        """Everything in tmp except the root: types, sizes, modes, mtimes, contents, links."""
        snap: dict[str, tuple[object, ...]] = {}
        for dirpath, dirnames, filenames in os.walk(self.tmp):
            if Path(dirpath) == self.tmp:  # the root and the layer blobs may change
                dirnames[:] = [d for d in dirnames if d not in ("root", "blobs")]
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                content = b""
                if stat.S_ISREG(st.st_mode):
                    content = Path(p).read_bytes()
                elif stat.S_ISLNK(st.st_mode):
                    content = os.readlink(p).encode()
                snap[os.path.relpath(p, self.tmp)] = (
                    st.st_mode,
                    st.st_size,
                    st.st_mtime_ns,
                    st.st_nlink,
                    st.st_uid,
                    hashlib.sha256(content).hexdigest(),
                )
        return snap


@pytest.fixture
def sb(tmp_path: Path) -> Sandbox:
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "secret").write_bytes(b"host secret")
    (outside / "sub" / "file").write_bytes(b"host file")
    return Sandbox(tmp_path, tmp_path / "root", outside)


def rel(p: Path) -> str:
    """A host absolute path as a root-relative key (where an absolute name lands)."""
    return str(p).lstrip("/")


# --- regular semantics ----------------------------------------------------------------------
@pytest.mark.parametrize("compression", ["", "gzip", "zstd"])
def test_types_ownership_modes_mtimes_xattrs(
    fr: FakerootApplier, sb: Sandbox, compression: str
) -> None:
    big = os.urandom(3 << 20)  # several read chunks
    layer = sb.layer(
        Dir("etc", mode=0o755),
        File("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", mode=0o644, mtime=1_600_000_000.5),
        File("etc/shadow", b"root:*:::::::\n", mode=0o640, uid=0, gid=42),
        Dir("usr/bin", mode=0o755),  # parent usr missing: made implicitly
        File("usr/bin/su", b"\x7fELF su", mode=0o4755, uid=0, gid=0),
        File("usr/bin/own", b"suid, not root", mode=0o6711, uid=1000, gid=1000),
        File(
            "usr/bin/ping", b"\x7fELF ping", mode=0o755, xattrs={"security.capability": CAP_NET_RAW}
        ),
        File("big", big, mode=0o600, uid=65534, gid=65534),
        File("empty", b"", mode=0o000),
        Dir("tmp", mode=0o1777),
        Dir("srv", mode=0o2775, uid=33, gid=33),
        Dir("ro", mode=0o555),
        File("ro/inside", b"written after ro was made"),  # dir modes are applied at the end
        Dir("acl", mode=0o775, xattrs={"system.posix_acl_default": ACL_DEFAULT}),
        File(
            "acl/f",
            b"acl",
            mode=0o664,
            xattrs={
                "system.posix_acl_access": ACL_ACCESS,
                "trusted.overlay.x": b"t",
                "user.mime_type": b"text/plain",
                "security.selinux": b"system_u:object_r:bin_t:s0\x00",
            },
        ),
        Symlink("bin", "usr/bin", uid=7, gid=8),
        Symlink("abs", "/etc/passwd"),
        Symlink("dangling", "../nowhere/at/all"),
        Device("dev/null", "chr", 1, 3, mode=0o666),
        Device("dev/sda", "blk", 8, 0, mode=0o660, gid=6),
        Device("dev/big", "chr", 4095, 0xFFFFF, mode=0o600),
        Fifo("run/initctl", mode=0o600, uid=0, gid=0),
        compression=compression,
    )
    assert layer.media_type == MEDIA_TYPES[compression]
    t = fr.apply(sb.root, [layer])
    assert t.diff_ids == [layer.diff_id]
    assert t.entries_used == 22
    assert t.bytes_used > len(big)  # the whole uncompressed stream is charged

    assert t["etc"].type == "dir" and t["etc"].mode == 0o755
    assert t["etc/passwd"].data == b"root:x:0:0::/root:/bin/sh\n"
    assert t["etc/passwd"].mtime == pytest.approx(1_600_000_000.5, abs=1e-3)
    assert (t["etc/shadow"].mode, t["etc/shadow"].uid, t["etc/shadow"].gid) == (0o640, 0, 42)
    assert (t["usr"].type, t["usr"].mode, t["usr"].uid) == ("dir", 0o755, 0)
    assert t["usr/bin/su"].mode == 0o4755
    assert (t["usr/bin/own"].mode, t["usr/bin/own"].uid) == (0o6711, 1000)  # chmod after chown
    assert t["usr/bin/ping"].xattrs == {"security.capability": CAP_NET_RAW}
    assert t["big"].sha256 == hashlib.sha256(big).hexdigest()
    assert (t["big"].uid, t["big"].gid, t["big"].mode) == (65534, 65534, 0o600)
    assert (t["empty"].size, t["empty"].mode) == (0, 0)
    assert t["tmp"].mode == 0o1777
    assert (t["srv"].mode, t["srv"].uid, t["srv"].gid) == (0o2775, 33, 33)
    assert t["ro"].mode == 0o555 and t["ro/inside"].data == b"written after ro was made"
    assert t["ro"].mtime == MTIME  # set after its children were written
    assert t["acl"].xattrs == {"system.posix_acl_default": ACL_DEFAULT}
    assert t["acl/f"].xattrs == {
        "system.posix_acl_access": ACL_ACCESS,
        "trusted.overlay.x": b"t",
        "user.mime_type": b"text/plain",
        "security.selinux": b"system_u:object_r:bin_t:s0\x00",
    }
    assert (t["bin"].type, t["bin"].target, t["bin"].uid, t["bin"].gid) == (
        "symlink",
        "usr/bin",
        7,
        8,
    )
    assert t["abs"].target == "/etc/passwd"  # verbatim, not rewritten
    assert t["dangling"].target == "../nowhere/at/all"
    assert t["bin"].mtime == MTIME
    assert (t["dev/null"].type, t["dev/null"].rdev, t["dev/null"].mode) == ("chr", (1, 3), 0o666)
    assert (t["dev/sda"].type, t["dev/sda"].rdev, t["dev/sda"].gid) == ("blk", (8, 0), 6)
    assert t["dev/big"].rdev == (4095, 0xFFFFF)
    assert (t["run/initctl"].type, t["run/initctl"].mode) == ("fifo", 0o600)


def test_long_utf8_and_binary_names(fr: FakerootApplier, sb: Sandbox) -> None:
    long_dir = "/".join(["d" * 200] * 3)  # 602 bytes: PAX path record
    utf8 = "café/ñandú-日本語.txt"
    binary = "raw-\udcff\udcfe-name"  # bytes 0xff 0xfe: not UTF-8, kept byte for byte
    long_target = "../" * 10 + "t" * 200
    layer = sb.layer(
        File(f"{long_dir}/{'f' * 255}", b"long"),
        File(utf8, b"utf8"),
        File(binary, b"bin"),
        Symlink("longlink", long_target),
        Hardlink("hl", f"{long_dir}/{'f' * 255}"),
    )
    gnu = sb.layer(File("g" * 150 + "/" + "h" * 150, b"gnu longname"), fmt=tarfile.GNU_FORMAT)
    t = fr.apply(sb.root, [layer, gnu])
    assert t[f"{long_dir}/{'f' * 255}"].data == b"long"
    assert t[utf8].data == b"utf8"
    assert t[binary].data == b"bin"
    assert os.fsencode(binary) == b"raw-\xff\xfe-name"
    assert t["longlink"].target == long_target
    assert t["hl"].ino == t[f"{long_dir}/{'f' * 255}"].ino
    assert t["g" * 150 + "/" + "h" * 150].data == b"gnu longname"


def test_whiteouts_delete_files_trees_and_symlinks(fr: FakerootApplier, sb: Sandbox) -> None:
    lower = sb.layer(
        File("etc/motd", b"hello"),
        File("etc/keep", b"kept"),
        Dir("var/cache/apt"),
        File("var/cache/apt/pkg.bin", b"x" * 1000),
        Dir("data"),
        File("data/precious", b"must survive"),
        Symlink("link-to-data", "data"),
        Symlink("abs-link", str(sb.outside)),  # (host view: the sandbox, never more)
    )
    upper = sb.layer(
        Whiteout("etc/motd"),
        Whiteout("var/cache"),
        Whiteout("link-to-data"),  # the link goes, not what it points to
        Whiteout("abs-link"),
        Whiteout("never/existed/x"),  # nothing to do, no dirs created for it
        Raw(tarfile.TarInfo("etc/.wh..wh.plnk")),  # AUFS bookkeeping: ignored
    )
    before = sb.snapshot()
    t = fr.apply(sb.root, [lower, upper])
    assert sb.snapshot() == before
    assert "etc/motd" not in t and "var/cache" not in t and "link-to-data" not in t
    assert "abs-link" not in t and "never" not in t
    assert t["etc/keep"].data == b"kept" and "etc/.wh..wh.plnk" not in t
    assert t["var"].type == "dir"
    assert t["data/precious"].data == b"must survive"
    assert not any(".wh." in p for p in t.paths())


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_opaque_dir_keeps_own_layer_entries_wherever_the_marker_is(
    fr: FakerootApplier, sb: Sandbox, where: str
) -> None:
    lower = sb.layer(
        Dir("d", mode=0o755),
        File("d/old", b"lower"),
        Dir("d/sub"),
        File("d/sub/old2", b"lower"),
        File("d/sub/same", b"lower version"),
        Symlink("d/oldlink", str(sb.outside)),  # purged as a link, never followed
        File("other/untouched", b"lower"),
    )
    own: list[Entry] = [
        Dir("d", mode=0o700),
        File("d/new", b"upper"),
        File("d/sub/new2", b"upper"),  # d/sub re-made implicitly by this layer: its lower files go
        File("d/sub/same", b"upper version"),
    ]
    marker = Opaque("d")
    entries = {
        "first": [marker, *own],
        "middle": [*own[:2], marker, *own[2:]],
        "last": [*own, marker],
    }[where]
    before = sb.snapshot()
    t = fr.apply(sb.root, [lower, sb.layer(*entries)])
    assert sb.snapshot() == before
    under_d = {p for p in t.paths() if p.startswith("d/")}
    assert under_d == {"d/new", "d/sub", "d/sub/new2", "d/sub/same"}
    assert t["d/sub/same"].data == b"upper version"
    assert t["d"].mode == 0o700
    assert t["other/untouched"].data == b"lower"


def test_opaque_root_and_whiteout_of_own_entry(fr: FakerootApplier, sb: Sandbox) -> None:
    lower = sb.layer(
        File("a", b"lower a"), File("b", b"lower b"), Dir("keepdir"), File("keepdir/x")
    )
    # Per the spec a whiteout hides lower layers only: "c" (this layer) survives its whiteout.
    upper = sb.layer(
        File("c", b"upper c"), Whiteout("c"), Dir("keepdir"), Opaque(""), Whiteout("b")
    )
    t = fr.apply(sb.root, [lower, upper])
    assert t.paths() == {"c", "keepdir"}
    assert t["c"].data == b"upper c"


def test_replacement_in_every_direction(fr: FakerootApplier, sb: Sandbox) -> None:
    lower = sb.layer(
        Dir("dir2file"),
        File("dir2file/child", b"gone"),
        File("file2dir", b"gone"),
        Dir("target"),
        File("target/t", b"target content"),
        Symlink("link2dir", "target"),
        Dir("dir2link"),
        File("dir2link/x", b"gone"),
        File("file2link", b"gone"),
        Symlink("link2file", "target/t"),
        Device("node2file", "chr", 1, 5),
        File("shared", b"old shared"),
        Hardlink("shared-alias", "shared"),
    )
    upper = sb.layer(
        File("dir2file", b"now a file", mode=0o600),
        Dir("file2dir", mode=0o711),
        File("file2dir/c", b"child"),
        Dir("link2dir"),  # a real directory replaces the symlink; target/ is not touched
        File("link2dir/new", b"in the new dir"),
        Symlink("dir2link", "target"),
        Symlink("file2link", "/etc"),
        File("link2file", b"not written through"),
        Fifo("node2file"),
        File("shared", b"new shared"),  # unlinked, not overwritten: the alias keeps the old data
    )
    t = fr.apply(sb.root, [lower, upper])
    assert (t["dir2file"].type, t["dir2file"].data, t["dir2file"].mode) == (
        "file",
        b"now a file",
        0o600,
    )
    assert (t["file2dir"].type, t["file2dir"].mode) == ("dir", 0o711)
    assert t["file2dir/c"].data == b"child"
    assert t["link2dir"].type == "dir" and t["link2dir/new"].data == b"in the new dir"
    assert {p for p in t.paths() if p.startswith("target/")} == {"target/t"}
    assert t["target/t"].data == b"target content"
    assert (t["dir2link"].type, t["dir2link"].target) == ("symlink", "target")
    assert (t["file2link"].type, t["file2link"].target) == ("symlink", "/etc")
    assert (t["link2file"].type, t["link2file"].data) == ("file", b"not written through")
    assert t["node2file"].type == "fifo"
    assert t["shared"].data == b"new shared" and t["shared-alias"].data == b"old shared"
    assert t["shared"].ino != t["shared-alias"].ino
    assert not any(p.startswith(("dir2file/", "dir2link/")) for p in t.paths())


def test_dir_over_dir_keeps_children_and_replaces_metadata(
    fr: FakerootApplier, sb: Sandbox
) -> None:
    lower = sb.layer(
        Dir("d", mode=0o755, uid=0, xattrs={"user.old": b"1", "trusted.t": b"2"}),
        File("d/child", b"kept"),
    )
    upper = sb.layer(Dir("d", mode=0o750, uid=5, gid=6, xattrs={"user.new": b"3"}))
    t = fr.apply(sb.root, [lower, upper])
    assert t["d/child"].data == b"kept"
    assert (t["d"].mode, t["d"].uid, t["d"].gid) == (0o750, 5, 6)
    assert t["d"].xattrs == {"user.new": b"3"}


def test_directory_made_again_implicitly_does_not_take_a_deleted_ones_mode(
    fr: FakerootApplier, sb: Sandbox
) -> None:
    # p/a (0700) goes with p when p becomes a symlink; p/a/x then makes a fresh p/a (0755).
    layer = sb.layer(
        Dir("p"),
        Dir("p/a", mode=0o700, mtime=MTIME + 5),
        Symlink("p", "q"),
        Dir("p"),
        File("p/a/x", b"x"),
    )
    t = fr.apply(sb.root, [layer])
    assert t["p/a"].mode == 0o755 and t["p/a"].mtime != MTIME + 5


def test_duplicate_entries_later_wins(fr: FakerootApplier, sb: Sandbox) -> None:
    t = fr.apply(
        sb.root,
        [
            sb.layer(
                File("f", b"first", mode=0o600),
                File("f", b"second", mode=0o644, uid=3),
                Dir("d", mode=0o700),
                Dir("d", mode=0o755),
                Symlink("s", "a"),
                Symlink("s", "b"),
            )
        ],
    )
    assert (t["f"].data, t["f"].mode, t["f"].uid) == (b"second", 0o644, 3)
    assert t["d"].mode == 0o755 and t["s"].target == "b"


def test_hardlinks(fr: FakerootApplier, sb: Sandbox) -> None:
    lower = sb.layer(File("lower/file", b"from lower", mode=0o755), File("replaced", b"old"))
    upper = sb.layer(
        Hardlink("to-lower", "lower/file"),  # target in a lower layer
        File("same/file", b"same layer"),
        Hardlink("to-same", "same/file"),
        Hardlink("./to-same-dotted", "./same/file"),
        File("replaced", b"new"),  # replaced earlier in this layer...
        Hardlink("to-replaced", "replaced"),  # ...the link gets the new file
        File("soon-replaced", b"v1"),
        Hardlink("keeps-v1", "soon-replaced"),
        File("soon-replaced", b"v2"),  # the earlier link keeps v1
        Symlink("sym", "lower/file"),
        Hardlink("to-sym", "sym"),  # a link to the symlink itself
        Hardlink("same/file", "same/file"),  # to itself: nothing happens
        File("existing", b"was here"),
        Hardlink("existing", "same/file"),  # replaces a file
    )
    t = fr.apply(sb.root, [lower, upper])
    assert t["to-lower"].ino == t["lower/file"].ino and t["to-lower"].data == b"from lower"
    assert t["lower/file"].nlink == 2
    assert t["to-same"].ino == t["same/file"].ino == t["to-same-dotted"].ino == t["existing"].ino
    assert t["same/file"].nlink == 4
    assert t["to-replaced"].ino == t["replaced"].ino and t["to-replaced"].data == b"new"
    assert t["keeps-v1"].data == b"v1" and t["soon-replaced"].data == b"v2"
    assert t["keeps-v1"].ino != t["soon-replaced"].ino
    assert (t["to-sym"].type, t["to-sym"].ino) == ("symlink", t["sym"].ino)


def test_merged_usr_symlinked_parents_resolve_inside_the_root(
    fr: FakerootApplier, sb: Sandbox
) -> None:
    lower = sb.layer(
        Dir("usr"),
        Dir("usr/lib"),
        Symlink("lib", "usr/lib"),
        Symlink("bin", "usr/bin"),  # dangling for now
        Symlink("lib64", "usr/../usr/lib"),
    )
    upper = sb.layer(
        File("lib/libc.so.6", b"libc"),
        File("bin/sh", b"sh", mode=0o755),  # creates usr/bin through the dangling link
        Dir("lib/x86_64-linux-gnu", mode=0o750),
        File("lib64/ld.so", b"ld"),
        File("usr/lib/direct", b"direct"),
    )
    t = fr.apply(sb.root, [lower, upper])
    assert (
        t["lib"].type == "symlink" and t["bin"].type == "symlink" and t["lib64"].type == "symlink"
    )
    assert t["usr/lib/libc.so.6"].data == b"libc"
    assert t["usr/bin/sh"].data == b"sh" and t["usr/bin"].type == "dir"
    assert t["usr/lib/x86_64-linux-gnu"].mode == 0o750
    assert t["usr/lib/ld.so"].data == b"ld"
    assert {p.split("/")[0] for p in t.paths()} == {"usr", "lib", "bin", "lib64"}


def test_root_entry_and_dot_slash_names(fr: FakerootApplier, sb: Sandbox) -> None:
    layer = sb.layer(
        Dir(".", mode=0o755, uid=0), Dir("./etc"), File("./etc/x", b"x"), File(".//y", b"y")
    )
    t = fr.apply(sb.root, [layer])
    assert t[""].mode == 0o755 and t[""].mtime == MTIME
    assert t["etc/x"].data == b"x" and t["y"].data == b"y"


def test_entry_types_not_in_oci(fr: FakerootApplier, sb: Sandbox) -> None:
    cont = tarfile.TarInfo("contiguous")
    cont.type = tarfile.CONTTYPE  # "7": a regular file for every reader
    vol = tarfile.TarInfo("VOLUME-LABEL")
    vol.type = b"V"
    t = fr.apply(sb.root, [sb.layer(Raw(cont, b"contiguous data"), Raw(vol))])
    assert t["contiguous"].data == b"contiguous data"
    assert "VOLUME-LABEL" not in t

    sparse = tarfile.TarInfo("sparse")
    sparse.type = tarfile.GNUTYPE_SPARSE
    with pytest.raises(ImageError, match="sparse"):
        fr.apply(sb.root, [sb.layer(Raw(sparse, b"x" * 512), fmt=tarfile.GNU_FORMAT)])
    pax_sparse = tarfile.TarInfo("GNUSparseFile.0/s")
    pax_sparse.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": "s",
        "GNU.sparse.realsize": "1099511627776",
    }
    with pytest.raises(ImageError, match="sparse"):
        fr.apply(sb.root, [sb.layer(Raw(pax_sparse, b"1\n0\n512\n" + b"\0" * 1024))])
    odd = tarfile.TarInfo("odd")
    odd.type = b"Z"
    with pytest.raises(ImageError, match="unsupported tar entry type"):
        fr.apply(sb.root, [sb.layer(Raw(odd))])


def test_xattr_policy(fr: FakerootApplier, sb: Sandbox) -> None:
    layer = sb.layer(
        Symlink("s", "t", xattrs={"user.no": b"1", "trusted.yes": b"2"}),
        File("f", b"", xattrs={"weird.ns": b"1", "system.posix_acl_default": ACL_DEFAULT}),
    )
    t = fr.apply(sb.root, [layer])
    assert t["s"].xattrs == {"trusted.yes": b"2"}  # Linux refuses user.* on symlinks
    assert t["f"].xattrs == {}  # unknown namespace; default ACL on a file
    assert len(t.warnings) == 3 and "user.no" in t.warnings[0]

    with pytest.raises(ImageError, match="not a valid POSIX ACL"):
        fr.apply(
            sb.root, [sb.layer(File("bad", xattrs={"system.posix_acl_access": b"\x02\0\0\0xyz"}))]
        )
    with pytest.raises(ImageError, match="ext4 holds about 4 KiB"):
        fr.apply(
            sb.root, [sb.layer(File("fat", xattrs={f"user.{i}": b"v" * 1000 for i in range(5)}))]
        )


def test_libarchive_xattr_records(fr: FakerootApplier, sb: Sandbox) -> None:
    ti = tarfile.TarInfo("f")
    ti.pax_headers = {"LIBARCHIVE.xattr.user.a%3Db": "AAEC/w=="}  # base64 of 00 01 02 ff
    t = fr.apply(sb.root, [sb.layer(Raw(ti, b""))])
    assert t["f"].xattrs == {"user.a=b": b"\x00\x01\x02\xff"}


# --- integrity --------------------------------------------------------------------------------
def test_diff_id_mismatch_names_the_layer_and_both_digests(
    fr: FakerootApplier, sb: Sandbox
) -> None:
    layer = sb.layer(File("f", b"genuine"), compression="gzip")
    wrong = "sha256:" + "0" * 64
    with pytest.raises(ImageError) as err:
        fr.apply(sb.root, [layer], diff_ids=[wrong])
    msg = err.value.message
    assert layer.digest in msg and wrong in msg and layer.diff_id in msg
    assert "tampered" in err.value.hint


def test_empty_layer_and_trailing_padding_count_in_the_diff_id(
    fr: FakerootApplier, sb: Sandbox
) -> None:
    empty = write_blob(sb.tmp / "blobs", tar_bytes([]), "gzip")
    padded = write_blob(sb.tmp / "blobs", tar_bytes([File("a", b"a")]) + bytes(8192))
    t = fr.apply(sb.root, [empty, padded])
    assert t.diff_ids == [empty.diff_id, padded.diff_id]
    assert t.paths() == {"a"}


def test_corrupt_streams_are_image_errors(fr: FakerootApplier, sb: Sandbox) -> None:
    good = tar_bytes([File("a", b"a" * 600), File("b", b"b")], format=tarfile.USTAR_FORMAT)
    bad_header = bytearray(good)
    bad_header[1536 + 10] ^= 0xFF  # second header (after 512 header + 1024 data): bad checksum
    cases = {
        "corrupt tar header": write_blob(sb.tmp / "blobs", bytes(bad_header)),
        "corrupt compressed stream": write_blob(sb.tmp / "blobs", good, "gzip", name="trunc.gz"),
        "zstd": write_blob(sb.tmp / "blobs", good, "zstd", name="garbage.zst"),
        "unexpected end of data": write_blob(sb.tmp / "blobs", good[:1000]),
    }
    gz = cases["corrupt compressed stream"].path
    gz.write_bytes(gz.read_bytes()[:-20])
    cases["zstd"].path.write_bytes(b"\x28\xb5\x2f\xfd" + os.urandom(200))
    for what, layer in cases.items():
        with pytest.raises(ImageError, match=what if what != "zstd" else "corrupt"):
            fr.apply(sb.root, [layer], check_diff_ids=False)


# --- hostile layers ---------------------------------------------------------------------------
def test_dotdot_names_are_refused(fr: FakerootApplier, sb: Sandbox) -> None:
    before = sb.snapshot()
    for name in ("../outside/pwned", "a/../../outside/pwned", "./../x", "a/b/../../../x"):
        with pytest.raises(ImageError, match=r"'\.\.' component") as err:
            fr.apply(sb.root, [sb.layer(File(name, b"pwned"))])
        assert repr(name) in err.value.message  # names the entry
    with pytest.raises(ImageError, match="hard link target contains a '..'"):
        fr.apply(sb.root, [sb.layer(Hardlink("h", "../outside/secret"))])
    with pytest.raises(ImageError, match=r"'\.\.'"):
        fr.apply(sb.root, [sb.layer(Whiteout("../outside/secret"))])
    assert sb.snapshot() == before


def test_absolute_names_land_inside_the_root(fr: FakerootApplier, sb: Sandbox) -> None:
    before = sb.snapshot()
    # (Only names that would land in ``outside`` if they were taken as host paths.)
    t = fr.apply(
        sb.root,
        [
            sb.layer(
                File(str(sb.outside / "secret"), b"not the host's"),
                File("//" + str(sb.outside / "new"), b"new"),
                Hardlink(str(sb.outside / "hl"), str(sb.outside / "secret")),
            )
        ],
    )
    assert t[rel(sb.outside / "secret")].data == b"not the host's"
    assert t[rel(sb.outside / "new")].data == b"new"
    assert t[rel(sb.outside / "hl")].ino == t[rel(sb.outside / "secret")].ino
    assert sb.snapshot() == before


@pytest.mark.parametrize("same_layer", [False, True])
def test_symlinked_parents_never_escape(fr: FakerootApplier, sb: Sandbox, same_layer: bool) -> None:
    # Each link, followed on the host, would lead into ``outside`` (so a regression is caught by
    # the snapshot and never writes anywhere else); followed inside the root, somewhere in it.
    o = rel(sb.outside)
    before = sb.snapshot()
    links: list[Entry] = [
        Symlink("evil", "../" * 30 + o),  # on the host: .. stops at /, then into outside
        Symlink("dotdot", "../outside"),
        Symlink("abs", str(sb.outside)),
        Symlink("up", "/"),
        Symlink("chain1", "chain2"),
        Symlink("chain2", "./chain3"),
        Symlink("chain3", str(sb.outside / "sub")),
    ]
    writes: list[Entry] = [
        File("evil/x", b"1"),
        File("dotdot/y", b"5"),
        File("abs/secret", b"2"),
        Dir("abs/sub"),
        File(f"up/{o}/z", b"3"),
        File("chain1/file", b"4"),
        Hardlink("abs/hl", f"up/{o}/z"),
        Device("abs/dev", "chr", 1, 1),
        Fifo("dotdot/fifo"),
    ]
    layers = [sb.layer(*links, *writes)] if same_layer else [sb.layer(*links), sb.layer(*writes)]
    t = fr.apply(sb.root, layers)
    assert t[f"{o}/x"].data == b"1"  # the ..s stop at the root
    assert t["outside/y"].data == b"5"
    assert t[f"{o}/secret"].data == b"2"
    assert t[f"{o}/z"].data == b"3"
    assert t[f"{o}/sub/file"].data == b"4"
    assert t[f"{o}/hl"].ino == t[f"{o}/z"].ino
    assert t[f"{o}/dev"].type == "chr" and t["outside/fifo"].type == "fifo"
    assert sb.snapshot() == before


def test_symlink_loops_are_refused(fr: FakerootApplier, sb: Sandbox) -> None:
    loop = sb.layer(Symlink("l1", "l2"), Symlink("l2", "l1"), File("l1/x", b"x"))
    with pytest.raises(ImageError, match="too many levels of symbolic links"):
        fr.apply(sb.root, [loop])
    self_loop = sb.layer(Symlink("me", "./me/me"), File("me/x"))
    with pytest.raises(ImageError, match="too many levels"):
        fr.apply(sb.root / "2", [self_loop])


def test_parent_that_is_a_file_is_refused(fr: FakerootApplier, sb: Sandbox) -> None:
    with pytest.raises(ImageError, match="parent /f is not a directory"):
        fr.apply(sb.root, [sb.layer(File("f", b"x"), File("f/child", b"y"))])


def test_hostile_hardlinks(fr: FakerootApplier, sb: Sandbox) -> None:
    before = sb.snapshot()
    for target in (str(sb.outside / "secret"), "evil/secret", "dir"):
        layer = sb.layer(Symlink("evil", str(sb.outside)), Dir("dir"), Hardlink("h", target))
        with pytest.raises(ImageError, match="does not exist|is a directory") as err:
            fr.apply(sb.root / target.replace("/", "_"), [layer])
        assert "'h'" in err.value.message
    # A hard link to a symlink that points outside links the symlink, not the host file.
    t = fr.apply(sb.root, [sb.layer(Symlink("s", str(sb.outside / "secret")), Hardlink("h", "s"))])
    assert (t["h"].type, t["h"].ino) == ("symlink", t["s"].ino)
    # The same path inside the root is what a link through a symlinked parent gets.
    layer = sb.layer(
        Symlink("evil", str(sb.outside)),
        File(f"{sb.outside}/secret", b"in-root copy"),
        Hardlink("h2", "evil/secret"),
    )
    t = fr.apply(sb.root / "3", [layer])
    assert t["h2"].data == b"in-root copy"
    assert sb.snapshot() == before
    assert (sb.outside / "secret").stat().st_nlink == 1


def test_whiteouts_and_replacements_through_symlinks_stay_inside(
    fr: FakerootApplier, sb: Sandbox
) -> None:
    before = sb.snapshot()
    lower = sb.layer(
        Symlink("evil", str(sb.outside)),
        Symlink("rel", "../outside"),
        Symlink("f", str(sb.outside / "secret")),
        Symlink("g", "../outside/secret"),
        Symlink("d", str(sb.outside / "sub")),
    )
    upper = sb.layer(
        Whiteout("evil/secret"),
        Opaque("evil"),
        Opaque("rel/sub"),
        Whiteout("rel/sub/file"),
        File("f", b"replaces the link"),  # O_EXCL after unlinking the link: never written through
        Device("g", "chr", 1, 3),
        Dir("d"),
        Whiteout("d"),  # this layer's dir: a whiteout only hides lower contents
    )
    t = fr.apply(sb.root, [lower, upper])
    assert (t["f"].type, t["f"].data) == ("file", b"replaces the link")
    assert t["g"].type == "chr" and t["d"].type == "dir"
    assert t["evil"].type == "symlink" and t["rel"].type == "symlink"
    assert sb.snapshot() == before


def test_nul_bytes_and_out_of_range_numbers_are_refused(fr: FakerootApplier, sb: Sandbox) -> None:
    nul_name = tarfile.TarInfo("x")
    nul_name.pax_headers = {"path": "etc/pass\x00wd"}
    nul_link = tarfile.TarInfo("l")
    nul_link.type = tarfile.SYMTYPE
    nul_link.pax_headers = {"linkpath": "/etc\x00/x"}
    for raw, what in ((nul_name, "name contains a NUL"), (nul_link, "target contains a NUL")):
        with pytest.raises(ImageError, match=what):
            fr.apply(sb.root, [sb.layer(Raw(raw))])
    with pytest.raises(ImageError, match="owner 4294967295:0 out of range"):
        fr.apply(sb.root, [sb.layer(File("f", uid=0xFFFFFFFF))])
    with pytest.raises(ImageError, match="device number 5000:1 out of range"):
        fr.apply(sb.root, [sb.layer(Device("d", "chr", 5000, 1))])
    with pytest.raises(ImageError, match="component longer than 255"):
        fr.apply(sb.root, [sb.layer(File("a" * 256))])


# --- bounds -------------------------------------------------------------------------------------
def _gzip_bomb(path: Path, head: bytes, gib: int) -> None:
    """``head`` then ``gib`` GiB of zeros, gzip-compressed (~1 MiB per GiB), without ever
    holding or compressing more than 1 MiB: after a full flush the compressor emits identical
    bytes for identical input, so one compressed MiB is repeated. No trailer: the applier must
    stop long before it would read one."""
    co = zlib.compressobj(9, zlib.DEFLATED, 31)
    zero = bytes(1 << 20)
    with path.open("wb") as f:
        f.write(co.compress(head) + co.flush(zlib.Z_FULL_FLUSH))
        f.write(co.compress(zero) + co.flush(zlib.Z_FULL_FLUSH))
        block = co.compress(zero) + co.flush(zlib.Z_FULL_FLUSH)
        for _ in range(gib * 1024 - 2):
            f.write(block)


def _bomb_layer(sb: Sandbox, name: str, head: bytes, gib: int) -> Layer:
    path = sb.tmp / "blobs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    _gzip_bomb(path, head, gib)
    return Layer(path, MEDIA_TYPES["gzip"], "", "sha256:" + "b" * 64, "gzip")


def test_decompression_bombs_stop_at_the_limit_quickly(fr: FakerootApplier, sb: Sandbox) -> None:
    limits = {"max_bytes": 8 << 20}
    # A file that declares 10 GiB: refused from its header.
    big = tarfile.TarInfo("bomb")
    big.size = 10 << 30
    declared = _bomb_layer(sb, "declared.gz", big.tobuf(tarfile.PAX_FORMAT), 10)
    # A small valid tar followed by an endless run of zeros: stopped while draining the stream.
    trailing = _bomb_layer(sb, "trailing.gz", tar_bytes([File("ok", b"ok")]), 10)
    # Many modest files: the total is what counts.
    many = sb.layer(*(File(f"f{i}", bytes(1 << 20)) for i in range(12)), compression="zstd")
    cases = [
        (declared, "exceeds the image size limit"),
        (trailing, "more than 8.0 MiB"),
        (many, "limit|more than"),
    ]
    for layer, what in cases:
        start = time.monotonic()
        with pytest.raises(ImageError, match=what) as err:
            fr.apply(sb.root, [layer], limits=limits, check_diff_ids=False)
        assert time.monotonic() - start < 3
        assert layer.digest in err.value.message
    zstd_bomb = write_blob(sb.tmp / "blobs", tar_bytes([]) + bytes(64 << 20), "zstd")
    assert zstd_bomb.path.stat().st_size < 64 << 10
    with pytest.raises(ImageError, match="decompression bomb"):
        fr.apply(sb.root, [zstd_bomb], limits=limits)


def test_budget_is_shared_across_layers(fr: FakerootApplier, sb: Sandbox) -> None:
    a = sb.layer(File("a", bytes(3 << 20)))
    b = sb.layer(File("b", bytes(3 << 20)))
    t = fr.apply(sb.root / "1", [a], limits={"max_bytes": 5 << 20})
    assert t.bytes_used == len(tar_bytes([File("a", bytes(3 << 20))]))
    with pytest.raises(ImageError, match=b.digest):
        fr.apply(sb.root / "2", [a, b], limits={"max_bytes": 5 << 20})


def test_entry_count_and_name_length_limits(fr: FakerootApplier, sb: Sandbox) -> None:
    many = sb.layer(*(File(f"e{i}") for i in range(300)))
    with pytest.raises(ImageError, match="more than 100 entries"):
        fr.apply(sb.root, [many], limits={"max_entries": 100})
    t = fr.apply(sb.root / "ok", [many], limits={"max_entries": 300})
    assert len(t.paths()) == 300
    with pytest.raises(ImageError, match="longer than 64 bytes"):
        fr.apply(sb.root, [sb.layer(File("d/" * 40 + "f"))], limits={"max_name": 64})


def test_oversized_and_chained_extended_headers(fr: FakerootApplier, sb: Sandbox) -> None:
    fat = tarfile.TarInfo("f")
    fat.pax_headers = {"comment": "x" * (2 << 20)}
    with pytest.raises(ImageError, match="extended header of"):
        fr.apply(sb.root, [sb.layer(Raw(fat, b""))])
    one = tarfile.TarInfo._create_pax_generic_header({"comment": "c"}, tarfile.XHDTYPE, "utf-8")  # type: ignore[attr-defined]
    chained = one * 20 + tar_bytes([File("f", b"x")])
    with pytest.raises(ImageError, match="extended headers in a row"):
        fr.apply(sb.root, [write_blob(sb.tmp / "blobs", chained)])


def test_unknown_media_type(fr: FakerootApplier, sb: Sandbox) -> None:
    layer = sb.layer(File("f"))
    odd = Layer(
        layer.path, "application/vnd.oci.image.layer.v1.tar+bzip2", layer.diff_id, layer.digest, ""
    )
    with pytest.raises(ImageError, match="unsupported media type"):
        fr.apply(sb.root, [odd])
