"""smolvm's basic example, on hutch: only the import differs (no server needed: embedded)."""

import asyncio

from hutch.compat.smolvm import Machine, MachineConfig, quick_exec


async def main() -> None:
    result = await quick_exec(["echo", "Hello from quick_exec!"])
    print(result.stdout.strip())
    print(f"exit code: {result.exit_code}")

    async with Machine(MachineConfig(name="example-machine")) as machine:
        await machine.start()
        result = await machine.exec(["uname", "-a"])
        print(f"uname: {result.stdout.strip()}")
        result = await machine.exec(["ls", "-la", "/"])
        print(f"ls lines: {len(result.stdout.splitlines())}")
        print(f"state: {machine.state.value}")
    print("done")


if __name__ == "__main__":
    asyncio.run(main())
