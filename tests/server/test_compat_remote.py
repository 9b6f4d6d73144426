"""The smolvm facade with a ``server_url``: the same program drives boxes of a real `hutch serve`."""

from __future__ import annotations

import pytest

from hutch.compat import smolvm
from tests.support.server import ServerProcess

pytestmark = [pytest.mark.vm, pytest.mark.server]


async def test_smolvm_machine_through_the_server(unix_server: ServerProcess) -> None:
    config = smolvm.MachineConfig(name="smol-remote", server_url=unix_server.url)
    async with smolvm.Machine(config) as machine:
        await machine.start()
        result = await machine.exec(["sh", "-c", "echo $X; exit 4"], env={"X": "remote"})
        assert (result.exit_code, result.stdout) == (4, "remote\n")
        with pytest.raises(smolvm.ExecutionError):
            result.assert_success()
        info = await machine.status()
        assert info.state is smolvm.MachineState.RUNNING
        # The box lives in the server's home, owned by the server process.
        with unix_server.http() as c:
            [row] = [b for b in c.get("/v1/boxes").json() if b["name"] == "smol-remote"]
            assert row["state"] == "running" and row["owner_pid"] == unix_server.proc.pid  # type: ignore[union-attr]
    with pytest.raises(smolvm.NotFoundError):
        await smolvm.Machine(config).status()
    with pytest.raises(smolvm.BadRequestError, match="cpus"):
        await smolvm.Machine(
            smolvm.MachineConfig(
                name="too-big",
                server_url=unix_server.url,
                resources=smolvm.ResourceSpec(cpus=4096),
            )
        ).start()
