"""The seed SDKs' documented example patterns (examples/compat/) run on hutch with only the import
changed: each program runs in its own Python process against a real hutch home and real guests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.homes import make_home

pytestmark = pytest.mark.vm

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "compat"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_home(tmp_path_factory.mktemp("compat") / "home")


def run_example(home: Path, name: str) -> list[str]:
    p = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        env={**os.environ, "HUTCH_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, f"{name} failed:\n{p.stdout}\n{p.stderr}"
    lines = p.stdout.splitlines()
    assert lines[-1] == "done", p.stdout
    return lines


def test_boxlite_simplebox(home: Path) -> None:
    out = run_example(home, "boxlite_simplebox.py")
    for line in (
        "exit code: 0",
        "stdout=out stderr=err",
        "['FOO=bar', 'BAZ=qux']",
        "pwd=/tmp",
        "user=alice",
        "false -> 1, true -> 0",
        "box1 created=True",
        "box2 created=False same=True",
        "marker=marker",
        "sum=5050",
    ):
        assert line in out, line


def test_boxlite_native_api_and_metrics(home: Path) -> None:
    out = run_example(home, "boxlite_native_api.py")
    for line in (
        "stdout: one",
        "stdout: two",
        "stderr: oops",
        "exit code: 0",
        "info: status=running image=busybox cpus=1 memory=256",
        "['CUSTOM=value']",
        "commands_executed_total=3",
        "exec_errors_total=0",
        "boxes_failed_total=0",
        "listed: list-0 running",
        "listed: list-1 running",
        "killed: exit code -9",
        "pwd: /tmp",
        "tty size: 24 80",
        "tty resized: 40 100",
    ):
        assert line in out, line
    values = dict(line.split("=", 1) for line in out if "=" in line and " " not in line)
    assert float(values["total_create_duration_ms"]) > float(values["guest_boot_duration_ms"]) > 0
    assert int(values["memory_bytes"]) > 1 << 20
    assert int(values["boxes_created_total"]) == 3
    assert int(values["total_commands_executed"]) == 5


def test_boxlite_lifecycle_and_cleanup(home: Path) -> None:
    out = run_example(home, "boxlite_lifecycle.py")
    assert out[:-1] == [
        "state before stop: running",
        "state after stop: stopped",
        "file after restart: persisted",
        "remove of a running box refused: InvalidStateError",
        "after remove: None",
        "unknown box: None",
        "remove unknown: NotFoundError",
        "auto_remove after stop: None",
    ]


def test_boxlite_error_handling_and_retry(home: Path) -> None:
    out = run_example(home, "boxlite_error_handling.py")
    assert out[:-1] == [
        "ExecError: command='sh -c echo broken >&2; exit 7' exit_code=7 stderr='broken'",
        "TimeoutError: Command 'sleep 30' timed out after 1 seconds",
        "BoxliteError: NotFoundError",
        "attempt 1 failed with exit code 1",
        "attempt 2 failed with exit code 1",
        "succeeded after 3 attempts",
        "bad image: ParseError",
    ]


def test_boxlite_codebox(home: Path) -> None:
    """CodeBox on debian-python; install_package fetches tabulate from PyPI on the host."""
    out = run_example(home, "boxlite_codebox.py")
    assert out[:-1] == [
        "1. code",
        "result: 285",
        "2. a package, then code using it",
        "Successfully installed tabulate",
        "k      v",
        "a      1",
        "b      2",
        "3. data processing",
        'stats: {"mean": 3.875, "max": 9}',
        "4. failures are output, not exceptions",
        "last line: ValueError: bad input",
        "5. isolation: a new box does not have the package",
        "tabulate in a new box: None",
    ]


def test_smolvm_basic(home: Path) -> None:
    out = run_example(home, "smolvm_basic.py")
    assert out[0] == "Hello from quick_exec!" and "exit code: 0" in out
    assert any(line.startswith("uname: Linux example-machine ") for line in out)
    assert "state: running" in out


def test_smolvm_cleanup(home: Path) -> None:
    out = run_example(home, "smolvm_cleanup.py")
    assert out[:-1] == [
        "with_machine: hi",
        "workdir: /tmp",
        "after stop: stopped",
        "after restart: again",
        "cleanup-a: gone",
        "cleanup-b: gone",
    ]


def test_smolvm_error_handling(home: Path) -> None:
    out = run_example(home, "smolvm_error_handling.py")
    assert out[0].startswith("ConnectionError: no hutch server answers at http://localhost:9999")
    assert out[1:-1] == [
        "ExecutionError: exit_code=42 stdout='' stderr='error'",
        "failed without raising: exit_code=1",
        "NotFoundError: no box with id or name 'nonexistent-machine-12345'",
        "SmolvmError: NotFoundError",
    ]


def test_examples_leave_no_boxes(home: Path) -> None:
    """Run last in this module: every example cleaned up after itself."""
    import hutch.runtime.store as store_mod
    from hutch.paths import HutchPaths

    store = store_mod.BoxStore.for_home(HutchPaths(home))
    try:
        assert [(r.name, r.state) for r in store.list()] == []
    finally:
        store.close()
