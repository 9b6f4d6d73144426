"""BoxLite's low-level API (runtime, Box, Execution, metrics), on hutch: only the import differs."""

import asyncio

import hutch.compat.boxlite as boxlite

IMAGE = "busybox"


async def basic_and_streaming(runtime: boxlite.Boxlite) -> None:
    box = await runtime.create(boxlite.BoxOptions(image=IMAGE))
    execution = await box.exec("sh", ["-c", "echo one; echo two; echo oops >&2"])
    print(f"execution id: {execution.id}")
    async for line in execution.stdout():
        print(f"stdout: {line.strip()}")
    async for line in execution.stderr():
        print(f"stderr: {line.strip()}")
    result = await execution.wait()
    print(f"exit code: {result.exit_code}")
    info = box.info()
    print(
        f"info: status={info.state.status} image={info.image} cpus={info.cpus} "
        f"memory={info.memory_mib}"
    )
    await box.stop()


async def environment(runtime: boxlite.Boxlite) -> None:
    box = await runtime.create(boxlite.BoxOptions(image=IMAGE, cpus=1, memory_mib=256))
    execution = await box.exec("env", None, [("CUSTOM", "value")])
    lines = [line.strip() async for line in execution.stdout()]
    await execution.wait()
    print([line for line in lines if line.startswith("CUSTOM=")])
    await box.stop()


async def metrics(runtime: boxlite.Boxlite) -> None:
    box = await runtime.create(boxlite.BoxOptions(image=IMAGE))
    for cmd in (["true"], ["echo", "hi"], ["sh", "-c", "exit 3"]):
        execution = await box.exec(cmd[0], cmd[1:])
        async for _ in execution.stdout():
            pass
        await execution.wait()
    m = await box.metrics()
    print(f"commands_executed_total={m.commands_executed_total}")
    print(f"exec_errors_total={m.exec_errors_total}")
    print(f"total_create_duration_ms={m.total_create_duration_ms}")
    print(f"guest_boot_duration_ms={m.guest_boot_duration_ms}")
    if m.cpu_percent is not None:
        print(f"cpu_percent={m.cpu_percent}")
    if m.memory_bytes is not None:
        print(f"memory_bytes={m.memory_bytes}")
    await box.stop()
    rm = await runtime.metrics()
    print(f"boxes_created_total={rm.boxes_created_total}")
    print(f"boxes_failed_total={rm.boxes_failed_total}")
    print(f"num_running_boxes={rm.num_running_boxes}")
    print(f"total_commands_executed={rm.total_commands_executed}")
    print(f"total_exec_errors={rm.total_exec_errors}")


async def listing(runtime: boxlite.Boxlite) -> None:
    boxes = [
        await runtime.create(boxlite.BoxOptions(image=IMAGE, auto_remove=False), name=f"list-{i}")
        for i in range(2)
    ]
    try:
        for info in await runtime.list_info():
            print(f"listed: {info.name} {info.state.status}")
    finally:
        for box in boxes:
            try:
                await runtime.remove(box.id, force=True)
            except Exception as e:
                print(f"cleanup failed: {e}")


async def kill_a_command(runtime: boxlite.Boxlite) -> None:
    box = await runtime.create(boxlite.BoxOptions(image=IMAGE))
    execution = await box.exec("sh", ["-c", "sleep 100"])
    await asyncio.sleep(0.5)
    await execution.kill()
    result = await execution.wait()
    print(f"killed: exit code {result.exit_code}")
    await box.stop()


async def context_manager(runtime: boxlite.Boxlite) -> None:
    async with await runtime.create(boxlite.BoxOptions(image=IMAGE, working_dir="/tmp")) as box:
        execution = await box.exec("pwd", None, None)
        print(f"pwd: {''.join([line async for line in execution.stdout()]).strip()}")
        await execution.wait()


async def terminal(runtime: boxlite.Boxlite) -> None:
    box = await runtime.create(boxlite.BoxOptions(image=IMAGE))
    execution = await box.exec("sh", ["-c", "stty size; read line; stty size"], tty=True)
    lines = aiter(execution.stdout())
    print(f"tty size: {(await anext(lines)).strip()}")
    await execution.resize_tty(40, 100)
    await execution.stdin().send_input("go\n")
    rest = [line.strip() async for line in lines]
    print(f"tty resized: {rest[-1]}")
    await execution.wait()
    await box.stop()


async def main() -> None:
    runtime = boxlite.Boxlite.default()
    await basic_and_streaming(runtime)
    await environment(runtime)
    await metrics(runtime)
    await listing(runtime)
    await kill_a_command(runtime)
    await context_manager(runtime)
    await terminal(runtime)
    print("done")


if __name__ == "__main__":
    asyncio.run(main())
