"""The console-log cap keeps the newest output and lets an appending writer continue."""

from __future__ import annotations

import os
from pathlib import Path

from hutch.vm.process import cap_log, tail


def test_cap_keeps_tail_and_appends_continue(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)  # like QEMU's append=on
    try:
        for i in range(2000):
            os.write(fd, f"line {i:05d}\n".encode())
        assert not cap_log(log, max_bytes=1 << 20, keep=100)  # under the cap: untouched
        assert cap_log(log, max_bytes=1000, keep=110)
        os.write(fd, b"after\n")
    finally:
        os.close(fd)
    text = log.read_text()
    assert text.startswith("[hutch: log exceeded 1000 bytes")
    assert "line 01999\nafter\n" in text and "line 00000" not in text
    assert log.stat().st_size < 300
    assert tail(log, 2) == "line 01999\nafter"


def test_cap_of_missing_file_is_harmless(tmp_path: Path) -> None:
    assert not cap_log(tmp_path / "nope")
