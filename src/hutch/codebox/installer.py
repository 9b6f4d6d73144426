"""The wheel installer of :meth:`hutch.CodeBox.install`. **This file runs inside the guest.**

The host does not import it to install anything: it sends this module's *source* to the guest as
``python3 -c SOURCE PATHS_JSON`` (see :func:`hutch.codebox.wheels.installer_source`) and streams a
tar of ``.whl`` files (downloaded by the host's pip) on the process's stdin. The guest has no
network and no pip; this script is all the installing there is. It therefore uses the standard
library only and stays runnable by older guest Pythons (3.8+: annotations are never evaluated, no
``match``, no ``str.removeprefix``).

``PATHS_JSON`` names the install folders (``purelib``, ``scripts``, ``data``, ``include``) and the
``executable`` scripts run under; whatever it leaves out comes from the guest's ``sysconfig``.

Everything is checked before anything is written — every wheel of the batch, so a hostile wheel
leaves nothing behind:

* tar members must be regular ``*.whl`` files with simple names;
* wheel member names must be relative, without ``..``, backslashes or NUL, and land inside their
  target folder (also through symbolic links that already exist in the guest);
* a wheel must have one ``*.dist-info`` folder with ``METADATA`` and ``WHEEL`` (``Wheel-Version``
  1.x), and every file ``RECORD`` lists with a hash must match it.

Then, per wheel: an earlier installation of the same distribution (found through its ``RECORD``)
is removed; files are written atomically into ``purelib``; ``<dist>.data/{purelib,platlib}`` go to
``purelib``, ``scripts`` to the scripts folder (``#!python`` shebangs rewritten to the guest's
interpreter, mode 755), ``headers`` and ``data`` to theirs; ``console_scripts`` and ``gui_scripts``
of ``entry_points.txt`` get small wrapper scripts; ``INSTALLER`` says ``hutch`` and ``RECORD`` is
rewritten to list what was installed. The last line of stdout is JSON,
``{"installed": ["name", ...]}``. A refusal exits 1 with the reason on stderr.
"""

from __future__ import annotations

import base64
import configparser
import csv
import hashlib
import io
import json
import os
import re
import shutil
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from typing import IO

INSTALLER_NAME = "hutch"
PATH_KEYS = ("purelib", "scripts", "data", "include")
#: Tar member names (wheel file names) the installer accepts.
WHEEL_FILE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+!-]*\.whl")
SCRIPT_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
ENTRY_POINT_RE = re.compile(r"([\w.]+)\s*:\s*([\w.]+)\s*(\[[^\]]*\])?")
#: dist-info files the installer writes itself (whatever the wheel has is not copied).
REWRITTEN = ("RECORD", "RECORD.jws", "RECORD.p7s", "INSTALLER")
CHUNK = 1 << 20


class InstallError(Exception):
    """A wheel was refused or could not be installed (the message says which and why)."""


def safe_relpath(name: str) -> str:
    """``name`` (a zip member) as a clean relative path, or :class:`InstallError`."""
    if not name or "\0" in name or "\\" in name:
        raise InstallError(f"member {name!r} has an invalid name")
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        raise InstallError(f"member {name!r} is an absolute path")
    parts = name.split("/")
    if ".." in parts:
        raise InstallError(f"member {name!r} escapes its folder ('..')")
    return "/".join(p for p in parts if p not in ("", "."))


def inside(root: str, rel: str) -> str:
    """The absolute path of ``rel`` under ``root``; refuses anything that would end up elsewhere,
    including through symbolic links that already exist under ``root``."""
    real_root = os.path.realpath(root)
    dest = os.path.normpath(os.path.join(real_root, rel))
    parent = os.path.realpath(os.path.dirname(dest))
    for p in (dest, parent):
        if os.path.commonpath([real_root, p]) != real_root:
            raise InstallError(f"{rel!r} would be written outside {root}")
    if dest == real_root:
        raise InstallError(f"{rel!r} names the folder {root} itself")
    return os.path.join(parent, os.path.basename(dest))


