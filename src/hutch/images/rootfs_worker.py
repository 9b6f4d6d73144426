"""The half of :func:`hutch.images.rootfs.build_base_disk` that runs inside ``fakeroot``.

``fakeroot -- python -m hutch.images.rootfs_worker`` reads one JSON job (one line) on stdin,
applies the layers into the job's tree and adds extra files and boot directories, recording
what the image wants for every path (:class:`hutch.images.layers.TreeMeta`). Then:

* job ``"plain": true``: it pickles that record to ``job["meta"]``, answers a ``tree`` event and
  waits for one more line on stdin: ``exit`` (the caller ran ``mkfs.ext4`` itself, outside
  fakeroot, and corrected the metadata with debugfs) or ``fakeroot`` (the caller could not:
  continue as below, in this still-open session);
* otherwise, or after ``fakeroot``: it runs ``mkfs.ext4 -d`` as a child process, so mke2fs shares
  this session and records the faked owners, modes, device nodes and xattrs (3–4 times slower:
  every stat and getxattr of mke2fs is a round trip to ``faked``), and answers ``done``.

Output: JSON lines on stdout (``progress`` events, then ``tree``/``done`` or ``error``); nothing
else is written to stdout. Not a public interface.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import pickle
import stat
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hutch.errors import HutchError, ImageError, SetupError, StorageError
from hutch.images.layers import (
    LayerBudget,
    LayerLimits,
    TreeMeta,
    apply_layer,
    ensure_dirs,
    free_space_note,
    write_file,
)

_MIB = 1 << 20
#: mke2fs's default bytes-per-inode for the sizes we make (mke2fs.conf "default" type).
_INODE_RATIO = 16384


def _emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _progress(message: str) -> None:
    _emit(event="progress", message=message)


def _short(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    return f"{algo}:{hexpart[:12]}" if hexpart else digest


def _count_entries(tree: str, meta: TreeMeta | None = None) -> int:
    """Entries below the root, from directory listings only (no per-file stat).

    With ``meta``: also make sure ``mkfs.ext4``, run as the calling user outside fakeroot, can
    read every file and list every directory whose wanted mode would deny the owner that
    (fakeroot's chmod keeps u+rw / u+rwx on the real file: redoing the chmod costs one round
    trip, for these rare entries only, and changes nothing the session reports)."""
    count = 0
    stack = [(tree, "")]
    wanted = meta.entries if meta is not None else None
    while stack:
        path, rel = stack.pop()
        with os.scandir(path) as it:
            for entry in it:
                count += 1
                is_dir = entry.is_dir(follow_symlinks=False)
                key = f"{rel}/{entry.name}" if rel else entry.name
                if is_dir:
                    stack.append((entry.path, key))
                if wanted is None or entry.is_symlink():
                    continue
                want = wanted.get(key)
                need = stat.S_IRUSR | stat.S_IXUSR if is_dir else stat.S_IRUSR
                if want is not None and want[0] & need != need:
                    os.chmod(entry.path, stat.S_IMODE(want[0]))  # not a symlink: see above
    return count


def start_mkfs(
    options: Sequence[str], size: int, tree: str, out: str, entries: int
) -> subprocess.Popen[str]:
    """Start ``mkfs.ext4 -d tree out`` (with more inodes than the default when needed)."""
    options = list(options)
    if entries * 5 // 4 + 1024 > size // _INODE_RATIO:  # more files than default inodes
        options += ["-N", str(entries * 3 // 2 + 4096)]
    return subprocess.Popen(
        ["mkfs.ext4", *options, "-d", tree, out],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_mkfs(proc: subprocess.Popen[str], size: int, out: str, entries: int, applied: int) -> None:
    """Wait for :func:`start_mkfs`'s mkfs; failures become StorageError / ImageError."""
    output, _ = proc.communicate()
    if proc.returncode == 0:
        return
    text = output.strip()
    tail = text[-1500:] or f"exit status {proc.returncode}"
    if any(s in text for s in ("allocate", "No space left", "too small", "too big for filesystem")):
        out_dir = os.path.dirname(out)
        free = os.statvfs(out_dir)
        if free.f_bavail * free.f_frsize < 64 * _MIB:
            raise StorageError(
                f"writing the base disk {out} failed: no space left{free_space_note(out_dir)}",
                hint="Free disk space (e.g. `hutch prune`) or point HUTCH_HOME at a bigger disk.",
            )
        raise StorageError(
            f"the image ({entries} entries, {applied >> 20} MiB of layers) does not fit in a "
            f"{size >> 20} MiB base disk: {tail}",
            hint="Raise [images] base_size in the hutch config, or use a smaller image.",
        )
    raise ImageError(
        f"mkfs.ext4 could not build the base disk from the image tree: {tail}",
        hint="The image holds something ext4 cannot store; check the image, or report this.",
    )


