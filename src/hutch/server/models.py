"""Request and response bodies of the HTTP API (pydantic models, so ``/openapi.json`` describes
them). Validation rules of box options live in :class:`hutch.BoxOptions`, not here: these models
only check JSON types (a wrong type is a 400 ``BadRequestError``), and the options' own checks
raise ``ConfigError`` (400) naming the field and the allowed range."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from hutch.box import MAX_FORK
from hutch.execution import DEFAULT_MAX_OUTPUT
from hutch.runtime.options import BoxOptions

_DEFAULTS: dict[str, Any] = {
    f.name: f.default
    for f in dataclasses.fields(BoxOptions)
    if f.default is not dataclasses.MISSING
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ErrorInfo(BaseModel):
    type: str = Field(description="The hutch.errors class name, e.g. NotFoundError.")
    message: str
    hint: str
    # ExecutionError only:
    command: list[str] | None = None
    exit_code: int | None = None
    stdout: str | None = None
    stderr: str | None = None
    signal: int | None = None


class ErrorBody(BaseModel):
    error: ErrorInfo


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Version(BaseModel):
    version: str
    api: int
    #: The server's process id: it owns the boxes it started.
    pid: int
    home: str


# --- boxes ----------------------------------------------------------------------------------
class PortModel(_Strict):
    host: int
    guest: int
    protocol: Literal["tcp", "udp"] = "tcp"
    host_ip: str = "127.0.0.1"


class VolumeModel(_Strict):
    host_path: str
    guest_path: str
    read_only: bool = False


class BoxOptionsModel(_Strict):
    """The fields of hutch.BoxOptions; omitted fields take BoxOptions' defaults."""

    image: str = _DEFAULTS["image"]
    name: str | None = None
    cpus: int = _DEFAULTS["cpus"]
    memory_mib: int = _DEFAULTS["memory_mib"]
    disk_size_mib: int | None = None
    env: dict[str, str] = Field(default_factory=dict)
    workdir: str | None = None
    user: str | None = None
    ports: list[PortModel] = Field(default_factory=list)
    volumes: list[VolumeModel] = Field(default_factory=list)
    network: str = Field(
        _DEFAULTS.get("network", "none"),
        description="none (no network), outbound (NAT) or allowlist (only what allow lists)",
    )
    allow: list[str] = Field(
        default_factory=list,
        description="network allowlist: CIDRs, host names and *.suffix patterns",
    )
    auto_remove: bool = _DEFAULTS["auto_remove"]
    accel: str = _DEFAULTS["accel"]
    boot_timeout: float = _DEFAULTS["boot_timeout"]
    labels: dict[str, str] = Field(default_factory=dict)


class BoxOptionsInfo(BoxOptionsModel):
    """A box's options as the server stored them. Lenient, unlike the request model: options
    this model does not name yet (a newer hutch.BoxOptions) are passed through, never a 500."""

    model_config = ConfigDict(extra="allow", strict=False)


class BoxCreate(BoxOptionsModel):
    start: bool = Field(False, description="Boot the box before answering (removed if that fails).")
    snapshot: str | None = Field(
        None,
        description="Make the box from this snapshot (id, id prefix or name): its first start "
        "resumes the snapshot. Only name, env, workdir, user, labels, auto_remove, accel and "
        "boot_timeout may then be given; the machine fields must be the snapshot's if given.",
    )


class BoxInfo(BaseModel):
    """A box's stored record (hutch.BoxRecord); record fields newer than this model pass through."""

    model_config = ConfigDict(extra="allow")

    id: str
    name: str | None
    image: str
    state: str = Field(description="created, starting, running, stopping, stopped or failed")
    image_id: str | None = None
    failure: str | None = None
    owner_pid: int | None = None
    owner_start: float | None = None
    owner_boot: str | None = None
    qemu_pid: int | None = None
    accel: str | None = None
    created_at: float
    started_at: float | None = None
    stopped_at: float | None = None
    boot_ms: float | None = None
    updated_at: float = 0.0
    revision: int = 0
    options: BoxOptionsInfo


# --- snapshots, clones and forks -------------------------------------------------------------
class SnapshotRequest(_Strict):
    """``POST /v1/boxes/{box}/snapshot`` (the body is optional)."""

    name: str | None = Field(None, description="A unique snapshot name; none: only an id")


class CloneRequest(_Strict):
    """``POST /v1/boxes/{box}/clone`` (the body is optional)."""

    name: str | None = Field(None, description="The clone's name")


class ForkRequest(_Strict):
    """``POST /v1/boxes/{box}/fork``."""

    n: int = Field(ge=1, le=MAX_FORK, description=f"How many clones (1 to {MAX_FORK})")
    names: list[str] | None = Field(None, description="n different names, one per clone")


