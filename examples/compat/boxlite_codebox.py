"""BoxLite's CodeBox walk-through, on hutch: only the import differs."""

import asyncio

import hutch.compat.boxlite as boxlite


async def main() -> None:
    async with boxlite.CodeBox() as cb:
        print("1. code")
        output = await cb.run("print(sum(i * i for i in range(10)))")
        print(f"result: {output.strip()}")

        print("2. a package, then code using it")
        installed = await cb.install_package("tabulate")
        print(installed.strip())
        output = await cb.run(
            "from tabulate import tabulate\n"
            "print(tabulate([['a', 1], ['b', 2]], headers=['k', 'v'], tablefmt='plain'))"
        )
        print(output.rstrip())

        print("3. data processing")
        output = await cb.run(
            "import json, statistics\n"
            "data = [3, 1, 4, 1, 5, 9, 2, 6]\n"
            "print(json.dumps({'mean': statistics.mean(data), 'max': max(data)}))"
        )
        print(f"stats: {output.strip()}")

        print("4. failures are output, not exceptions")
        output = await cb.run("raise ValueError('bad input')")
        print(f"last line: {output.strip().splitlines()[-1]}")

    print("5. isolation: a new box does not have the package")
    async with boxlite.CodeBox() as cb:
        output = await cb.run("import importlib.util; print(importlib.util.find_spec('tabulate'))")
        print(f"tabulate in a new box: {output.strip()}")
    print("done")


if __name__ == "__main__":
    asyncio.run(main())
