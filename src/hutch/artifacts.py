"""Content-keyed, atomic build outputs under ``HOME/artifacts``.

An artifact is a folder named ``<name>-<key>`` where *key* is a hash of everything that went into
it. It is built in a temporary folder beside its final place and renamed into place only when the
build succeeded, so a half-built artifact never appears under its key. A file lock serialises
concurrent builders of the same artifact (two ``hutch setup`` at once build once).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from hutch.paths import HutchPaths

ProgressFn = Callable[[str], None]


def _no_progress(_: str) -> None:
    pass


def hash_inputs(parts: Iterable[bytes | str | Path]) -> str:
    """sha256 over an ordered list of inputs: bytes, strings, or files (by content)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            h.update(b"file:" + part.name.encode() + b"\0")
            with part.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        elif isinstance(part, str):
            h.update(b"str:" + part.encode() + b"\0")
        else:
            h.update(b"bytes:" + part + b"\0")
        h.update(b"\x1e")
    return h.hexdigest()


def artifact_path(paths: HutchPaths, name: str, key: str) -> Path:
    return paths.artifacts / f"{name}-{key[:16]}"


def is_built(paths: HutchPaths, name: str, key: str) -> bool:
    return (artifact_path(paths, name, key) / ".complete").is_file()


def build_cached(
    paths: HutchPaths,
    name: str,
    key: str,
    build: Callable[[Path], None],
) -> Path:
    """Return the artifact folder for (name, key), running ``build(tmpdir)`` first if needed."""
    final = artifact_path(paths, name, key)
    if (final / ".complete").is_file():
        return final
    paths.artifacts.mkdir(parents=True, exist_ok=True)
    lock_path = paths.artifacts / f".{name}.lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / ".complete").is_file():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=paths.artifacts))
        try:
            build(tmp)
            (tmp / ".complete").write_text(key + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final
