"""The QEMU microvm command line for one box (see shared field notes §1–§4 for why each option)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hutch.errors import ConfigError

QEMU_BINARY = "qemu-system-x86_64"
#: The x86 kernel keeps at most this many bytes of its command line (COMMAND_LINE_SIZE - 1).
KERNEL_CMDLINE_MAX = 2047
#: What microvm appends per virtio-mmio device: " virtio_mmio.device=512@0xfeb00e00:12".
VIRTIO_MMIO_ENTRY = len(" virtio_mmio.device=512@0xfeb00000:12")


@dataclass(frozen=True)
class VmSpec:
    """Everything QEMU needs to boot one box."""

    kernel: Path
    initramfs: Path
    root_disk: Path  # qcow2 overlay on the image's base ext4
    cmdline: str
    portal_socket: Path
    qmp_socket: Path
    console_log: Path
    ram_file: Path
    accel: str = "tcg"  # "kvm" | "tcg"
    cpus: int = 1
    memory_mib: int = 256
    extra_args: list[str] = field(default_factory=list)
    #: Map ``ram_file`` shared (a box's own RAM, which snapshots copy) or private: a clone maps
    #: its snapshot's RAM file copy-on-write, so it never writes to the snapshot.
    ram_shared: bool = True
    #: Wait for the machine state from an incoming migration (``-incoming defer``; the host then
    #: sends ``migrate-incoming``) and stay paused afterwards (``-S``) until QMP ``cont``.
    incoming: bool = False
    #: TCG's translation cache (MiB): the code it holds costs host memory per VM.
    tb_size_mib: int = 16
    #: Volumes (``-fsdev`` + ``virtio-9p-device``, :mod:`hutch.vm.volumes`) and the NIC
    #: (``-netdev user`` + ``virtio-net-device``, :mod:`hutch.vm.network`).
    devices: list[str] = field(default_factory=list)
    #: QEMU starts helper processes (the egress relay of an allowlist box: see -sandbox).
    spawns: bool = False
    #: What QEMU is started through (the volumes' mount namespace: ``unshare … sh -c …``); the
    #: QEMU command follows it.
    launcher: list[str] = field(default_factory=list)


#: microvm without ACPI/PCI: QEMU appends virtio_mmio.device=… to the kernel command line itself.
MICROVM = "microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off"
#: Options every hutch QEMU shares (also the KVM probe's): no default devices, no config, exit on reset.
BASE_OPTIONS = ["-nodefaults", "-no-user-config", "-no-reboot", "-display", "none"]


def accel_options(accel: str, tb_size_mib: int = 16) -> list[str]:
    if accel == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    # tb-size=16 saves ~12 MiB RSS per VM at the same speed (notes §1).
    # Without ERMS/FSRM the guest kernel copies with `rep movsq`/unrolled moves instead of
    # `rep movsb`, which TCG emulates byte by byte: pipe and portal throughput 2-3x higher
    # (bench/exec.py: ~35 → ~90 MB/s guest→host).
    return ["-accel", f"tcg,tb-size={tb_size_mib}", "-cpu", "max,-erms,-fsrm"]


def check_kernel_cmdline(cmdline: str, argv: Sequence[str]) -> None:
    """The guest kernel silently cuts its command line at 2047 bytes, and microvm appends one
    ``virtio_mmio.device=…`` entry per virtio device: refuse a command line that would not fit
    (long volume guest paths are what can make it)."""
    devices = sum(1 for a in argv if a.startswith("virtio-") and "-device" in a.split(",")[0])
    total = len(cmdline) + devices * VIRTIO_MMIO_ENTRY
    if total > KERNEL_CMDLINE_MAX:
        raise ConfigError(
            f"the guest kernel command line would be {total} bytes, more than the "
            f"{KERNEL_CMDLINE_MAX} the kernel keeps",
            hint="Use shorter volume guest paths, or fewer volumes.",
        )


def qemu_command(spec: VmSpec, binary: str = QEMU_BINARY) -> list[str]:
    argv = _qemu_argv(spec, binary)
    check_kernel_cmdline(spec.cmdline, argv)
    return argv


def _qemu_argv(spec: VmSpec, binary: str) -> list[str]:
    mem = f"{spec.memory_mib}M"
    # One option and its value per line:
    # fmt: off
    return [
        binary,
        "-M", f"{MICROVM},memory-backend=ram0",
        *accel_options(spec.accel, spec.tb_size_mib),
        "-smp", str(spec.cpus),
        "-m", mem,
        # Guest RAM in a file: shared for a box's own RAM (a snapshot copies it while the VM is
        # paused), private (copy-on-write) for a clone mapping its snapshot's RAM.
        "-object",
        f"memory-backend-file,id=ram0,size={mem},mem-path={spec.ram_file},"
        f"share={'on' if spec.ram_shared else 'off'}",
        *BASE_OPTIONS,
        # An allowlist box's QEMU spawns the egress relay per guest connection (guestfwd cmd:),
        # and libslirp's spawn calls setsid(), which elevateprivileges=deny forbids (so does
        # "children", measured on QEMU 7.2). QEMU never drops privileges here (no -runas), so
        # allowing set*id costs such a box little; fork/exec stay allowed for every box anyway.
        "-sandbox",
        "on,obsolete=deny,resourcecontrol=deny,"
        + ("elevateprivileges=allow" if spec.spawns else "elevateprivileges=deny"),
        "-kernel", str(spec.kernel),
        "-initrd", str(spec.initramfs),
        "-append", spec.cmdline,
        # append=on: QEMU writes with O_APPEND, so the host can cap this guest-controlled log by
        # truncating it while QEMU runs (vm.process.cap_log).
        "-chardev", f"file,id=console,path={spec.console_log},append=on",
        "-serial", "chardev:console",
        # max_ports=2 (port 0 is reserved for a console): the guest driver then sets up 4
        # virtqueues instead of 64, halving virtio_console_init (~31 → ~17 ms under TCG).
        "-device", "virtio-serial-device,max_ports=2",
        "-chardev", f"socket,id=portal,path={spec.portal_socket},server=on,wait=off",
        "-device", "virtserialport,chardev=portal,name=hutch.portal",
        "-drive", f"file={spec.root_disk},if=none,id=root,format=qcow2,discard=unmap",
        "-device", "virtio-blk-device,drive=root",
        "-device", "virtio-rng-device",
        *spec.devices,
        "-qmp", f"unix:{spec.qmp_socket},server=on,wait=off",
        *(["-S", "-incoming", "defer"] if spec.incoming else []),
        *spec.extra_args,
    ]
    # fmt: on
