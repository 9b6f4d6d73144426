"""VM engine: QEMU command line, process supervision, accelerator probe."""
