"""smolvm's cleanup patterns (with_machine, try/finally, close), on hutch: only the import differs."""

import asyncio

from hutch.compat.smolvm import Machine, MachineConfig, NotFoundError, with_machine


async def main() -> None:
    async with with_machine(MachineConfig(name="cleanup-a")) as machine:
        result = await machine.exec(["sh", "-c", "echo $GREETING"], env={"GREETING": "hi"})
        print(f"with_machine: {result.stdout.strip()}")

    machine = await Machine.create(MachineConfig(name="cleanup-b"))
    try:
        result = await machine.exec(["pwd"], workdir="/tmp")
        print(f"workdir: {result.stdout.strip()}")
        await machine.stop()
        print(f"after stop: {(await machine.status()).state.value}")
        result = await machine.exec(["echo", "again"])  # starts it again
        print(f"after restart: {result.stdout.strip()}")
    finally:
        await machine.delete()
        await machine.close()

    for name in ("cleanup-a", "cleanup-b"):
        try:
            await Machine(MachineConfig(name=name)).status()
            print(f"{name}: still there")
        except NotFoundError:
            print(f"{name}: gone")

    never_started = Machine(MachineConfig(name="cleanup-c"))
    await never_started.close()
    print("done")


if __name__ == "__main__":
    asyncio.run(main())