def normalize_name(name: str) -> str:
    """PEP 503 normalization (``Foo_Bar`` and ``foo-bar`` are one distribution)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_headers(text: str) -> dict[str, str]:
    """The ``Key: value`` header block of METADATA or WHEEL (the first value of each key).

    Hand-written: importing ``email.parser`` costs more than the rest of the installer under
    emulation."""
    headers: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if not line.strip():
            break
        if line[0] in " \t":
            if key and key in headers:
                headers[key] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        key = name.strip() if sep else ""
        if key and key not in headers:
            headers[key] = value.strip()
        elif key:
            key = ""  # a repeated key: keep the first value, skip its continuation lines
    return headers


def encode_digest(algo: str, digest: bytes) -> str:
    return algo + "=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def rewrite_shebang(data: bytes, executable: str) -> bytes:
    """``#!python`` (and ``#!pythonw``), with any arguments, become ``#!<executable>``."""
    if not data.startswith(b"#!python"):
        return data
    first, nl, rest = data.partition(b"\n")
    interp = first[2:].split(None, 1)
    args = b" " + interp[1].strip() if len(interp) > 1 else b""
    return b"#!" + executable.encode() + args + nl + rest


def console_script(module: str, attr: str, executable: str) -> bytes:
    """The wrapper script of the entry point ``module:attr``."""
    head = attr.split(".")[0]
    return (
        f"#!{executable}\n"
        f"# generated by the {INSTALLER_NAME} wheel installer\n"
        "import sys\n"
        f"from {module} import {head}\n"
        "\n"
        "if __name__ == '__main__':\n"
        f"    sys.exit({attr}())\n"
    ).encode()


def parse_entry_points(text: str) -> list[tuple[str, str, str]]:
    """``[(script name, module, attribute)]`` of ``console_scripts`` and ``gui_scripts``."""
    parser = configparser.ConfigParser(delimiters=("=",), interpolation=None)
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    try:
        parser.read_string(text)
    except configparser.Error as e:
        raise InstallError(f"entry_points.txt is invalid: {e}") from None
    out: list[tuple[str, str, str]] = []
    for section in ("console_scripts", "gui_scripts"):
        if not parser.has_section(section):
            continue
        for raw_name, value in parser.items(section):
            name = raw_name.strip()
            if not SCRIPT_NAME_RE.fullmatch(name) or ".." in name:
                raise InstallError(f"entry point name {name!r} is not a valid script name")
            m = ENTRY_POINT_RE.fullmatch(value.strip())
            if m is None or not all(
                p.isidentifier() for p in m.group(1).split(".") + m.group(2).split(".")
            ):
                raise InstallError(f"entry point {name} = {value!r} is not 'module:attr'")
            out.append((name, m.group(1), m.group(2)))
    return out


class Planned:
    """One file to write: where, with which mode, and its bytes (``data``) or zip ``member``."""

    def __init__(
        self, dest: str, mode: int, *, member: zipfile.ZipInfo | None = None, data: bytes = b""
    ) -> None:
        self.dest = dest
        self.mode = mode
        self.member = member
        self.data = data


def member_hash(zf: zipfile.ZipFile, info: zipfile.ZipInfo, algo: str) -> str:
    h = hashlib.new(algo)
    with zf.open(info) as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return encode_digest(algo, h.digest())


