"""A box's volumes and NIC, from its options to QEMU devices and back (what :class:`hutch.Box`
calls at start): :func:`prepare` before QEMU starts, :func:`finish` once the agent said HELLO.

See :mod:`hutch.vm.volumes` and :mod:`hutch.vm.network` for how each works and why.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from hutch.errors import ConfigError, EngineError, HutchError, SetupError
from hutch.portal import Hello
from hutch.runtime.options import BoxOptions, Port
from hutch.vm import network, volumes
from hutch.vm.network import NetworkPlan
from hutch.vm.process import QemuProcess

#: Under a box's folder while it runs: the ports it publishes (host port 0 resolved).
PORTS_FILE = "ports.json"
#: The agent's protocol minor version that mounts volumes and configures the NIC.
AGENT_MINOR = 2


@dataclass(frozen=True)
class Attachments:
    """QEMU arguments and kernel command-line entries for a box's volumes and NIC."""

    devices: list[str] = field(default_factory=list)
    kernel_args: list[str] = field(default_factory=list)
    #: The argv prefix QEMU is started with (a mount namespace for the volumes), else [].
    launcher: list[str] = field(default_factory=list)
    net: NetworkPlan | None = None
    mounts: list[volumes.VolumeMount] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return self.net is None and not self.mounts


def net_devices(options: BoxOptions, box_id: str, run_dir: Path) -> Attachments:
    """The NIC only (a restored clone: its volumes were refused at snapshot time)."""
    net = network.plan(options, box_id, run_dir)
    if net is None:
        return Attachments()
    return Attachments(net.qemu_args(), net.kernel_args(), net=net)


def prepare(options: BoxOptions, box_id: str, run_dir: Path) -> Attachments:
    """Check the host side (volume paths, fixed host ports free), make the volumes' staging
    folders in ``run_dir`` and return what QEMU and the guest kernel need.
    ConfigError/ConflictError name the option at fault."""
    mounts = volumes.plan(options.volumes)
    network.check_ports(options.ports, options.network)
    net = network.plan(options, box_id, run_dir)
    staging = run_dir / volumes.STAGING_DIR
    launcher: list[str] = []
    devices: list[str] = []
    if mounts:
        volumes.check_unshare()
        volumes.stage(mounts, staging)
        launcher = volumes.launcher(mounts, staging)
        devices += volumes.qemu_args(mounts, staging)
    kernel_args = volumes.kernel_args(mounts)
    if net is not None:
        devices += net.qemu_args()
        kernel_args += net.kernel_args()
    return Attachments(devices, kernel_args, launcher, net, mounts)


def check_ports(options: BoxOptions) -> None:
    """Fixed host ports free, every port forwardable (see :func:`network.check_ports`)."""
    network.check_ports(options.ports, options.network)


def failure(qemu: QemuProcess, options: BoxOptions) -> HutchError | None:
    """Why QEMU exited at start, if it is about the box's devices (a host port taken between
    the check and QEMU binding it; the volumes' namespace or bind mounts), else None."""
    try:
        with qemu.log_path.open("rb") as f:
            f.seek(qemu.log_offset)
            text = f.read(65536).decode(errors="replace")  # this run's output only
    except OSError:
        return None
    if options.volumes:
        lines = [ln for ln in text.splitlines() if ln.startswith(("unshare:", "mount:"))]
        if any(ln.startswith("unshare:") for ln in lines):
            return EngineError(
                f"could not make the mount namespace for the volumes: {lines[0]}",
                hint="Volumes need unprivileged user namespaces when hutch does not run as root "
                "(sysctl user.max_user_namespaces > 0; on Ubuntu also "
                "kernel.apparmor_restrict_unprivileged_userns=0).",
            )
        if lines:
            return ConfigError(
                f"could not share the volumes: {'; '.join(lines[:3])}",
                hint="Check that every volume's host path exists and can be read.",
            )
    return network.forward_failure(text, options.ports)


async def finish(
    qemu: QemuProcess, hello: Hello, attachments: Attachments, deadline: float
) -> tuple[Port, ...]:
    """After HELLO: fail the start if the agent could not set something up, and return the
    published ports with every host port 0 resolved (QMP ``info usernet``)."""
    if attachments.empty:
        return ()
    if hello.minor < AGENT_MINOR:
        raise SetupError(
            f"the guest agent (protocol 1.{hello.minor}) cannot mount volumes or configure a "
            "network",
            hint="Run `hutch setup` (it rebuilds the agent and initramfs).",
        )
    if hello.setup_errors:
        text = "; ".join(hello.setup_errors)
        if any(e.startswith("volume") for e in hello.setup_errors):
            raise ConfigError(
                f"the guest could not mount its volumes: {text}",
                hint="Check each volume's guest_path against the image (a file where a folder "
                "is needed, or the reverse).",
            )
        raise EngineError(f"the guest could not set up its network: {text}")
    net = attachments.net
    if net is None:
        return ()
    if not any(p.host == 0 for p in net.ports):
        return net.ports
    async with qemu.qmp_session(deadline) as qmp:
        text = await qmp.execute("human-monitor-command", {"command-line": "info usernet"})
    return network.resolve_ports(net.ports, str(text))


def write_ports(box_dir: Path, ports: tuple[Port, ...]) -> None:
    """Record the published ports of a running box (``hutch inspect``/``ps --json`` read it)."""
    path = box_dir / PORTS_FILE
    if not ports:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([p.to_json() for p in ports]))
    tmp.replace(path)


def read_ports(box_dir: Path) -> list[dict[str, object]]:
    """The published ports :func:`write_ports` recorded ([] when none or unreadable)."""
    with contextlib.suppress(OSError, ValueError):
        data = json.loads((box_dir / PORTS_FILE).read_text())
        if isinstance(data, list):
            return [d for d in data if isinstance(d, dict)]
    return []


def clear_ports(box_dir: Path) -> None:
    with contextlib.suppress(OSError):
        (box_dir / PORTS_FILE).unlink(missing_ok=True)


def describe(ports: tuple[Port, ...]) -> str:
    """``127.0.0.1:41234->80/tcp, …`` (for the store's events)."""
    return ", ".join(f"{p.host_ip}:{p.host}->{p.guest}/{p.protocol}" for p in ports)


__all__ = [
    "Attachments",
    "check_ports",
    "clear_ports",
    "describe",
    "failure",
    "finish",
    "net_devices",
    "prepare",
    "read_ports",
    "write_ports",
]
