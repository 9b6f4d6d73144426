"""BoxLite's documented error handling and retry patterns, on hutch: only the import differs."""

import asyncio

import hutch.compat.boxlite as boxlite
from hutch.compat.boxlite import BoxliteError, ExecError
from hutch.compat.boxlite import TimeoutError as BoxliteTimeoutError

IMAGE = "busybox"


async def run_checked(box: boxlite.SimpleBox, cmd: str, *args: str) -> boxlite.ExecResult:
    """exec() never raises on a non-zero exit: promote failures to ExecError."""
    result = await box.exec(cmd, *args)
    if result.exit_code != 0:
        raise ExecError(
            command=" ".join([cmd, *args]), exit_code=result.exit_code, stderr=result.stderr
        )
    return result


async def with_retries(make_call, attempts: int = 4, backoff: float = 0.05):
    for attempt in range(1, attempts + 1):
        try:
            return await make_call()
        except ExecError as e:
            print(f"attempt {attempt} failed with exit code {e.exit_code}")
            if attempt == attempts:
                raise
            await asyncio.sleep(backoff * 2 ** (attempt - 1))


async def main() -> None:
    async with boxlite.SimpleBox(image=IMAGE) as box:
        try:
            await run_checked(box, "sh", "-c", "echo broken >&2; exit 7")
        except ExecError as e:
            print(
                f"ExecError: command={e.command!r} exit_code={e.exit_code} "
                f"stderr={e.stderr.strip()!r}"
            )

        try:
            await box.exec("sleep", "30", timeout=1)
        except BoxliteTimeoutError as e:
            print(f"TimeoutError: {str(e).splitlines()[0]}")

        try:
            await box.exec("no-such-program")
        except ExecError:
            print("unexpected")
        except BoxliteTimeoutError:
            print("unexpected")
        except BoxliteError as e:
            print(f"BoxliteError: {type(e).__name__}")
        except RuntimeError as e:
            print(f"RuntimeError: {e}")

        # A flaky step that succeeds on its third try.
        flaky = (
            "sh",
            "-c",
            "n=$(cat /tmp/n 2>/dev/null || echo 0); n=$((n+1)); " "echo $n > /tmp/n; [ $n -ge 3 ]",
        )
        await with_retries(lambda: run_checked(box, *flaky))
        print(f"succeeded after {(await box.exec('cat', '/tmp/n')).stdout.strip()} attempts")

    try:
        async with boxlite.SimpleBox(image="Not_A_Reference") as box:
            await box.exec("true")
    except BoxliteError as e:
        print(f"bad image: {type(e).__name__}")
    print("done")


if __name__ == "__main__":
    asyncio.run(main())
