"""Apply layers under fakeroot and look at the result, for tests of :mod:`hutch.images.layers`.

Ownership, device nodes and privileged xattrs need root; the tests get them the way production
does, from ``fakeroot``. One long-lived helper process serves a whole test session:

    with FakerootApplier() as fr:
        tree = fr.apply(root, [layer1, layer2])       # raises the HutchError the applier raised
        tree["usr/bin/ping"].mode, .uid, .xattrs ...  # what the session's lstat/getxattr say

The helper (``python -m tests.support.fakeroot_apply`` inside ``fakeroot``) reads one JSON request
per line on stdin and answers one JSON line: the applied diff_ids and a dump of every entry under
the root (type, mode, owner, size, link target, device numbers, inode, xattrs, content).

The applier also records what the image wants for every path (:class:`hutch.images.layers.TreeMeta`,
which lets ``mkfs.ext4`` run outside fakeroot). When the root started empty, :meth:`apply` checks
that record against what the fakeroot session says, for every path: each test of the applier
also tests the record.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
_TYPES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "sock",
}
_INLINE = 1 << 16  # file contents up to this size are returned as bytes


@dataclass(frozen=True)
class Node:
    type: str
    mode: int  # permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    size: int
    ino: int
    nlink: int
    mtime: float
    target: str | None = None  # symlink
    rdev: tuple[int, int] | None = None  # devices: (major, minor)
    xattrs: dict[str, bytes] = field(default_factory=dict)
    data: bytes | None = None  # files up to 64 KiB
    sha256: str | None = None  # files


@dataclass
class Applied:
    diff_ids: list[str]
    tree: dict[str, Node]  # root-relative path ("" = the root) → node
    bytes_used: int
    entries_used: int
    warnings: list[str]

    def __getitem__(self, path: str) -> Node:
        return self.tree[path]

    def __contains__(self, path: str) -> bool:
        return path in self.tree

    def paths(self) -> set[str]:
        return set(self.tree) - {""}


# --- the helper process (runs inside fakeroot) -----------------------------------------------
def _node(path: str) -> dict[str, Any]:
    st = os.lstat(path)
    kind = _TYPES[stat.S_IFMT(st.st_mode)]
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        names = []
    out: dict[str, Any] = {
        "type": kind,
        "mode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "size": st.st_size,
        "ino": st.st_ino,
        "nlink": st.st_nlink,
        "mtime": st.st_mtime,
        "xattrs": {n: os.getxattr(path, n, follow_symlinks=False).hex() for n in names},
    }
    if kind == "symlink":
        out["target"] = os.readlink(path)
    elif kind in ("chr", "blk"):
        out["rdev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
    elif kind == "file":
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            data = f.read()
        out["sha256"] = hashlib.sha256(data).hexdigest()
        if len(data) <= _INLINE:
            out["data"] = data.hex()
    return out


def _dump(root: str) -> dict[str, Any]:
    tree = {"": _node(root)}
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as it:
            for entry in it:
                child = f"{rel}/{entry.name}" if rel else entry.name
                tree[child] = _node(entry.path)
                if entry.is_dir(follow_symlinks=False):
                    stack.append(child)
    return tree


def _serve() -> None:
    from hutch.errors import HutchError
    from hutch.images.layers import LayerBudget, LayerLimits, TreeMeta, apply_layer

    for line in sys.stdin:
        req = json.loads(line)
        root = Path(req["root"])
        budget = LayerBudget()
        meta = TreeMeta()
        try:
            root.mkdir(parents=True, exist_ok=True)
            fresh = not any(root.iterdir())
            diff_ids = [
                apply_layer(
                    Path(layer["path"]),
                    layer["media_type"],
                    root,
                    expect_diff_id=layer.get("diff_id"),
                    limits=LayerLimits(**req.get("limits", {})),
                    budget=budget,
                    name=layer.get("name"),
                    meta=meta,
                )
                for layer in req["layers"]
            ]
            resp: dict[str, Any] = {
                "ok": True,
                "diff_ids": diff_ids,
                "tree": _dump(str(root)),
                "bytes_used": budget.bytes_used,
                "entries_used": budget.entries_used,
                "warnings": budget.warnings,
            }
            if fresh:
                resp["meta"] = {
                    k: [mode, uid, gid, rdev, {n: v.hex() for n, v in xattrs}]
                    for k, (mode, uid, gid, rdev, xattrs) in meta.entries.items()
                }
        except HutchError as e:
            resp = {"ok": False, "type": type(e).__name__, "message": e.message, "hint": e.hint}
        except Exception as e:  # a bug: report it to the test rather than dying
            resp = {"ok": False, "type": "crash", "message": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(resp) + "\n")
        sys.stdout.flush()


# --- the test side --------------------------------------------------------------------------
class FakerootApplier:
    """Client of one helper process running under fakeroot."""

    def __init__(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self._proc = subprocess.Popen(
            ["fakeroot", "--", sys.executable, "-m", "tests.support.fakeroot_apply"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )

    def __enter__(self) -> FakerootApplier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._proc.stdin:
            self._proc.stdin.close()
        self._proc.wait(10)

    def apply(
        self,
        root: Path,
        layers: Sequence[Any],
        *,
        limits: dict[str, int] | None = None,
        check_diff_ids: bool = True,
        diff_ids: Sequence[str | None] | None = None,
    ) -> Applied:
        """Apply ``layers`` (tarbuild.Layer) in order onto ``root`` (created if missing).
        ``diff_ids`` overrides the expected diff_ids (default: each layer's own, or none when
        ``check_diff_ids`` is false)."""
        from hutch import errors

        expected = list(diff_ids) if diff_ids is not None else [
            (layer.diff_id if check_diff_ids else None) for layer in layers
        ]  # fmt: skip
        req = {
            "root": str(root),
            "layers": [
                {
                    "path": str(layer.path),
                    "media_type": layer.media_type,
                    "diff_id": want,
                    "name": layer.digest,
                }
                for layer, want in zip(layers, expected, strict=True)
            ],
            "limits": limits or {},
        }
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(req) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fakeroot helper died (exit {self._proc.poll()})")
        resp = json.loads(line)
        if not resp["ok"]:
            cls = getattr(errors, resp["type"], None)
            if cls is None:
                raise RuntimeError(f"applier crashed: {resp['message']}")
            raise cls(resp["message"], hint=resp.get("hint"))
        tree = {}
        for path, n in resp["tree"].items():
            tree[path] = Node(
                type=n["type"],
                mode=n["mode"],
                uid=n["uid"],
                gid=n["gid"],
                size=n["size"],
                ino=n["ino"],
                nlink=n["nlink"],
                mtime=n["mtime"],
                target=n.get("target"),
                rdev=(n["rdev"][0], n["rdev"][1]) if n.get("rdev") else None,
                xattrs={k: bytes.fromhex(v) for k, v in n["xattrs"].items()},
                data=bytes.fromhex(n["data"]) if n.get("data") is not None else None,
                sha256=n.get("sha256"),
            )
        applied = Applied(
            resp["diff_ids"], tree, resp["bytes_used"], resp["entries_used"], resp["warnings"]
        )
        if "meta" in resp:
            check_meta(applied, resp["meta"])
        return applied


def check_meta(applied: Applied, meta: dict[str, list[Any]]) -> None:
    """The applier's record (TreeMeta) says, for every path in the tree, what the fakeroot
    session says (the root only if a layer had a ``./`` entry)."""
    kinds = {v: k for k, v in _TYPES.items()}
    for path, node in applied.tree.items():
        want = meta.get(path)
        if want is None:
            assert path == "", f"no TreeMeta record for {path!r}"
            continue
        mode, uid, gid, rdev, xattrs = want
        rec = (
            mode,
            uid,
            gid,
            (os.major(rdev), os.minor(rdev)) if node.type in ("chr", "blk") else None,
            {n: bytes.fromhex(v) for n, v in xattrs.items()},
        )
        seen = (kinds[node.type] | node.mode, node.uid, node.gid, node.rdev, node.xattrs)
        assert rec == seen, f"TreeMeta record for {path!r}: {rec} != fakeroot's {seen}"


if __name__ == "__main__":
    _serve()
