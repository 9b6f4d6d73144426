"""Build a read-only base ext4 from an image's ordered layers, without host root.

Field notes §6: the faithful way is to apply the layers with Python ``tarfile`` **inside
``fakeroot``** into a tree on **tmpfs** and make the ext4 with ``mkfs.ext4 -d TREE``, which must
record the faked ownership, device nodes and xattrs (incl. ``trusted.*`` and capabilities).
genext2fs (drops xattrs) and ``unshare --map-root-user`` (no devices, no ``trusted.*``) were
rejected there. Running mkfs.ext4 in the fakeroot session makes it slow (every lstat, listxattr
and getxattr it does is a round trip to ``faked``: ~3 s of IPC for 10 000 entries), so it runs
**outside** and the metadata the real tree could not carry is set afterwards with debugfs:

1. :func:`build_base_disk` (this process) checks tools and free space, picks the tree's place
   (``/dev/shm`` when it and RAM have room for the estimated size, else ``scratch``), creates a
   sparse temporary output of ``size_bytes`` next to ``out``, and starts ONE subprocess
   ``fakeroot -- python`` running :mod:`hutch.images.rootfs_worker` (through a small bootstrap
   that skips the heavy package ``__init__`` imports), with a JSON job on its stdin.
2. The worker applies every layer (:mod:`hutch.images.layers`: streaming, diff_id-checked,
   hostile-input safe), writes ``extra_files``, adds the directories a guest needs to boot when
   the image lacks them, and records as it goes what the image wants at every path (type,
   mode, owner, device number, xattrs: :class:`~hutch.images.layers.TreeMeta`; no stat calls,
   so no round trips). It pickles that record, sends a ``tree`` event and waits.
3. Here, ``mkfs.ext4 -d`` starts as the calling user, while :class:`_FixupPlan` compares the
   real tree (what mkfs sees: the caller's ownership, modes with the owner's rw kept by
   fakeroot, devices and fifos as empty regular files, none of the faked xattrs) with the
   record and writes a debugfs script for the differences; then ``debugfs -w -f SCRIPT``
   applies it to the image. As root (CI) that is a few dozen commands; as another user, an
   owner fix for nearly every entry (~0.3 s for 10 000 entries: commands are grouped by
   directory and use names relative to it).
4. When the script cannot be written (a name with a newline or carriage return, which
   ``debugfs -f`` cannot read; a device number over 65535; a path not in the record...), would
   be slower than the round trips it saves (huge directories: debugfs scans a directory per
   name), or debugfs reports any error, the worker is told to run mkfs.ext4 in its still-open
   fakeroot session instead (the old way; :attr:`BaseDiskInfo.mkfs_mode` says which ran).
   Inside someone else's fakeroot session (``FAKEROOTKEY`` set) the worker does so directly.

The worker answers with JSON lines on stdout: ``{"event": "progress", "message": ...}`` (turned
into ``progress`` callbacks), ``tree`` (above), ``{"event": "done", ...}`` or ``{"event": "error",
"type", "message", "hint"}`` (re-raised here as that :mod:`hutch.errors` class). The tree is always
deleted (also on KeyboardInterrupt: the worker's process group gets SIGINT, which also makes the
``fakeroot`` script stop its ``faked`` daemon; a running mkfs is killed); the output is renamed
into place only when complete, mode 0444, after reading one owner back with ``debugfs`` (a
fakeroot that silently did nothing, or a fix-up that did not take, would leave the calling
user's owner there).

Cost (Debian bookworm minbase + python3, 216 MB / 10 300 entries, 2 cores, as root): ~3.0 s
(apply ~1.5 s, mkfs.ext4 ~1.2 s, fix-up planned meanwhile, debugfs 0.01 s, deleting the tree
0.2 s), vs ~3.5–5 s with mkfs.ext4 under fakeroot, whose round trips vary a lot with the load.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from hutch import errors
from hutch.errors import HutchError, ImageError, InternalError, SetupError, StorageError
from hutch.images.layers import LayerLimits, Wanted, free_space_note
from hutch.images.oci import LAYER_COMPRESSION
from hutch.images.rootfs_worker import start_mkfs, wait_mkfs

__all__ = [
    "BOOT_DIRS",
    "MKFS_OPTIONS",
    "BaseDiskInfo",
    "LayerInput",
    "build_base_disk",
]

# mkfs.ext4 options shared by every base disk (the built-in busybox image too):
#  -J size=16: a small journal rather than none. Boxes write to this filesystem (through their
#     overlay) and may be killed or snapshotted at any moment; a journal keeps them mountable
#     without an fsck. 16 MiB is allocated once, in the shared base, instead of the default
#     64 MiB; the journal's writes land in each box's overlay, which is fine at this size.
#  -E lazy_itable_init=0,lazy_journal_init=0: do all initialisation now. Otherwise each guest's
#     kernel starts ext4lazyinit on first mount, zeroing inode tables in the background: CPU time
#     under TCG and megabytes written into every box's overlay. (mke2fs zeroes with
#     fallocate/punch, so the file stays sparse.)
#  -E root_owner=0:0 -L hutch-root -m 0 (no reserved blocks: the disk belongs to one sandbox).
# Changing them changes every base disk: bump builtin.RECIPE_VERSION and pull.BASE_RECIPE.
MKFS_OPTIONS: tuple[str, ...] = (
    "-q",
    "-F",
    "-t",
    "ext4",
    "-L",
    "hutch-root",
    "-J",
    "size=16",
    "-m",
    "0",
    "-E",
    "root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0",
)

#: Directories a guest needs to boot, created (root-owned) only when the image has nothing there.
BOOT_DIRS: tuple[tuple[str, int], ...] = (
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("run", 0o755),
    ("tmp", 0o1777),
)

#: Where the tree goes when there is room (RAM-backed: 3–4 s instead of 7–18 s on disk).
TMPFS_DIR = Path("/dev/shm")

#: Run mkfs.ext4 outside fakeroot and fix the metadata up with debugfs when possible (False:
#: always mkfs.ext4 in the fakeroot session, the slow fallback).
PLAIN_MKFS = True

#: Cost model of the debugfs fix-up against mkfs.ext4's round trips to faked, in seconds:
#: debugfs finds each name by scanning its directory, so the fix-ups of a huge directory cost
#: (commands × entries) scans. Fitted on Debian + python3 (10 300 entries, 2 cores): ~15 µs a
#: command, ~20 ns a scanned entry; fakeroot adds ~290 µs per entry to mkfs.ext4.
_DEBUGFS_PER_COMMAND = 15e-6
_DEBUGFS_PER_SCAN = 20e-9
_FAKEROOT_PER_ENTRY = 250e-6
#: debugfs -f reads its script with fgets() into a BUFSIZ (8 KiB) buffer.
_DEBUGFS_LINE_MAX = 8000

#: How much bigger than the compressed blobs a layer is assumed to unpack (only for the
#: tmpfs-or-disk choice and the free-space check; the real bound is LayerLimits).
_COMPRESSION_RATIO = 3
_MIB = 1 << 20

_TOOLS_HINT = "apt-get install fakeroot e2fsprogs"

#: Runs hutch.images.rootfs_worker without executing ``hutch/__init__.py`` and
#: ``hutch/images/__init__.py`` (they import asyncio, httpx, the VM code...: 0.25 s, more under
#: fakeroot, where every stat is a round trip to faked). The worker needs only leaf modules.
_WORKER_BOOT = (
    "import sys, types\n"
    "for name, sub in (('hutch', ''), ('hutch.images', '/images')):\n"
    "    m = types.ModuleType(name); m.__path__ = [sys.argv[1] + sub]; sys.modules[name] = m\n"
    "from hutch.images.rootfs_worker import main\n"
    "sys.exit(main())\n"
)


@dataclass(frozen=True)
class LayerInput:
    """One layer blob on disk, lowest layer first."""

    path: Path
    media_type: str
    diff_id: str | None  # from the image config; checked if given
    digest: str  # the blob's digest, names the layer in messages


@dataclass(frozen=True)
class BaseDiskInfo:
    path: Path
    size: int  # apparent size (= size_bytes)
    allocated: int  # bytes the sparse file takes on disk
    file_count: int  # entries in the tree (files, dirs, links, nodes), without the root
    bytes_applied: int  # uncompressed tar bytes read
    diff_ids: tuple[str, ...]
    elapsed: float  # seconds
    tree_on_tmpfs: bool
    warnings: tuple[str, ...] = ()
    #: "plain": mkfs.ext4 ran as the calling user, then debugfs set the metadata the real tree
    #: could not hold; "fakeroot": mkfs.ext4 ran in the fakeroot session (the fallback).
    mkfs_mode: Literal["plain", "fakeroot"] = "fakeroot"


def _check_tools() -> None:
    for tool in ("fakeroot", "mkfs.ext4", "debugfs"):
        if shutil.which(tool) is None:
            raise SetupError(
                f"`{tool}` not found; it is needed to build image disks without root",
                hint=_TOOLS_HINT,
            )


def _estimate(layers: Sequence[LayerInput]) -> int:
    """Rough unpacked size of the layers (an over-estimate for most images)."""
    total = 0
    for layer in layers:
        try:
            size = layer.path.stat().st_size
        except OSError as e:
            raise ImageError(
                f"layer {layer.digest}: blob {layer.path} is missing: {e.strerror}",
                hint="The image cache is damaged; pull the image again.",
            ) from e
        compression = LAYER_COMPRESSION.get(layer.media_type)
        if compression is None:
            raise ImageError(
                f"layer {layer.digest}: unsupported media type {layer.media_type!r}",
                hint="hutch reads tar layers, plain, gzip or zstd compressed.",
            )
        total += size if compression == "" else size * _COMPRESSION_RATIO
    return total


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _free(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def _choose_tree_parent(need: int, scratch: Path) -> tuple[Path, bool]:
    """(directory to hold the tree, is tmpfs)."""
    tmpfs = TMPFS_DIR
    if (
        tmpfs.is_dir()
        and os.access(tmpfs, os.W_OK | os.X_OK)
        and _free(tmpfs) >= need
        and _mem_available() >= need
    ):
        return tmpfs, True
    return scratch, False


def _storage_error(
    path: Path, doing: str, exc: OSError | None = None, need: int = 0
) -> StorageError:
    reason = f": {exc.strerror or exc}" if exc is not None else ""
    wanted = f" (needs about {need >> 20} MiB)" if need else ""
    hint = "Free disk space (e.g. `hutch prune`) or point HUTCH_HOME at a bigger disk."
    if exc is not None and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = f"Make {path.parent} writable for this user."
    return StorageError(f"{doing} {path}{reason}{wanted}{free_space_note(path)}", hint=hint)


def _rmtree(path: Path) -> None:
    """Delete a tree the worker made, even where fakeroot left a directory read-only."""

    def retry(func: Callable[..., Any], p: str, _exc: object) -> None:
        try:
            os.chmod(os.path.dirname(p), 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
                shutil.rmtree(p, ignore_errors=True)
            else:
                func(p)
        except FileNotFoundError:
            pass
        except OSError:
            pass

    if not path.exists():
        return
    try:
        shutil.rmtree(path, onerror=retry)
    except RecursionError:  # a pathologically deep tree: rm copes
        subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], check=False)


def _file_mode(data: bytes) -> int:
    return 0o755 if data.startswith((b"\x7fELF", b"#!")) else 0o644


def build_base_disk(
    layers: Sequence[LayerInput],
    out: Path,
    *,
    size_bytes: int,
    progress: Callable[[str], None],
    scratch: Path | None = None,
    limits: LayerLimits | None = None,
    extra_files: Mapping[str, bytes] | None = None,
) -> BaseDiskInfo:
    """Apply ``layers`` (lowest first) and write them as a sparse ext4 of ``size_bytes`` at
    ``out`` (replaced atomically, mode 0444).

    ``scratch``: where the tree goes when tmpfs has no room (default: ``out``'s folder).
    ``extra_files``: path inside the image → content, written after the layers, root-owned, mode
    0755 for ELF binaries and ``#!`` scripts, else 0644.

    Raises ImageError (bad/hostile/tampered layer), StorageError (no room or unwritable, with the
    path and its free space), SetupError (fakeroot/e2fsprogs missing or not working).
    """
    t0 = time.monotonic()
    _check_tools()
    limits = limits or LayerLimits()
    out = Path(os.path.abspath(out))
    estimate = _estimate(layers) + sum(len(d) for d in (extra_files or {}).values())
    need_tree = estimate + estimate // 10 + 16 * _MIB
    # The sparse ext4 allocates about the tree plus metadata and the 16 MiB journal.
    need_out = min(size_bytes, estimate + estimate // 10 + 48 * _MIB)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _storage_error(out.parent, "cannot create the folder", e) from e
    out_free = _free(out.parent)
    if out_free < need_out:
        raise _storage_error(out, "not enough free space to build", need=need_out)
    scratch = Path(os.path.abspath(scratch)) if scratch is not None else out.parent
    tree_parent, on_tmpfs = _choose_tree_parent(need_tree, scratch)
    if not on_tmpfs:
        try:
            scratch.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _storage_error(scratch, "cannot create the scratch folder", e) from e
        need = need_tree
        try:
            if os.stat(scratch).st_dev == os.stat(out.parent).st_dev:
                need += need_out
        except OSError:
            pass
        if _free(scratch) < need:
            raise _storage_error(scratch, "not enough free space to unpack the image in", need=need)

    progress(
        f"building base disk from {len(layers)} layer(s), ~{estimate >> 20} MiB, "
        f"unpacking on {'tmpfs ' + str(tree_parent) if on_tmpfs else str(tree_parent)}"
    )
    workdir: Path | None = None
    tmp_out: Path | None = None
    proc: subprocess.Popen[str] | None = None
    try:
        try:
            workdir = Path(tempfile.mkdtemp(prefix="hutch-rootfs-", dir=tree_parent))
            tree = workdir / "tree"
            tree.mkdir()
        except OSError as e:
            raise _storage_error(tree_parent, "cannot create a scratch folder in", e) from e
        try:
            fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
            tmp_out = Path(name)
            try:
                os.ftruncate(fd, size_bytes)  # sparse: only written blocks take space
            finally:
                os.close(fd)
        except OSError as e:
            raise _storage_error(out, "cannot create", e) from e

        job = {
            "tree": str(tree),
            "out": str(tmp_out),
            "size_bytes": size_bytes,
            "layers": [
                {
                    "path": str(Path(os.path.abspath(layer.path))),
                    "media_type": layer.media_type,
                    "diff_id": layer.diff_id,
                    "digest": layer.digest,
                }
                for layer in layers
            ],
            "limits": {
                "max_bytes": limits.max_bytes,
                "max_entries": limits.max_entries,
                "max_name": limits.max_name,
            },
            "extra_files": [
                {"path": p, "mode": _file_mode(d), "data": base64.b64encode(d).decode()}
                for p, d in (extra_files or {}).items()
            ],
            "mkfs_options": list(MKFS_OPTIONS),
            "boot_dirs": [list(d) for d in BOOT_DIRS],
            # Inside someone else's fakeroot session this process could not see the real
            # tree: let mkfs run in that session.
            "plain": PLAIN_MKFS and "FAKEROOTKEY" not in os.environ,
            "meta": str(workdir / _META_FILE),
        }
        log_path = workdir / "worker.log"
        env = dict(os.environ)
        package = Path(__file__).resolve().parent.parent  # the hutch package
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(package.parent), env.get("PYTHONPATH")])
        )
        cmd = [sys.executable, "-c", _WORKER_BOOT, str(package)]
        if "FAKEROOTKEY" not in env:  # already inside a fakeroot session: use it
            cmd = ["fakeroot", "--", *cmd]
        with open(log_path, "w+") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=env,
                start_new_session=True,  # so an interrupt can reach fakeroot, worker and mkfs
            )
            assert proc.stdin is not None and proc.stdout is not None
            other: list[str] = []
            _tell(proc, json.dumps(job))
            event = _next_event(proc.stdout, progress, other)
            mode: Literal["plain", "fakeroot"] = "fakeroot"
            if event is not None and event["event"] == "tree":
                # The layers are applied; the worker waits in its fakeroot session.
                if _build_plain(tree, tmp_out, workdir, event, size_bytes, progress):
                    mode = "plain"
                    _tell(proc, "exit")
                else:
                    os.truncate(tmp_out, 0)  # whatever mkfs and debugfs left: start afresh
                    os.truncate(tmp_out, size_bytes)
                    _tell(proc, "fakeroot")
                    event = _next_event(proc.stdout, progress, other)
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            if event is not None and event["event"] == "error":
                proc.wait()
                raise _rebuild_error(event)
            for line in proc.stdout:  # (nothing more is expected)
                if len(other) < 50:
                    other.append(line)
            rc = proc.wait()
            log.seek(0)
            stderr = log.read()[-4000:]
        if event is None or event["event"] == "error" or rc != 0:
            detail = (stderr + "".join(other)).strip()[-2000:] or "no output"
            raise SetupError(
                f"the image build helper (fakeroot + python) failed with exit status {rc}: "
                f"{detail}",
                hint="Check that `fakeroot id -u` prints 0; " + _TOOLS_HINT,
            )
        result = event
        _check_owner(tmp_out, result["probe"])
        try:
            os.chmod(tmp_out, 0o444)
            os.replace(tmp_out, out)
        except OSError as e:
            raise _storage_error(out, "cannot write", e) from e
        tmp_out = None
        st = out.stat()
        info = BaseDiskInfo(
            path=out,
            size=st.st_size,
            allocated=st.st_blocks * 512,
            file_count=int(result["file_count"]),
            bytes_applied=int(result["bytes_applied"]),
            diff_ids=tuple(result["diff_ids"]),
            elapsed=time.monotonic() - t0,
            tree_on_tmpfs=on_tmpfs,
            warnings=tuple(result.get("warnings", ())),
            mkfs_mode=mode,
        )
        progress(
            f"base disk ready: {info.file_count} entries, {info.allocated >> 20} MiB allocated, "
            f"{info.elapsed:.1f} s"
        )
        return info
    finally:
        if proc is not None:
            if proc.poll() is None:
                _stop(proc)
            if proc.stdout is not None:
                proc.stdout.close()
            if proc.stdin is not None and not proc.stdin.closed:
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.close()
        if workdir is not None:
            _rmtree(workdir)
        if tmp_out is not None:
            tmp_out.unlink(missing_ok=True)


def _tell(proc: subprocess.Popen[str], line: str) -> None:
    """One line to the worker (which may have died already: its events say why)."""
    assert proc.stdin is not None
    try:
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
    except BrokenPipeError:
        pass


def _next_event(
    stdout: IO[str], progress: Callable[[str], None], other: list[str]
) -> dict[str, Any] | None:
    """Pass progress events on until the worker's next ``tree``, ``done`` or ``error`` event
    (None: it ended without one). Lines that are not events are kept in ``other``."""
    while True:
        line = stdout.readline()
        if not line:
            return None
        try:
            event = json.loads(line)
            kind = event["event"]
        except (ValueError, KeyError, TypeError):
            if len(other) < 50:
                other.append(line)
            continue
        if kind == "progress":
            progress(str(event.get("message", "")))
        elif kind in ("tree", "done", "error"):
            return dict(event)


# --- mkfs.ext4 outside fakeroot + debugfs fix-up ----------------------------------------------
class _Unexpressible(Exception):
    """The fix-up cannot be written as a debugfs script (the message says why)."""


def _dq(arg: bytes) -> bytes:
    """``arg`` as one argument of a debugfs command: debugfs's parser (libss ``ss_parse``) takes
    ``"..."`` with ``""`` for a quote, splitting only on blanks outside quotes; ``debugfs -f``
    ends a line at the first newline or carriage return, so those cannot be written at all."""
    if b"\n" in arg or b"\r" in arg:
        raise _Unexpressible(f"the name {arg!r} holds a newline or carriage return")
    return b'"' + arg.replace(b'"', b'""') + b'"'


def _dname(name: bytes) -> bytes:
    """A name in debugfs's current directory, for commands that look it up: ``<N>`` would be
    read as inode N, and ``-x`` as an option by the commands that use getopt."""
    return _dq(b"./" + name if name[:1] in (b"-", b"<") else name)


class _FixupPlan:
    """Compares the real tree (what ``mkfs.ext4 -d`` outside fakeroot records) with what the image
    wants (the worker's :class:`~hutch.images.layers.TreeMeta`) and writes the debugfs commands
    for the differences:

    * ``set_inode_field NAME mode|uid|gid N``: the real files belong to the calling user and
      keep the owner's rw (fakeroot's chmod adds it on the real file);
    * ``ea_set -f VALUEFILE NAME XATTR``: every xattr (fakeroot keeps them all in ``faked``;
      debugfs stores ``system.posix_acl_*`` in ext4's own format, as mkfs does); ``ea_rm`` for
      xattrs the real file has and the image does not (an LSM's labels);
    * devices and fifos, which are empty regular files in reality: ``rm`` every name, ``mknod``
      the first, ``ln`` the others, then mode/owner/times/xattrs/link count;
    * the root: mkfs gives it 0755 root:root whatever the tree says.

    Commands are grouped by directory (``cd DIR`` then relative names, 3× faster than full
    paths: debugfs resolves every path from its root, scanning each directory). Hard links are
    fixed once, through their first name. Raises :class:`_Unexpressible`.
    """

    def __init__(self, tree: Path, wanted: Mapping[str, Wanted], values: Path) -> None:
        self.tree = os.fsencode(tree)
        self.wanted = wanted
        self.values_dir = values
        self.values: dict[bytes, bytes] = {}  # xattr value -> its quoted file name
        self.lines: list[bytes] = []
        self.commands = 0
        self.scans = 0  # directory entries debugfs will scan looking names up (estimate)
        self.entries = 0
        self.specials = 0

    def value_file(self, value: bytes) -> bytes:
        quoted = self.values.get(value)
        if quoted is None:
            if not self.values:
                self.values_dir.mkdir()
            path = self.values_dir / str(len(self.values))
            path.write_bytes(value)
            quoted = self.values[value] = _dq(os.fsencode(path))
        return quoted

    def fixes(
        self,
        name: bytes,
        real: tuple[int, int, int],
        real_xattrs: Sequence[str],
        want: Wanted,
    ) -> list[bytes]:
        """Commands turning the inode ``name`` (in the current directory, unquoted) with ``real``
        (mode, uid, gid) and xattrs into ``want``."""
        mode, uid, gid, _rdev, xattrs = want
        if real == (mode, uid, gid) and not xattrs and not real_xattrs:
            return []  # (most entries, as root: skip quoting the name)
        name = _dname(name)
        out = []
        if real[0] != mode:
            out.append(b"sif %s mode 0%o" % (name, mode))
        if real[1] != uid:
            out.append(b"sif %s uid %d" % (name, uid))
        if real[2] != gid:
            out.append(b"sif %s gid %d" % (name, gid))
        names = {n for n, _ in xattrs}
        for n in real_xattrs:
            if n not in names:
                out.append(b"ea_rm %s %s" % (name, _dq(os.fsencode(n))))
        for n, value in xattrs:
            out.append(b"ea_set -f %s %s %s" % (self.value_file(value), name, _dq(os.fsencode(n))))
        return out

    def add(self, directory: bytes, commands: list[bytes], dir_size: int) -> None:
        if commands:
            self.lines.append(b"cd " + _dq(b"/" + directory))
            self.lines += commands
            self.commands += len(commands)
            self.scans += len(commands) * dir_size

    def plan(self) -> None:
        want = self.wanted.get("")
        if want is None:
            raise _Unexpressible("the tree's root has no record")
        # mke2fs -d copies the root's xattrs, not its mode and owner (root_owner=0:0, 0755).
        root_xattrs = os.listxattr(self.tree)
        self.lines += self.fixes(b"/", (-1, -1, -1), root_xattrs, want)  # always set
        #: device/fifo inode -> (want, real stat, real xattrs, [(dir, name)...])
        specials: dict[int, tuple[Wanted, os.stat_result, list[str], list[tuple[bytes, bytes]]]]
        specials = {}
        linked: dict[int, Wanted] = {}  # hard-linked inodes seen (fixed through their first name)
        stack = [b""]
        while stack:
            rel = stack.pop()
            commands: list[bytes] = []
            size = 0
            with os.scandir(self.tree + b"/" + rel if rel else self.tree) as it:
                for entry in it:
                    size += 1
                    st = entry.stat(follow_symlinks=False)
                    path = rel + b"/" + entry.name if rel else entry.name
                    key = os.fsdecode(path)
                    want = self.wanted.get(key)
                    if want is None:
                        raise _Unexpressible(f"/{key!r} has no record")
                    real_type = stat.S_IFMT(st.st_mode)
                    want_type = stat.S_IFMT(want[0])
                    if real_type == stat.S_IFDIR:
                        stack.append(path)
                        if st.st_mode & 0o500 != 0o500:
                            raise _Unexpressible(f"/{key!r} cannot be listed by its owner")
                    elif real_type == stat.S_IFREG and not st.st_mode & 0o400:
                        raise _Unexpressible(f"/{key!r} cannot be read by its owner")
                    if real_type not in (stat.S_IFDIR, stat.S_IFLNK) and st.st_nlink > 1:
                        first = linked.get(st.st_ino)
                        if first is not None:  # mke2fs -d links it to the first name's inode
                            if first != want:
                                raise _Unexpressible(f"the hard links of /{key!r} disagree")
                            if st.st_ino in specials:
                                specials[st.st_ino][3].append((rel, entry.name))
                            continue
                        linked[st.st_ino] = want
                    xattrs = os.listxattr(entry.path, follow_symlinks=False)
                    if real_type == want_type:
                        real = (st.st_mode, st.st_uid, st.st_gid)
                        commands += self.fixes(entry.name, real, xattrs, want)
                    elif want_type in _SPECIAL and real_type == stat.S_IFREG and not st.st_size:
                        specials[st.st_ino] = (want, st, xattrs, [(rel, entry.name)])
                    else:
                        raise _Unexpressible(
                            f"/{key!r} is {stat.filemode(st.st_mode)[0]!r} in the tree "
                            f"but {stat.filemode(want[0])[0]!r} in the image"
                        )
            self.entries += size
            self.add(rel, commands, size)
        for want, st, xattrs, names in specials.values():
            self.special(want, st, xattrs, names)
        for line in self.lines:
            if len(line) >= _DEBUGFS_LINE_MAX:
                raise _Unexpressible(f"a debugfs command would be {len(line)} bytes long")

    def special(
        self,
        want: Wanted,
        st: os.stat_result,
        real_xattrs: list[str],
        names: list[tuple[bytes, bytes]],
    ) -> None:
        """Replace the empty regular file mkfs made from a faked device or fifo by the real
        thing, as mke2fs -d in fakeroot would have: same mode, owner, times, xattrs, links."""
        mode, _uid, _gid, rdev, _xattrs = want
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFIFO:
            node = b"p"
        else:
            major, minor = os.major(rdev), os.minor(rdev)
            if major > 65535 or minor > 65535:  # debugfs's mknod refuses them
                raise _Unexpressible(f"device number {major}:{minor} is too large for debugfs")
            node = b"%s %d %d" % (b"c" if kind == stat.S_IFCHR else b"b", major, minor)
        self.specials += 1
        for i, (rel, name) in enumerate(names):
            commands = [b"ea_rm %s %s" % (_dname(name), _dq(os.fsencode(n))) for n in real_xattrs]
            self.add(rel, [*(commands if i == 0 else []), b"rm " + _dname(name)], 1)
        rel0, name0 = names[0]
        first = _dname(name0)
        commands = [b"mknod %s %s" % (_dq(name0), node)]  # (mknod takes the name as is)
        commands += self.fixes(name0, (kind, 0, 0), [], want)
        for field, ns in (("atime", st.st_atime_ns), ("mtime", st.st_mtime_ns)):
            # As mke2fs -d: the seconds of the real file's times (ctime: when it was made).
            commands.append(
                b"sif %s %s_lo %d" % (first, field.encode(), (ns // 10**9) & 0xFFFFFFFF)
            )
        commands.append(b"sif %s ctime_lo %d" % (first, (st.st_ctime_ns // 10**9) & 0xFFFFFFFF))
        self.add(rel0, commands, 1)
        target = _dq(b"/" + (rel0 + b"/" + name0 if rel0 else name0))
        for rel, name in names[1:]:
            self.add(rel, [b"ln %s %s" % (target, _dname(name))], 1)
        if len(names) > 1:
            self.add(rel0, [b"sif %s links_count %d" % (first, len(names))], 1)


_SPECIAL = (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO)
_META_FILE = "meta.pickle"  # in the build's private workdir
_DEBUGFS_BANNER = re.compile(rb"debugfs \d+\.\d+\S* \(.*\)")
_DEBUGFS_QUIET = re.compile(rb"(debugfs: .*|Allocated inode: \d+|)")


def _run_debugfs_script(image: Path, script: Path) -> str | None:
    """Run a debugfs script on ``image``; None when every command went through, else what went
    wrong. (debugfs exits 0 whatever its commands do: the commands used print nothing on
    success, so anything but the echo of the commands is a failure.)"""
    out, err = script.with_suffix(".out"), script.with_suffix(".err")
    with open(out, "wb") as stdout, open(err, "wb") as stderr:  # (a pipe is slower)
        proc = subprocess.run(
            ["debugfs", "-w", "-f", str(script), str(image)],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            check=False,
        )
    bad = [ln for ln in out.read_bytes().splitlines() if not _DEBUGFS_QUIET.fullmatch(ln)]
    bad += [ln for ln in err.read_bytes().splitlines() if ln and not _DEBUGFS_BANNER.fullmatch(ln)]
    if proc.returncode == 0 and not bad:
        return None
    detail = b"; ".join(bad[:3]).decode("utf-8", "replace")
    return f"exit status {proc.returncode}: {detail}"


def _build_plain(
    tree: Path,
    image: Path,
    workdir: Path,
    event: Mapping[str, Any],
    size_bytes: int,
    progress: Callable[[str], None],
) -> bool:
    """mkfs.ext4 as the calling user, then the debugfs fix-up (planned while mkfs runs). False
    when that cannot be done (the caller falls back to mkfs in the fakeroot session); mkfs
    running out of space raises StorageError."""
    entries = int(event["file_count"])
    progress(f"mkfs.ext4: {entries} entries into a {size_bytes >> 20} MiB disk")
    t0 = time.monotonic()
    mkfs = start_mkfs(MKFS_OPTIONS, size_bytes, str(tree), str(image), entries)
    try:
        with open(workdir / _META_FILE, "rb") as f:
            wanted: dict[str, Wanted] = pickle.load(f)  # our worker's, in our private dir
        values = workdir / "xattr-values"
        plan = _FixupPlan(tree, wanted, values)
        try:
            plan.plan()
        except _Unexpressible as e:
            progress(f"mkfs.ext4 runs under fakeroot instead: {e}")
            return False
        except OSError as e:  # (e.g. no room for the xattr values: the fallback will say)
            progress(f"mkfs.ext4 runs under fakeroot instead: planning failed: {e}")
            return False
        debugfs_cost = plan.commands * _DEBUGFS_PER_COMMAND + plan.scans * _DEBUGFS_PER_SCAN
        if debugfs_cost > plan.entries * _FAKEROOT_PER_ENTRY:
            progress(
                f"mkfs.ext4 runs under fakeroot instead: the {plan.commands} metadata fix-ups "
                f"would take ~{debugfs_cost:.0f} s with debugfs (huge directories)"
            )
            return False
        script = workdir / "fixup.debugfs"
        try:
            script.write_bytes(b"".join(line + b"\n" for line in plan.lines))
        except OSError as e:
            progress(f"mkfs.ext4 runs under fakeroot instead: cannot write {script}: {e}")
            return False
        t_plan = time.monotonic() - t0
        try:
            wait_mkfs(mkfs, size_bytes, str(image), entries, int(event["bytes_applied"]))
        except ImageError as e:  # not a lack of space: maybe something only fakeroot allows
            progress(f"mkfs.ext4 failed outside fakeroot ({e.message}); retrying under fakeroot")
            return False
    finally:
        if mkfs.poll() is None:  # an error, an interrupt, or no use for it
            mkfs.kill()
            mkfs.communicate()
    t_mkfs = time.monotonic() - t0
    t0 = time.monotonic()
    failure = _run_debugfs_script(image, script)
    if failure is not None:
        progress(f"the debugfs fix-up failed ({failure}); rebuilding under fakeroot")
        return False
    progress(
        f"mkfs.ext4 done ({t_mkfs:.1f} s); {plan.commands} metadata fix-ups "
        f"({plan.specials} device nodes/fifos, planned in {t_plan:.2f} s meanwhile) "
        f"with debugfs ({time.monotonic() - t0:.2f} s)"
    )
    return True


def _rebuild_error(event: Mapping[str, Any]) -> HutchError:
    cls = getattr(errors, str(event.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, HutchError)) or cls is errors.ExecutionError:
        cls = InternalError
    hint = event.get("hint")
    return cls(str(event.get("message", "image build failed")), hint=hint or None)


def _stop(proc: subprocess.Popen[str]) -> None:
    """Interrupt the worker's whole session (fakeroot's trap then stops faked), then kill."""
    for sig, wait in ((signal.SIGINT, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _check_owner(image: Path, probe: Sequence[Any]) -> None:
    """Guard against a fakeroot that silently did nothing: read one owner back with debugfs and
    compare it with what the worker saw inside the session."""
    path, uid, gid = str(probe[0]), int(probe[1]), int(probe[2])
    proc = subprocess.run(
        ["debugfs", "-R", f"stat {path}", str(image)], capture_output=True, text=True, check=False
    )
    fields = proc.stdout.split()
    try:
        got = (int(fields[fields.index("User:") + 1]), int(fields[fields.index("Group:") + 1]))
    except (ValueError, IndexError) as e:
        raise SetupError(f"cannot read {path} back from {image}: {proc.stderr.strip()}") from e
    if got != (uid, gid):
        raise SetupError(
            f"{path} in {image} is owned by {got[0]}:{got[1]}, expected {uid}:{gid}",
            hint="fakeroot did not take effect for mkfs.ext4; check that `fakeroot id -u` prints 0.",
        )
