"""smolvm's error-handling example, on hutch: only the import differs."""

import asyncio

from hutch.compat.smolvm import (
    ConnectionError,
    ExecutionError,
    Machine,
    MachineConfig,
    NotFoundError,
    SmolvmError,
    quick_exec,
)


async def main() -> None:
    # 1. No server at that address.
    try:
        await quick_exec(["echo", "hello"], server_url="http://localhost:9999")
    except ConnectionError as e:
        print(f"ConnectionError: {str(e).splitlines()[0]}")

    # 2. A failing command, made an exception by assert_success().
    try:
        result = await quick_exec(["sh", "-c", "echo 'error' >&2; exit 42"])
        result.assert_success()
    except ExecutionError as e:
        print(
            f"ExecutionError: exit_code={e.exit_code} stdout={e.stdout!r} "
            f"stderr={e.stderr.strip()!r}"
        )

    # 3. Checking without exceptions.
    result = await quick_exec(["sh", "-c", "exit 1"])
    if not result.success:
        print(f"failed without raising: exit_code={result.exit_code}")

    # 4. A machine that does not exist.
    machine = Machine(MachineConfig(name="nonexistent-machine-12345"))
    try:
        await machine.status()
    except NotFoundError as e:
        print(f"NotFoundError: {str(e).splitlines()[0]}")
    await machine.close()

    # 5. A command that does not exist.
    try:
        result = await quick_exec(["some-nonexistent-command"])
        result.assert_success()
    except ExecutionError as e:
        print(f"ExecutionError: exit_code={e.exit_code}")
    except SmolvmError as e:
        print(f"SmolvmError: {type(e).__name__}")
    print("done")


if __name__ == "__main__":
    asyncio.run(main())
