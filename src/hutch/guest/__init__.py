"""Guest side: kernel build, initramfs, and the agent (PID 1)."""
