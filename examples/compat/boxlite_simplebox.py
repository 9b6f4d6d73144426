"""BoxLite's SimpleBox walk-through, on hutch: only the import (and the image) differ."""

import asyncio

import hutch.compat.boxlite as boxlite

IMAGE = "busybox"


async def main() -> None:
    print("1. a command")
    async with boxlite.SimpleBox(image=IMAGE) as box:
        result = await box.exec("ls", "-l", "/")
        print(result.stdout)
        print(f"exit code: {result.exit_code}")

    print("2. stdout and stderr apart")
    async with boxlite.SimpleBox(image=IMAGE) as box:
        result = await box.exec("sh", "-c", "echo out && echo err >&2")
        print(f"stdout={result.stdout.strip()} stderr={result.stderr.strip()}")

    print("3. environment per command")
    async with boxlite.SimpleBox(image=IMAGE) as box:
        result = await box.exec("env", env={"FOO": "bar", "BAZ": "qux"})
        print([line for line in result.stdout.splitlines() if line.startswith(("FOO=", "BAZ="))])

    print("4. working directory and environment per box")
    async with boxlite.SimpleBox(
        image=IMAGE, working_dir="/tmp", env=[("USER", "alice"), ("LANG", "C")]
    ) as box:
        print(f"pwd={(await box.exec('pwd')).stdout.strip()}")
        print(f"user={(await box.exec('sh', '-c', 'echo $USER')).stdout.strip()}")

    print("5. exit codes are results, not exceptions")
    async with boxlite.SimpleBox(image=IMAGE) as box:
        failed = await box.exec("false")
        ok = await box.exec("true")
        print(f"false -> {failed.exit_code}, true -> {ok.exit_code}")
        assert failed.exit_code != 0 and ok.exit_code == 0

    print("6. reusing a named box")
    async with boxlite.SimpleBox(image=IMAGE, name="reuse-demo", reuse_existing=True) as box1:
        print(f"box1 created={box1.created}")
        await box1.exec("sh", "-c", "echo marker > /root/marker")
        async with boxlite.SimpleBox(image=IMAGE, name="reuse-demo", reuse_existing=True) as box2:
            print(f"box2 created={box2.created} same={box2.id == box1.id}")
            print(f"marker={(await box2.exec('cat', '/root/marker')).stdout.strip()}")

    print("7. a pipeline of commands")
    async with boxlite.SimpleBox(image=IMAGE) as box:
        await box.exec("sh", "-c", "seq 1 100 > /tmp/numbers")
        total = await box.exec("sh", "-c", "awk '{s+=$1} END {print s}' /tmp/numbers")
        print(f"sum={total.stdout.strip()}")
        print((await box.exec("free", "-m")).stdout.splitlines()[0])
    print("done")


if __name__ == "__main__":
    asyncio.run(main())