class Wheel:
    """A wheel, read and checked: :attr:`files` is what installing it writes. Nothing is written
    until :func:`install`, and file contents stay in the zip until then."""

    def __init__(self, path: str, paths: dict[str, str], executable: str) -> None:
        self.path = path
        self.filename = os.path.basename(path)
        self.paths = paths
        try:
            with zipfile.ZipFile(path) as zf:
                self._read(zf, executable)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as e:
            raise InstallError(f"it is not a readable wheel: {e}") from None

    def _read(self, zf: zipfile.ZipFile, executable: str) -> None:
        members: dict[str, zipfile.ZipInfo] = {}
        for info in zf.infolist():
            rel = safe_relpath(info.filename)
            if rel and not info.is_dir():
                members[rel] = info
        tops = {rel.split("/")[0] for rel in members}
        dist_infos = [
            t
            for t in sorted(tops)
            if t.endswith(".dist-info") and f"{t}/METADATA" in members and f"{t}/WHEEL" in members
        ]
        if len(dist_infos) != 1:
            raise InstallError("it needs exactly one *.dist-info folder with METADATA and WHEEL")
        dist_info = self.dist_info = dist_infos[0]
        data_dir = dist_info[: -len(".dist-info")] + ".data"

        def text(rel: str) -> str:
            return zf.read(members[rel]).decode("utf-8", "replace")

        meta = parse_headers(text(f"{dist_info}/METADATA"))
        self.name = meta.get("Name", "")
        self.version = meta.get("Version", "")
        if not self.name:
            raise InstallError("its METADATA has no Name")
        wheel_version = parse_headers(text(f"{dist_info}/WHEEL")).get("Wheel-Version", "")
        if not wheel_version.startswith("1."):
            raise InstallError(f"Wheel-Version {wheel_version!r} is not supported (1.x)")
        hashes: dict[str, str] = {}
        if f"{dist_info}/RECORD" in members:
            for row in csv.reader(io.StringIO(text(f"{dist_info}/RECORD"))):
                if len(row) >= 2 and row[0] and row[1]:
                    hashes[safe_relpath(row[0])] = row[1]

        self.files: list[Planned] = []
        for rel, info in sorted(members.items()):
            expected = hashes.get(rel)
            if expected is not None:
                algo = expected.partition("=")[0]
                if algo not in hashlib.algorithms_guaranteed or algo in ("md5", "sha1"):
                    raise InstallError(f"RECORD uses the hash {algo!r} for {rel}")
                if member_hash(zf, info, algo) != expected:
                    raise InstallError(f"{rel} does not match its hash in RECORD")
            top, _, sub = rel.partition("/")
            if top == dist_info and sub in REWRITTEN:
                continue
            mode = 0o755 if (info.external_attr >> 16) & 0o111 else 0o644
            root, sub = "purelib", rel
            script = False
            if top == data_dir:
                key, _, sub = rel[len(data_dir) + 1 :].partition("/")
                if not sub:
                    raise InstallError(f"member {rel!r} is not inside a {data_dir}/KEY/ folder")
                if key in ("purelib", "platlib"):
                    root = "purelib"
                elif key == "scripts":
                    if "/" in sub:
                        raise InstallError(f"script {rel!r} is in a subfolder")
                    root, mode, script = "scripts", 0o755, True
                elif key == "headers":
                    root, sub = "include", f"{self.name}/{sub}"
                elif key == "data":
                    root = "data"
                else:
                    raise InstallError(f"member {rel!r} is in the unknown data folder {key!r}")
            dest = inside(self.paths[root], sub)
            if script:
                data = rewrite_shebang(zf.read(info), executable)
                self.files.append(Planned(dest, mode, data=data))
            else:
                self.files.append(Planned(dest, mode, member=info))

        entry_points = f"{dist_info}/entry_points.txt"
        if entry_points in members:
            for name, module, attr in parse_entry_points(text(entry_points)):
                data = console_script(module, attr, executable)
                self.files.append(Planned(inside(self.paths["scripts"], name), 0o755, data=data))
        installer = inside(self.paths["purelib"], f"{dist_info}/INSTALLER")
        self.files.append(Planned(installer, 0o644, data=f"{INSTALLER_NAME}\n".encode()))
        self.record = inside(self.paths["purelib"], f"{dist_info}/RECORD")


def write_atomic(dest: str, src: IO[bytes], mode: int) -> tuple[str, int]:
    """Write ``src`` to ``dest`` through a temporary file; return its RECORD hash and size."""
    folder = os.path.dirname(dest)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".hutch-")
    h, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in iter(lambda: src.read(CHUNK), b""):
                h.update(chunk)
                size += len(chunk)
                f.write(chunk)
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    return encode_digest("sha256", h.digest()), size


def prune_empty(folder: str, stop: str) -> None:
    """Remove ``folder`` and its parents (below ``stop``) while they are empty."""
    while folder.startswith(stop + os.sep) and os.path.isdir(folder):
        cache = os.path.join(folder, "__pycache__")
        if os.path.isdir(cache) and not os.listdir(cache):
            os.rmdir(cache)
        if os.listdir(folder):
            return
        os.rmdir(folder)
        folder = os.path.dirname(folder)