class SnapshotInfo(BaseModel):
    """A snapshot's record (hutch.Snapshot); fields newer than this model pass through."""

    model_config = ConfigDict(extra="allow")

    id: str
    name: str | None
    source_box: str | None = Field(description="the box it was taken of (it may be gone since)")
    image: str
    image_id: str | None = None
    options: BoxOptionsInfo = Field(description="the source box's options (name cleared)")
    accel: str
    kernel: str
    initramfs: str
    cmdline: str
    cpus: int
    memory_mib: int
    ram_bytes: int = 0
    disk_bytes: int = 0
    state_bytes: int = 0
    size_bytes: int = Field(0, description="ram_bytes + disk_bytes + state_bytes")
    auto_remove: bool = Field(False, description="removed with its last clone (clone/fork)")
    created_at: float
    pool: str | None = None
    holder_pid: int | None = None
    holder_start: float | None = None
    holder_boot: str | None = None
    users: list[str] = Field(
        default_factory=list, description="ids of the boxes made from it (they keep it)"
    )


# --- warm pools ----------------------------------------------------------------------------
class PoolRequest(_Strict):
    """``PUT /v1/pools``: keep ``size`` restored boxes of (image, cpus, memory_mib, accel)
    ready; ``size`` 0 drains and removes the pool."""

    image: str = "busybox"
    cpus: int = 1
    memory_mib: int = 256
    accel: str = "auto"
    size: int = Field(1, description="ready boxes to keep (0 to 64; 0 removes the pool)")


class PoolStatusModel(BaseModel):
    """A warm pool's state and counters (hutch.PoolStatus); newer fields pass through."""

    model_config = ConfigDict(extra="allow")

    image: str
    cpus: int
    memory_mib: int
    accel: str
    size: int
    ready: int
    restoring: int
    handed_out: int = 0
    misses: int = 0
    restores: int = 0
    failures: int = 0
    last_error: str | None = None
    retry_in: float = 0.0
    snapshot_id: str | None = None
    last_restore_ms: float | None = None


# --- exec -----------------------------------------------------------------------------------
class _ExecBase(_Strict):
    cmd: list[str] = Field(
        default_factory=list, description="argv; empty = the image's Entrypoint + Cmd"
    )
    env: dict[str, str] | None = Field(None, description="merged over the image's and box's env")
    cwd: str | None = None
    user: str | int | None = Field(None, description="a user name, uid or uid:gid")
    timeout: float | None = Field(
        None, description="seconds; enforced in the guest (the process group is killed)"
    )
    tty: bool = Field(False, description="run on a terminal: all output on stdout")
    term_size: list[int] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="[rows, columns] of the terminal (needs tty; default [24, 80])",
    )


class ExecRequest(_ExecBase):
    """A buffered exec (``POST …/exec``) or an SSE stream (``POST …/exec/sse``)."""

    stdin: str | None = Field(None, description="stdin as text (UTF-8)")
    stdin_b64: str | None = Field(None, description="stdin as base64 (binary data)")
    max_output_bytes: int = Field(DEFAULT_MAX_OUTPUT, description="per stream (buffered exec)")


class SpawnRequest(_ExecBase):
    """The first message of a WebSocket exec stream."""

    stdin: bool = Field(True, description="false: the process reads /dev/null")


class ExecResultModel(BaseModel):
    """A finished command. Output is base64 (lossless): decode ``stdout_b64``/``stderr_b64``."""

    command: list[str]
    exit_code: int | None
    signal: int | None = None
    timed_out: bool = False
    duration_ms: float = 0.0
    pid: int | None = None
    stdout_b64: str = ""
    stderr_b64: str = ""


# --- images ---------------------------------------------------------------------------------
class ImageConfigModel(BaseModel):
    architecture: str
    os: str
    entrypoint: list[str]
    cmd: list[str]
    env: list[str] = Field(description="KEY=VALUE")
    working_dir: str
    user: str
    created: str = ""


class LayerModel(BaseModel):
    digest: str
    media_type: str
    size: int
    diff_id: str


class ImageInfo(BaseModel):
    id: str = Field(description="sha256:… of the image config")
    references: list[str]
    source: str
    platform: str
    size: int = Field(description="compressed layer bytes")
    base_size: int = Field(description="apparent size of the base disk")
    allocated: int = Field(description="bytes the base disk takes on the host")
    added: float
    manifest_digest: str | None = None
    index_digest: str | None = None
    config: ImageConfigModel
    layers: list[LayerModel]


class ImageRemoved(BaseModel):
    done: list[str] = Field(description="'untagged: …' / 'deleted: …' lines")


class PullRequest(_Strict):
    reference: str
    platform: str | None = Field(None, description="OS/ARCH[/VARIANT]; default: this host's")


class PullEventModel(BaseModel):
    """One NDJSON line of a pull."""

    type: Literal["status", "layer", "done", "error"]
    message: str = ""
    digest: str | None = None
    done: int = 0
    total: int = 0
    image: ImageInfo | None = None
    error: ErrorInfo | None = None


__all__ = [
    "BoxCreate",
    "BoxInfo",
    "BoxOptionsInfo",
    "BoxOptionsModel",
    "CloneRequest",
    "ErrorBody",
    "ErrorInfo",
    "ExecRequest",
    "ExecResultModel",
    "ForkRequest",
    "Health",
    "ImageInfo",
    "ImageRemoved",
    "PoolRequest",
    "PoolStatusModel",
    "PullEventModel",
    "PullRequest",
    "SnapshotInfo",
    "SnapshotRequest",
    "SpawnRequest",
    "Version",
]
