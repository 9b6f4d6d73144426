"""hutch's guest kernel: built from Debian's linux-source-6.1 with ``microvm.config``."""

from hutch.guest.kernel.build import (
    KERNEL_CMDLINE_BASE,
    LAPIC_TIMER_PERIOD,
    ensure_kernel,
    host_tsc_khz,
    kernel_cmdline,
    kernel_key,
)

__all__ = [
    "KERNEL_CMDLINE_BASE",
    "LAPIC_TIMER_PERIOD",
    "ensure_kernel",
    "host_tsc_khz",
    "kernel_cmdline",
    "kernel_key",
]