def remove_installed(name: str, paths: dict[str, str]) -> None:
    """Remove an installed distribution called ``name``: the files its RECORD lists that lie in
    the install folders, their bytecode, folders left empty, and its dist-info."""
    purelib = os.path.realpath(paths["purelib"])
    if not os.path.isdir(purelib):
        return
    roots = [os.path.realpath(paths[k]) for k in PATH_KEYS]
    wanted = normalize_name(name)
    for entry in sorted(os.listdir(purelib)):
        if not entry.endswith(".dist-info"):
            continue
        if normalize_name(entry[: -len(".dist-info")].rsplit("-", 1)[0]) != wanted:
            continue
        dist_info = os.path.join(purelib, entry)
        rows: list[list[str]] = []
        record = os.path.join(dist_info, "RECORD")
        if os.path.isfile(record):
            with open(record, newline="", encoding="utf-8", errors="replace") as f:
                rows = list(csv.reader(f))
        for row in rows:
            if not row or not row[0]:
                continue
            path = os.path.normpath(os.path.join(purelib, row[0]))
            if not any(os.path.commonpath([r, path]) == r and path != r for r in roots):
                continue  # RECORD is data: never delete outside the install folders
            if os.path.isfile(path) or os.path.islink(path):
                os.unlink(path)
            if path.endswith(".py"):
                cache = os.path.join(os.path.dirname(path), "__pycache__")
                stem = os.path.basename(path)[:-3] + "."
                if os.path.isdir(cache):
                    for c in os.listdir(cache):
                        if c.startswith(stem) and c.endswith(".pyc"):
                            os.unlink(os.path.join(cache, c))
            prune_empty(os.path.dirname(path), purelib)
        shutil.rmtree(dist_info, ignore_errors=True)


def install(wheel: Wheel) -> None:
    """Write a checked wheel (replacing an earlier installation of the same distribution)."""
    remove_installed(wheel.name, wheel.paths)
    purelib = os.path.realpath(wheel.paths["purelib"])
    rows: list[tuple[str, str, str]] = []
    with zipfile.ZipFile(wheel.path) as zf:
        for item in wheel.files:
            if item.member is not None:
                with zf.open(item.member) as src:
                    digest, size = write_atomic(item.dest, src, item.mode)
            else:
                digest, size = write_atomic(item.dest, io.BytesIO(item.data), item.mode)
            rows.append((os.path.relpath(item.dest, purelib), digest, str(size)))
    rows.append((os.path.relpath(wheel.record, purelib), "", ""))
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    write_atomic(wheel.record, io.BytesIO(out.getvalue().encode()), 0o644)


def receive(stream: IO[bytes], folder: str) -> list[str]:
    """Unpack the tar of wheels on ``stream`` into ``folder``; only regular ``*.whl`` files."""
    paths: list[str] = []
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile() or not WHEEL_FILE_RE.fullmatch(member.name):
                    raise InstallError(f"the wheel stream holds {member.name!r}, not a *.whl file")
                dest = os.path.join(folder, member.name)
                if os.path.lexists(dest):
                    raise InstallError(f"the wheel stream holds {member.name!r} twice")
                src = tar.extractfile(member)
                if src is None:
                    raise InstallError(f"cannot read {member.name!r} from the wheel stream")
                with open(dest, "wb") as f:
                    shutil.copyfileobj(src, f)
                paths.append(dest)
    except tarfile.TarError as e:
        raise InstallError(f"the wheel stream is not a valid tar: {e}") from None
    return paths


def default_paths() -> dict[str, str]:
    sc = sysconfig.get_paths()
    return {
        "purelib": sc["purelib"],
        "scripts": sc["scripts"],
        "data": sc["data"],
        "include": sc["include"],
        "executable": sys.executable,
    }


def main(argv: list[str], stdin: IO[bytes] | None = None) -> int:
    """Install the wheels of the tar on ``stdin``; ``argv[1]`` is the optional PATHS_JSON."""
    paths = default_paths()
    if len(argv) > 1:
        paths.update(json.loads(argv[1]))
    executable = paths.pop("executable", "") or sys.executable
    missing = [k for k in PATH_KEYS if not paths.get(k)]
    if missing:
        print(f"hutch-install: error: no install folder for {missing}", file=sys.stderr)
        return 2
    wheels: list[Wheel] = []
    try:
        with tempfile.TemporaryDirectory(prefix="hutch-wheels-") as tmp:
            files = receive(stdin or sys.stdin.buffer, tmp)
            if not files:
                raise InstallError("no wheels were received")
            for f in files:  # check every wheel before writing anything
                try:
                    wheels.append(Wheel(f, paths, executable))
                except InstallError as e:
                    raise InstallError(f"refusing {os.path.basename(f)}: {e}") from None
            for w in wheels:
                install(w)
                print(f"installed {w.name} {w.version}", file=sys.stderr)
    except (InstallError, OSError) as e:
        print(f"hutch-install: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"installed": [w.name for w in wheels]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
