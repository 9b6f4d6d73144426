"""Boxes boot from stored images and honour their config (Entrypoint, Cmd, Env, WorkingDir, User)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import hutch
from hutch.images.sources import load
from hutch.images.store import ImageStore
from hutch.paths import HutchPaths
from tests.conftest import hutch_cli
from tests.support.homes import make_home
from tests.support.images import busybox_layer, write_docker_save, write_oci_layout

pytestmark = pytest.mark.vm

CONFIG = {
    "Env": ["PATH=/bin:/usr/bin", "GREETING=hi"],
    "WorkingDir": "/home/app",
    "User": "app",
    "Entrypoint": ["/bin/sh", "-c"],
    "Cmd": ['echo "$GREETING from $(pwd) as $(id -u)"'],
}


@pytest.fixture(scope="module")
def image_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A hutch home of its own (so tests never touch the user's image store) that shares the
    set-up artifacts of the default home."""
    home = make_home(tmp_path_factory.mktemp("home"))
    layout = home.parent / "cfg-layout"
    write_oci_layout(layout, [busybox_layer()], CONFIG)
    load(layout, store=ImageStore(HutchPaths(home)), tag="localhost/cfg:1")
    yield home


async def test_image_config_is_honoured(image_home: Path) -> None:
    async with hutch.Box("localhost/cfg:1", home=image_home) as box:
        assert box.image_record is not None and box.image_record.config.user == "app"
        default = await box.exec()  # Entrypoint + Cmd
        assert default.stdout == "hi from /home/app as 1234\n", default.stderr
        assert (await box.exec("id", "-u")).stdout == "1234\n"
        assert (await box.exec("id", "-u", user="root")).stdout == "0\n"
        assert (await box.exec("pwd", cwd="/tmp")).stdout == "/tmp\n"
        env = await box.exec("sh", "-c", "echo $GREETING-$EXTRA", env={"EXTRA": "x"})
        assert env.stdout == "hi-x\n"
        over = await box.exec("sh", "-c", "echo $GREETING", env={"GREETING": "bye"})
        assert over.stdout == "bye\n"
        assert box.image_ms is not None and box.image_ms < 1000


def test_cli_run_uses_entrypoint_and_cmd(image_home: Path) -> None:
    env = {"HUTCH_HOME": str(image_home)}
    default = hutch_cli("run", "localhost/cfg:1", env_extra=env)
    assert default.returncode == 0, default.stderr
    assert default.stdout == b"hi from /home/app as 1234\n"
    # CMD replaces the image's Cmd; the Entrypoint (sh -c) stays
    other = hutch_cli("run", "localhost/cfg:1", "--", "echo other $GREETING", env_extra=env)
    assert other.stdout == b"other hi\n", other.stderr
    # --entrypoint replaces the Entrypoint and drops the image's Cmd
    plain = hutch_cli(
        "run", "--entrypoint", "", "localhost/cfg:1", "--", "uname", "-s", env_extra=env
    )
    assert plain.stdout == b"Linux\n", plain.stderr


def test_cli_images_inspect_rmi(image_home: Path) -> None:
    env = {"HUTCH_HOME": str(image_home)}
    listing = hutch_cli("images", env_extra=env)
    assert listing.returncode == 0 and b"localhost/cfg:1" in listing.stdout
    inspect = hutch_cli("inspect", "localhost/cfg:1", env_extra=env)
    assert b'"user": "app"' in inspect.stdout
    saved = image_home.parent / "saved.tar"
    write_docker_save(saved, [busybox_layer()], {"Cmd": ["true"]}, ["saved:1"])
    loaded = hutch_cli("load", str(saved), "-t", "localhost/loaded:2", env_extra=env)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.startswith(b"loaded localhost/loaded:2 sha256:")
    bad = hutch_cli("load", str(image_home / "config.toml"), env_extra=env)
    assert bad.returncode == 125 and b"neither a folder nor a tar" in bad.stderr
    missing = hutch_cli("rmi", "localhost/nope:1", env_extra=env)
    assert missing.returncode == 125 and b"hutch pull" in missing.stderr
    assert os.path.isdir(image_home / "images")
