"""hutch.CodeBox on the built-in debian-python image (made on first use): code runs, packages are
installed from wheels the host's pip downloads (the guest has no network), hostile wheels are
refused."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

import hutch
from hutch.codebox import install_into
from hutch.errors import BadRequestError, ExecutionError, TimeoutError
from tests.unit.test_codebox_wheels import build_wheel, demo_wheel

pytestmark = pytest.mark.vm

PURELIB = "/usr/local/lib/python3.11/dist-packages"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def codebox(manifest: object) -> AsyncIterator[hutch.CodeBox]:
    """One booted CodeBox for this module (install tests add packages; none removes any)."""
    async with hutch.CodeBox(memory_mib=512) as box:
        yield box


async def test_run_stdout_exit_code_and_exceptions(codebox: hutch.CodeBox) -> None:
    r = await codebox.run("import sys; print(6 * 7); print('err', file=sys.stderr)")
    assert (r.exit_code, r.stdout, r.stderr) == (0, "42\n", "err\n")
    assert (await codebox.run("raise SystemExit(3)")).exit_code == 3
    boom = await codebox.run("def f():\n    raise ValueError('boom')\nf()\n")
    assert boom.exit_code == 1 and boom.stdout == ""
    assert "Traceback" in boom.stderr and boom.stderr.endswith("ValueError: boom\n")
    with pytest.raises(ExecutionError, match="ValueError: boom"):
        boom.assert_success()


async def test_run_stdin_env_cwd_timeout(codebox: hutch.CodeBox) -> None:
    r = await codebox.run(
        "import os, sys; print(sys.stdin.read().upper(), os.environ['GREETING'], os.getcwd())",
        stdin="hi",
        env={"GREETING": "hello"},
        cwd="/tmp",
    )
    assert r.stdout == "HI hello /tmp\n", r.stderr
    with pytest.raises(TimeoutError):
        await codebox.run("import time; time.sleep(60)", timeout=1)


async def test_large_code_goes_through_a_file(codebox: hutch.CodeBox) -> None:
    blob = "x" * 100_000
    code = f"import sys\ndata = {blob!r}\nprint(len(data), sys.stdin.read())\nraise KeyError('k')\n"
    assert len(code.encode()) > 64 * 1024
    r = await codebox.run(code, stdin=b"in")
    assert r.stdout == "100000 in\n"
    assert r.exit_code == 1 and "main.py" in r.stderr and "KeyError: 'k'" in r.stderr
    leftovers = await codebox.exec("sh", "-c", "ls /tmp | grep -c hutch-code || true")
    assert leftovers.stdout.strip() == "0"


async def test_run_file(codebox: hutch.CodeBox, tmp_path: Path) -> None:
    script = tmp_path / "hello_script.py"
    script.write_text("import sys\nprint('args', sys.argv[1:])\n1 / 0\n")
    r = await codebox.run_file(script)
    assert r.stdout == "args []\n" and "hello_script.py" in r.stderr
    assert "ZeroDivisionError" in r.stderr


async def test_install_hand_built_wheel(codebox: hutch.CodeBox, tmp_path: Path) -> None:
    assert await codebox.install(demo_wheel(tmp_path)) == ["hutchdemo"]
    r = await codebox.run("import hutchdemo; print(hutchdemo.VALUE, hutchdemo.__file__)")
    assert r.stdout == f"1.0 {PURELIB}/hutchdemo/__init__.py\n", r.stderr
    hello = (await codebox.exec("hutchdemo-hello")).assert_success()
    assert hello.stdout == "hello from hutchdemo 1.0\n"
    raw = (await codebox.exec("hutchdemo-raw")).assert_success()
    assert raw.stdout == "raw 1.0\n"
    head = await codebox.exec(
        "sh",
        "-c",
        f"head -1 /usr/local/bin/hutchdemo-raw; cat {PURELIB}/hutchdemo-1.0.dist-info/INSTALLER",
    )
    assert head.stdout == "#!/usr/bin/python3 -u\nhutch\n"
    # upgrading through the alias replaces the old version's files
    assert await codebox.install_package(demo_wheel(tmp_path, "2.0", extra=False)) == ["hutchdemo"]
    r = await codebox.run(
        "import os, hutchdemo; print(hutchdemo.VALUE, os.path.exists(os.path.join("
        "os.path.dirname(hutchdemo.__file__), 'extra.py')))"
    )
    assert r.stdout == "2.0 False\n", r.stderr


async def test_install_from_pypi(codebox: hutch.CodeBox) -> None:
    names = await codebox.install_packages("tabulate")
    assert names == ["tabulate"]
    r = await codebox.run(
        "import tabulate; print(tabulate.__file__); print(tabulate.tabulate([[1, 2]]))"
    )
    assert r.exit_code == 0, r.stderr
    assert r.stdout.startswith(f"{PURELIB}/tabulate/__init__.py\n") and "1  2" in r.stdout
    assert (await codebox.exec("tabulate", "--help")).exit_code == 0  # its console script


async def test_install_into_any_box(codebox: hutch.CodeBox, tmp_path: Path) -> None:
    """The function behind CodeBox.install (used for plain boxes, e.g. by hutch.compat)."""
    wheel = build_wheel(tmp_path, "hutch_plain", files={"hutch_plain.py": b"Y = 'plain'\n"})
    assert await install_into(codebox, [wheel]) == ["hutch_plain"]
    assert (await codebox.run("import hutch_plain; print(hutch_plain.Y)")).stdout == "plain\n"


async def test_install_unknown_package_is_a_bad_request(codebox: hutch.CodeBox) -> None:
    with pytest.raises(BadRequestError) as ei:
        await codebox.install("hutch-no-such-package-4f1e2d")
    assert "hutch-no-such-package-4f1e2d" in ei.value.message
    assert "No matching distribution" in ei.value.message
    assert "wheels for Linux x86_64 (glibc 2.36) / CPython 3.11" in ei.value.hint


async def test_hostile_wheel_is_refused(codebox: hutch.CodeBox, tmp_path: Path) -> None:
    good = build_wheel(tmp_path, "hutchgood", files={"hutchgood.py": b"X = 1\n"})
    evil = build_wheel(
        tmp_path, "hutchevil", files={"hutchevil.py": b"", "../../../../etc/evil": b"pwned"}
    )
    with pytest.raises(ExecutionError) as ei:
        await codebox.install(good, evil)
    assert "refusing hutchevil-1.0-py3-none-any.whl" in str(ei.value)
    assert "escapes its folder" in str(ei.value)
    assert "<hutch wheel installer>" in str(ei.value)  # not the installer's whole source
    r = await codebox.exec(
        "sh",
        "-c",
        f"ls /etc/evil /usr/local/etc/evil {PURELIB}/hutchgood.py {PURELIB}/hutchevil.py",
    )
    assert r.exit_code != 0 and r.stdout == "", r.stdout
    assert (await codebox.run("import hutchgood")).exit_code == 1  # the whole batch was refused
