"""Small real images for tests, made without a registry: a busybox root filesystem as a layer,
and writers for the archive formats hutch loads (OCI layout folder / archive, `docker save`)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

BUSYBOX = Path("/bin/busybox")

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "app:x:1234:1234:app:/home/app:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
GROUP = "root:x:0:\napp:x:1234:\nnogroup:x:65534:\n"


def _add(
    tf: tarfile.TarFile,
    name: str,
    *,
    data: bytes | None = None,
    mode: int = 0o644,
    kind: bytes = tarfile.REGTYPE,
    link: str = "",
    uid: int = 0,
    gid: int = 0,
) -> None:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.uid, ti.gid = uid, gid
    ti.mtime = 1_700_000_000
    ti.linkname = link
    if data is not None:
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    else:
        tf.addfile(ti)


def busybox_layer(extra: dict[str, bytes] | None = None) -> bytes:
    """An uncompressed tar layer: a bootable busybox root (sh, ls, id, … as symlinks)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d, mode in (
            ("bin", 0o755),
            ("etc", 0o755),
            ("tmp", 0o1777),
            ("root", 0o700),
            ("home", 0o755),
            ("usr", 0o755),
            ("usr/bin", 0o755),
            ("sbin", 0o755),
        ):
            _add(tf, d, kind=tarfile.DIRTYPE, mode=mode)
        _add(tf, "home/app", kind=tarfile.DIRTYPE, mode=0o755, uid=1234, gid=1234)
        _add(tf, "bin/busybox", data=BUSYBOX.read_bytes(), mode=0o755)
        for applet in (
            "sh",
            "ls",
            "id",
            "cat",
            "echo",
            "pwd",
            "env",
            "uname",
            "stat",
            "test",
            "mkdir",
            "true",
            "false",
            "readlink",
            "wc",
            "head",
        ):
            _add(tf, f"bin/{applet}", kind=tarfile.SYMTYPE, link="busybox", mode=0o777)
        _add(tf, "etc/passwd", data=PASSWD.encode())
        _add(tf, "etc/group", data=GROUP.encode())
        for name, data in (extra or {}).items():
            _add(tf, name, data=data, mode=0o755)
    return buf.getvalue()


def image_config(diff_ids: list[str], **config: Any) -> bytes:
    doc = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], **config},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    return json.dumps(doc).encode()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_oci_layout(
    root: Path,
    layers: list[bytes],
    config: dict[str, Any] | None = None,
    *,
    tag: str | None = "v1",
    compress: bool = True,
) -> dict[str, str]:
    """An OCI image layout folder holding one image; returns its digests."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        d = sha(data)
        (blobs / d.split(":")[1]).write_bytes(data)
        return d

    diff_ids = [sha(layer) for layer in layers]
    descs = []
    for layer in layers:
        blob = gzip.compress(layer, mtime=0) if compress else layer
        mt = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if compress else "")
        descs.append({"mediaType": mt, "digest": put(blob), "size": len(blob)})
    cfg = image_config(diff_ids, **(config or {}))
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": put(cfg),
                "size": len(cfg),
            },
            "layers": descs,
        }
    ).encode()
    mdesc: dict[str, Any] = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": put(manifest),
        "size": len(manifest),
    }
    if tag:
        mdesc["annotations"] = {"org.opencontainers.image.ref.name": tag}
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [mdesc]}))
    return {"manifest": mdesc["digest"], "config": sha(cfg)}


def write_docker_save(
    path: Path,
    layers: list[bytes],
    config: dict[str, Any] | None = None,
    repo_tags: list[str] | None = None,
) -> str:
    """A classic `docker save` tar (config JSON + <id>/layer.tar); returns the config digest."""
    diff_ids = [sha(layer) for layer in layers]
    cfg = image_config(diff_ids, **(config or {}))
    cfg_name = sha(cfg).split(":")[1] + ".json"
    with tarfile.open(path, "w") as tf:

        def add(name: str, data: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))

        add(cfg_name, cfg)
        names = []
        for i, layer in enumerate(layers):
            n = f"{i:064x}/layer.tar"
            add(n, layer)
            names.append(n)
        add(
            "manifest.json",
            json.dumps(
                [{"Config": cfg_name, "RepoTags": repo_tags or [], "Layers": names}]
            ).encode(),
        )
    return sha(cfg)
