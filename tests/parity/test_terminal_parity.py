"""Processes on a terminal (``tty=True``, protocol 1.4), on the embedded and the remote runtime:
what the guest process sees (a tty of the asked size, ``TERM``), output as the terminal shows it,
end of input as Ctrl-D, ``resize`` (``stty size`` changes), Ctrl-C interrupting the foreground job,
and the errors for misuse."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from hutch.errors import BadRequestError

pytestmark = [pytest.mark.vm, pytest.mark.server]


async def test_exec_on_a_terminal(shared_box: Any) -> None:
    r = await shared_box.exec(
        "sh", "-c", "tty; stty size; echo $TERM; echo to-stderr >&2; exit 3", tty=True
    )
    lines = r.stdout.split("\r\n")  # the terminal turns \n into \r\n (onlcr)
    assert r.exit_code == 3 and r.stderr == ""
    assert lines[0].startswith("/dev/pts/") and lines[1:4] == [
        "24 80",
        "xterm-256color",
        "to-stderr",
    ]
    # size and TERM as asked
    r = await shared_box.exec(
        "sh", "-c", "stty size; echo $TERM", tty=True, term_size=(50, 132), env={"TERM": "vt100"}
    )
    assert r.stdout == "50 132\r\nvt100\r\n"
    # stdin is typed into the terminal (echoed) and its end is a Ctrl-D, so `cat` ends
    r = await shared_box.exec("cat", tty=True, stdin="one\ntwo", timeout=30)
    assert r.exit_code == 0 and r.stdout == "one\r\ntwoone\r\ntwo"
    # bulk output through the terminal arrives whole (the process exits right after writing)
    r = await shared_box.exec("seq", "1", "20000", tty=True)
    assert r.stdout.split("\r\n")[:-1] == [str(i) for i in range(1, 20001)]


async def _read_until(stream: Any, buf: bytearray, marker: bytes, timeout: float = 30) -> None:
    async def more() -> None:
        while marker not in buf:
            chunk = await stream.read_chunk()
            assert chunk, f"output ended before {marker!r}: {bytes(buf)!r}"
            buf.extend(chunk)

    await asyncio.wait_for(more(), timeout)


async def test_interactive_shell_resize_and_ctrl_c(shared_box: Any) -> None:
    execution = await shared_box.spawn("sh", tty=True, term_size=(30, 100))
    assert execution.tty
    out = bytearray()
    await execution.stdin.write(b"stty size\n")
    await _read_until(execution.stdout, out, b"30 100\r\n")
    await execution.resize(40, 120)
    await execution.stdin.write(b"stty size\n")
    await _read_until(execution.stdout, out, b"40 120\r\n")
    # Ctrl-C interrupts the foreground job, not the shell
    await execution.stdin.write(b"sleep 60; echo slept\n")
    await asyncio.sleep(0.5)
    await execution.stdin.write(b"\x03")
    await execution.stdin.write(b"echo status=$?\n")
    await _read_until(execution.stdout, out, b"status=130\r\n")
    await execution.stdin.write(b"exit 4\n")
    result = await asyncio.wait_for(execution.wait(), 30)
    assert result.exit_code == 4 and b"\nslept" not in out + result.stdout_bytes  # only echoed


async def test_terminal_misuse_is_a_bad_request(shared_box: Any) -> None:
    with pytest.raises(BadRequestError, match="needs tty"):
        await shared_box.exec("true", term_size=(10, 10))
    with pytest.raises(BadRequestError, match="rows"):
        await shared_box.exec("true", tty=True, term_size=(0, 80))
    execution = await shared_box.spawn("sleep", "30")
    try:
        with pytest.raises(BadRequestError, match="no terminal"):
            await execution.resize(10, 10)
    finally:
        await execution.kill()
        await execution.wait()
    execution = await shared_box.spawn("sh", tty=True)
    try:
        with pytest.raises(BadRequestError, match="cols"):
            await execution.resize(10, 70000)
    finally:
        await execution.kill()
        await execution.wait()
