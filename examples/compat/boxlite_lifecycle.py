"""BoxLite's lifecycle and cleanup patterns, on hutch: only the import differs."""

import asyncio
import contextlib

import hutch.compat.boxlite as boxlite

IMAGE = "busybox"


async def main() -> None:
    runtime = boxlite.Boxlite.default()
    box = await runtime.create(boxlite.BoxOptions(image=IMAGE, auto_remove=False, cpus=1))
    box_id = box.id
    try:
        execution = await box.exec("sh", ["-c", "echo persisted > /root/test.txt"])
        await execution.wait()
        print(f"state before stop: {box.info().state.status}")
        await box.stop()
        info = await runtime.get_info(box_id)
        print(f"state after stop: {info.state.status}")

        again = await runtime.get(box_id)
        execution = await again.exec("cat", ["/root/test.txt"])  # restarts the box
        content = "".join([line async for line in execution.stdout()])
        await execution.wait()
        print(f"file after restart: {content.strip()}")

        try:
            await runtime.remove(box_id, force=False)
        except Exception as e:
            print(f"remove of a running box refused: {type(e).__name__}")
        await runtime.remove(box_id, force=True)
        print(f"after remove: {await runtime.get_info(box_id)}")
    except Exception:
        with contextlib.suppress(Exception):
            await box.stop()
        with contextlib.suppress(Exception):
            await runtime.remove(box_id, force=True)
        raise

    print(f"unknown box: {await runtime.get('non-existent-id')}")
    try:
        await runtime.remove("non-existent-id")
    except boxlite.BoxliteError as e:
        print(f"remove unknown: {type(e).__name__}")

    ephemeral = await runtime.create(boxlite.BoxOptions(image=IMAGE))  # auto_remove=True
    await ephemeral.stop()
    print(f"auto_remove after stop: {await runtime.get_info(ephemeral.id)}")
    await runtime.shutdown()
    print("done")


if __name__ == "__main__":
    asyncio.run(main())
