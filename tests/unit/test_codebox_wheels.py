"""CodeBox.install without a VM: the host's pip command, tags and errors, and the guest-side
installer run on the host against temporary folders."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import hutch
import hutch.sync
from hutch.codebox import installer, wheels
from hutch.codebox.wheels import PythonTarget
from hutch.errors import BadRequestError, NetworkError, SetupError, TimeoutError

TARGET = PythonTarget(
    version="3.11",
    paths={
        "purelib": "/usr/local/lib/python3.11/dist-packages",
        "platlib": "/usr/local/lib/python3.11/dist-packages",
        "scripts": "/usr/local/bin",
        "data": "/usr/local",
        "include": "/usr/include/python3.11",
    },
)


def build_wheel(
    folder: Path,
    name: str,
    version: str = "1.0",
    files: dict[str, bytes] | None = None,
    *,
    entry_points: str | None = None,
    record: bool = True,
) -> Path:
    """A minimal pure-Python wheel: ``files`` (archive name → bytes) plus the dist-info."""
    dist_info = f"{name}-{version}.dist-info"
    members = dict(files or {})
    members[f"{dist_info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    )
    members[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: hutch-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    if entry_points is not None:
        members[f"{dist_info}/entry_points.txt"] = entry_points.encode()
    if record:
        lines = []
        for arc, data in members.items():
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            lines.append(f"{arc},sha256={digest.decode()},{len(data)}")
        lines.append(f"{dist_info}/RECORD,,")
        members[f"{dist_info}/RECORD"] = ("\n".join(lines) + "\n").encode()
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for arc, data in members.items():
            zf.writestr(arc, data)
    return path


def demo_wheel(folder: Path, version: str = "1.0", *, extra: bool = True) -> Path:
    """``hutchdemo``: a package, a console script and a ``.data/scripts`` script."""
    files = {
        "hutchdemo/__init__.py": f"VALUE = {version!r}\n\ndef main():\n"
        "    print('hello from hutchdemo', VALUE)\n".encode(),
        f"hutchdemo-{version}.data/scripts/hutchdemo-raw": b"#!python -u\n"
        b"import hutchdemo\nprint('raw', hutchdemo.VALUE)\n",
    }
    if extra:
        files["hutchdemo/extra.py"] = b"X = 1\n"
    return build_wheel(
        folder,
        "hutchdemo",
        version,
        files,
        entry_points="[console_scripts]\nhutchdemo-hello = hutchdemo:main\n",
    )


# --- host side: tags, pip command, errors ----------------------------------------------------
def test_platform_tags_cover_glibc_down_to_2_17_then_legacy_names() -> None:
    tags = wheels.platform_tags("x86_64", (2, 36))
    assert tags[0] == "manylinux_2_36_x86_64"
    assert "manylinux_2_17_x86_64" in tags and "manylinux_2_16_x86_64" not in tags
    assert tags[-4:] == [
        "manylinux2014_x86_64",
        "manylinux2010_x86_64",
        "manylinux1_x86_64",
        "linux_x86_64",
    ]
    assert len(tags) == len(set(tags)) == 20 + 4
    arm = wheels.platform_tags("aarch64", (2, 31))
    assert arm[0] == "manylinux_2_31_aarch64" and "manylinux2010_aarch64" not in arm
    assert "manylinux2014_aarch64" in arm
    assert wheels.platform_tags("x86_64", None) == ["linux_x86_64"]  # musl: pure wheels only


def test_pip_download_command(tmp_path: Path) -> None:
    cmd = wheels.pip_download_command(["six", "tabulate>=0.9"], tmp_path, TARGET)
    assert cmd[:5] == [sys.executable, "-m", "pip", "download", "--only-binary=:all:"]
    platforms = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--platform"]
    assert platforms == wheels.platform_tags("x86_64", (2, 36))
    joined = " ".join(cmd)
    assert "--python-version 3.11 --implementation cp --abi cp311" in joined
    assert f"-d {tmp_path}" in joined and "--disable-pip-version-check" in joined
    assert cmd[-3:] == ["--", "six", "tabulate>=0.9"]  # never read as pip options


def test_pip_accepts_the_command(tmp_path: Path) -> None:
    """The real pip parses every option (nothing to fetch: a local wheel folder, no index)."""
    wheel = build_wheel(tmp_path, "hutchlocal", files={"hutchlocal.py": b""})
    dest = tmp_path / "out"
    cmd = wheels.pip_download_command(["hutchlocal"], dest, TARGET)
    cmd[cmd.index("--") : cmd.index("--")] = ["--no-index", "--find-links", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in dest.iterdir()] == [wheel.name]


def test_split_packages(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path, "w")
    reqs, local = wheels.split_packages(["six", " tabulate==0.9.0 ", str(wheel), wheel])
    assert reqs == ["six", "tabulate==0.9.0"] and local == [wheel, wheel]
    for bad in ["--index-url=http://x", "-r req.txt", "", "a\nb"]:
        with pytest.raises(BadRequestError, match="invalid package"):
            wheels.split_packages([bad])
    with pytest.raises(BadRequestError, match="no such wheel"):
        wheels.split_packages([str(tmp_path / "missing-1.0-py3-none-any.whl")])
    with pytest.raises(BadRequestError, match="no packages"):
        wheels.split_packages([])


def test_pip_errors_are_typed() -> None:
    missing = wheels.pip_error(1, "/usr/bin/python3: No module named pip\n", ["six"], TARGET)
    assert isinstance(missing, SetupError) and "ensurepip" in missing.hint
    stderr = "".join(f"WARNING: noise {i}\n" for i in range(40)) + (
        "ERROR: Could not find a version that satisfies the requirement nopkg (from versions: "
        "none)\nERROR: No matching distribution found for nopkg\n"
    )
    err = wheels.pip_error(1, stderr, ["nopkg"], TARGET)
    assert isinstance(err, BadRequestError)
    assert "No matching distribution found for nopkg" in err.message
    assert "noise 10" not in err.message  # only the tail
    assert "wheels for Linux x86_64 (glibc 2.36) / CPython 3.11" in err.hint
    offline = wheels.pip_error(
        1,
        "WARNING: Retrying ... NewConnectionError(...)\nERROR: Could not find a version",
        ["six"],
        TARGET,
    )
    assert isinstance(offline, NetworkError) and "host" in offline.hint


async def test_download_errors_with_a_fake_pip(tmp_path: Path) -> None:
    nopip = tmp_path / "nopip"
    nopip.write_text('#!/bin/sh\necho "$0: No module named pip" >&2\nexit 1\n')
    slow = tmp_path / "slow"
    slow.write_text("#!/bin/sh\nsleep 30\n")
    for f in (nopip, slow):
        f.chmod(0o755)
    with pytest.raises(SetupError, match="pip is not installed"):
        await wheels.download(["six"], tmp_path, TARGET, python=str(nopip))
    with pytest.raises(TimeoutError, match="did not finish within 0.5 s"):
        await wheels.download(["six"], tmp_path, TARGET, timeout=0.5, python=str(slow))


def test_probe_script_output_parses() -> None:
    r = subprocess.run(
        [sys.executable, "-c", wheels.PROBE_SCRIPT], capture_output=True, text=True, check=True
    )
    target = PythonTarget.from_probe(r.stdout)
    assert target.version == f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert target.abi == f"cp{sys.version_info[0]}{sys.version_info[1]}"
    assert target.paths["purelib"] and target.implementation == "cpython"
    assert json.loads(target.installer_paths())["executable"] == sys.executable
    with pytest.raises(BadRequestError, match="Python configuration"):
        PythonTarget.from_probe("Traceback: nope")


def test_installer_source_ships_and_wrappers_exist() -> None:
    source = wheels.installer_source()
    assert "runs inside the guest" in source and "def main(" in source
    compile(source, "installer", "exec")
    assert hutch.CodeBox is not None and issubclass(hutch.sync.CodeBox, hutch.sync.Box)
    assert hutch.CodeBox().image == "debian-python"


# --- the guest-side installer, run on the host -------------------------------------------------
def folders(tmp_path: Path) -> dict[str, str]:
    root = tmp_path / "root"
    paths = {
        "purelib": str(root / "lib"),
        "scripts": str(root / "bin"),
        "data": str(root),
        "include": str(root / "include"),
    }
    return {**paths, "executable": "/usr/bin/python3"}


def run_installer(paths: dict[str, str], *wheel_files: Path) -> tuple[int, str, str]:
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as t:
        for w in wheel_files:
            t.add(w, arcname=w.name)
    tar.seek(0)
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        code = installer.main(["installer", json.dumps(paths)], stdin=tar)
    finally:
        sys.stdout, sys.stderr = saved
    return code, out.getvalue(), err.getvalue()


def test_installer_installs_a_wheel(tmp_path: Path) -> None:
    paths = folders(tmp_path)
    code, out, err = run_installer(paths, demo_wheel(tmp_path))
    assert code == 0, err
    assert wheels.parse_installed(out) == ["hutchdemo"]
    lib, bin_ = Path(paths["purelib"]), Path(paths["scripts"])
    assert (lib / "hutchdemo/__init__.py").read_text().startswith("VALUE = '1.0'")
    raw = (bin_ / "hutchdemo-raw").read_text()
    assert raw.startswith("#!/usr/bin/python3 -u\nimport hutchdemo")
    hello = (bin_ / "hutchdemo-hello").read_text()
    assert hello.startswith("#!/usr/bin/python3\n") and "from hutchdemo import main" in hello
    for script in ("hutchdemo-raw", "hutchdemo-hello"):
        assert stat.S_IMODE((bin_ / script).stat().st_mode) == 0o755
    dist_info = lib / "hutchdemo-1.0.dist-info"
    assert (dist_info / "INSTALLER").read_text() == "hutch\n"
    record = (dist_info / "RECORD").read_text()
    assert "../bin/hutchdemo-hello,sha256=" in record and "hutchdemo/extra.py" in record
    assert not (lib / "hutchdemo-1.0.data").exists()

    # an upgrade replaces the old files (extra.py is gone in 2.0)
    code, _, err = run_installer(paths, demo_wheel(tmp_path, "2.0", extra=False))
    assert code == 0, err
    assert not (lib / "hutchdemo/extra.py").exists() and not dist_info.exists()
    assert (lib / "hutchdemo-2.0.dist-info/RECORD").exists()
    assert "'2.0'" in (lib / "hutchdemo/__init__.py").read_text()


@pytest.mark.parametrize(
    "member",
    ["../../etc/evil", "/etc/evil", "ok/../../evil", "a\\..\\evil"],
)
def test_installer_refuses_hostile_wheels_before_writing(tmp_path: Path, member: str) -> None:
    paths = folders(tmp_path)
    good = demo_wheel(tmp_path)
    bad = build_wheel(tmp_path, "evil", files={"evil/__init__.py": b"", member: b"pwned"})
    code, out, err = run_installer(paths, good, bad)
    assert code == 1 and out == ""
    assert "refusing evil-1.0-py3-none-any.whl" in err
    assert not Path(paths["purelib"]).exists()  # not even the good wheel of the batch
    assert not any(p.name == "evil" for p in tmp_path.rglob("*") if p.is_file())


def test_installer_refuses_bad_records_entry_points_and_streams(tmp_path: Path) -> None:
    paths = folders(tmp_path)
    original = build_wheel(tmp_path, "tampered", files={"tampered.py": b"x = 1\n"})
    tampered = tmp_path / "t" / original.name
    tampered.parent.mkdir()
    with zipfile.ZipFile(original) as src, zipfile.ZipFile(tampered, "w") as dst:
        for info in src.infolist():  # same RECORD, other content
            data = b"x = 2\n" if info.filename == "tampered.py" else src.read(info)
            dst.writestr(info, data)
    code, _, err = run_installer(paths, tampered)
    assert code == 1 and "does not match its hash" in err
    escape = build_wheel(
        tmp_path, "ep", files={"ep.py": b""}, entry_points="[console_scripts]\n../x = ep:main\n"
    )
    code, _, err = run_installer(paths, escape)
    assert code == 1 and "not a valid script name" in err
    injected = build_wheel(
        tmp_path, "ep2", files={"ep2.py": b""}, entry_points="[console_scripts]\nx = os;rm:main\n"
    )
    code, _, err = run_installer(paths, injected)
    assert code == 1 and "is not 'module:attr'" in err
    no_dist_info = tmp_path / "bare-1.0-py3-none-any.whl"
    with zipfile.ZipFile(no_dist_info, "w") as zf:
        zf.writestr("bare.py", b"")
    code, _, err = run_installer(paths, no_dist_info)
    assert code == 1 and "dist-info" in err
    assert not Path(paths["purelib"]).exists()

    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as t:
        info = tarfile.TarInfo("../escape.whl")
        t.addfile(info, io.BytesIO(b""))
    tar.seek(0)
    assert installer.main(["installer", json.dumps(paths)], stdin=tar) == 1


def test_installer_header_parser() -> None:
    text = (
        "Metadata-Version: 2.1\nName: demo\nSummary: a long\n  summary\nName: ignored\n"
        "Classifier: A\nClassifier: B\nVersion:  1.0 \n\nName: body text\n"
    )
    headers = installer.parse_headers(text)
    assert headers["Name"] == "demo" and headers["Version"] == "1.0"
    assert headers["Summary"] == "a long summary" and headers["Classifier"] == "A"
