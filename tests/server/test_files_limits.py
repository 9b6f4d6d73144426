"""File uploads through a real ``hutch serve`` have their own size limit (``--max-upload-mib``),
not the 16 MiB request-body limit; over it the upload is refused and no partial file is left.
A missing box is a 404."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from hutch.client import connect
from hutch.errors import BadRequestError, NotFoundError
from tests.support.homes import make_home
from tests.support.server import ServerProcess

pytestmark = [pytest.mark.vm, pytest.mark.server]

MIB = 1 << 20


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    home = make_home(tmp_path_factory.mktemp("srv-upload") / "home")
    server = ServerProcess(home, "--max-upload-mib", "20").start()
    try:
        yield server
    finally:
        server.stop()


async def test_upload_limit_and_missing_box(small_server: ServerProcess, tmp_path: Path) -> None:
    async with connect(small_server.url) as rt:
        with pytest.raises(NotFoundError):
            await (await rt.get("nobody")).files.stat("/")
        box = await rt.create(image="busybox", name="uploads")
        await box.start()
        try:
            # over the 16 MiB body limit, under the 20 MiB upload limit: fine
            assert await box.files.write("/root/ok.bin", b"x" * (18 * MIB)) == 18 * MIB

            async def too_much() -> AsyncIterator[bytes]:
                for _ in range(25):
                    yield b"y" * MIB

            with pytest.raises(BadRequestError, match="upload limit of 20971520 bytes"):
                await box.files.write("/root/big.bin", too_much())
            assert not await box.files.exists("/root/big.bin")
            assert (await box.files.stat("/root/ok.bin")).size == 18 * MIB
        finally:
            await rt.remove(box.id, force=True)