def _fix_root(tree: str, out: str) -> None:
    """mke2fs 1.47.0 ``-d`` copies everything but the root directory's own mode and owner
    (``root_owner=0:0`` sets the owner): apply the image's with debugfs when they differ."""
    st = os.lstat(tree)
    mode = stat.S_IMODE(st.st_mode)
    fields = []
    if mode != 0o755:
        fields.append(("mode", f"0{stat.S_IFDIR | mode:o}"))
    if st.st_uid:
        fields.append(("uid", str(st.st_uid)))
    if st.st_gid:
        fields.append(("gid", str(st.st_gid)))
    for name, value in fields:
        proc = subprocess.run(
            ["debugfs", "-w", "-R", f"set_inode_field / {name} {value}", out],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0 or "set_inode_field:" in proc.stderr:
            raise ImageError(f"cannot set the root directory's {name}: {proc.stderr.strip()}")


def run(
    job: dict[str, Any], progress: Callable[[str], None], decide: Callable[[dict[str, Any]], str]
) -> dict[str, Any] | None:
    """Do the job; return the ``done`` event's fields, or None when ``decide`` (given the
    ``tree`` event's fields, in plain mode) answered that the caller builds the disk."""
    if os.geteuid() != 0:
        raise SetupError(
            f"fakeroot did not take effect (effective uid {os.geteuid()} inside the session)",
            hint="Check that `fakeroot id -u` prints 0; apt-get install fakeroot",
        )
    tree = str(job["tree"])
    out = str(job["out"])
    os.chown(tree, 0, 0)
    os.chmod(tree, 0o755)
    plain = bool(job.get("plain"))
    meta = TreeMeta() if plain else None
    if meta is not None:
        meta.entries[""] = (stat.S_IFDIR | 0o755, 0, 0, 0, ())
    limits = LayerLimits(**job["limits"])
    budget = LayerBudget()
    layers = job["layers"]
    diff_ids: list[str] = []
    for i, layer in enumerate(layers, 1):
        t0 = time.monotonic()
        bytes_before, entries_before = budget.bytes_used, budget.entries_used
        digest = str(layer["digest"])
        label = f"layer {i}/{len(layers)} {_short(digest)}"

        def report(n: int, label: str = label) -> None:
            progress(f"{label}: {n >> 20} MiB unpacked")

        diff_ids.append(
            apply_layer(
                Path(layer["path"]),
                str(layer["media_type"]),
                Path(tree),
                expect_diff_id=layer.get("diff_id"),
                limits=limits,
                budget=budget,
                name=digest,
                progress=report,
                meta=meta,
            )
        )
        progress(
            f"{label} applied ({(budget.bytes_used - bytes_before) / _MIB:.0f} MiB, "
            f"{budget.entries_used - entries_before} entries, {time.monotonic() - t0:.1f} s)"
        )
    for extra in job.get("extra_files", []):
        write_file(
            Path(tree),
            str(extra["path"]),
            base64.b64decode(extra["data"]),
            mode=int(extra["mode"]),
            meta=meta,
        )
    made = ensure_dirs(Path(tree), tuple((str(n), int(m)) for n, m in job["boot_dirs"]), meta)
    if made:
        progress(f"added missing boot directories: {' '.join('/' + m for m in made)}")
    entries = _count_entries(tree, meta)
    probe_name = str(job["boot_dirs"][0][0])
    st = os.lstat(os.path.join(tree, probe_name))  # the faked owner, to check the disk against
    if budget.warning_count:
        progress(f"{budget.warning_count} attribute(s) skipped, e.g. {budget.warnings[0]}")
    warnings = list(budget.warnings)
    if budget.warning_count > len(warnings):
        warnings.append(f"... and {budget.warning_count - len(warnings)} more")
    result = {
        "diff_ids": diff_ids,
        "bytes_applied": budget.bytes_used,
        "entries_applied": budget.entries_used,
        "file_count": entries,
        "warnings": warnings,
        "probe": [f"/{probe_name}", st.st_uid, st.st_gid],
    }
    if meta is not None:
        with open(str(job["meta"]), "wb") as f:
            pickle.dump(meta.entries, f, protocol=pickle.HIGHEST_PROTOCOL)
        if decide(result) != "fakeroot":
            return None
    size = int(job["size_bytes"])
    progress(f"mkfs.ext4 (under fakeroot): {entries} entries into a {size >> 20} MiB disk")
    t0 = time.monotonic()
    mkfs = start_mkfs(job["mkfs_options"], size, tree, out, entries)
    wait_mkfs(mkfs, size, out, entries, budget.bytes_used)
    _fix_root(tree, out)
    progress(f"mkfs.ext4 done ({time.monotonic() - t0:.1f} s)")
    return result


def _decide(result: dict[str, Any]) -> str:
    """Hand the applied tree to the caller; wait for what to do next (EOF: nothing)."""
    _emit(event="tree", **result)
    return sys.stdin.readline().strip() or "exit"


def main() -> int:
    try:
        job = json.loads(sys.stdin.readline())
        result = run(job, _progress, _decide)
    except HutchError as e:
        _emit(event="error", type=type(e).__name__, message=e.message, hint=e.hint)
        return 1
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            traceback.print_exc()
        where = e.filename or "the image tree"
        _emit(
            event="error",
            type="StorageError",
            message=f"building the base disk failed at {where}: {e.strerror or e}"
            + free_space_note(str(where)),
            hint="Free space there (or use a bigger scratch folder) and retry.",
        )
        return 1
    except KeyboardInterrupt:
        _emit(event="error", type="InternalError", message="interrupted", hint="")
        return 130
    except Exception as e:
        traceback.print_exc()
        _emit(
            event="error",
            type="InternalError",
            message=f"image build helper crashed: {type(e).__name__}: {e}",
            hint="This is a bug in hutch; the traceback is on the helper's stderr.",
        )
        return 1
    if result is not None:
        _emit(event="done", **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
