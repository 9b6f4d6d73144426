"""Blocking facade over the async API: ``from hutch.sync import Box``.

One mechanism, not a second implementation: every async object is wrapped in :class:`Synced`, which
runs its coroutine methods on one private event-loop thread and wraps what they return (an
:class:`~hutch.execution.Execution` becomes a synced one; async iterators become plain iterators).
Because the loop lives in its own thread, the facade also works where the caller's thread already
runs an event loop (Jupyter, async frameworks) — the call simply blocks that thread.

The loop thread lives as long as the process: QEMU processes are tied to the thread that started
them (``--pdeathsig``), so that thread must not come and go.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from collections.abc import Coroutine, Iterator
from types import TracebackType
from typing import Any, TypeVar

from hutch import box as _box
from hutch import codebox as _codebox
from hutch import execution as _execution
from hutch import files as _files
from hutch.client import execution as _client_execution
from hutch.client import runtime as _client_runtime
from hutch.errors import InvalidStateError
from hutch.execution import ExecResult
from hutch.runtime import runtime as _runtime

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def _get_loop() -> asyncio.AbstractEventLoop:
    global _loop, _thread
    with _lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="hutch-sync-loop", daemon=True)
            thread.start()
            _loop, _thread = loop, thread
        return _loop


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on hutch's loop thread and block until it finishes."""
    loop = _get_loop()
    if threading.current_thread() is _thread:
        coro.close()
        raise InvalidStateError(
            "hutch.sync was called from inside hutch's own event loop",
            hint="Inside async code use the async API (hutch.Box) directly.",
        )
    return asyncio.run_coroutine_threadsafe(coro, loop).result()


_WRAPPED: tuple[type, ...] = (
    _runtime.Runtime,
    _client_runtime.RemoteRuntime,
    _client_runtime.RemoteBox,
    _client_execution.RemoteExecution,
    _client_execution.RemoteOutputStream,
    _client_execution.RemoteInputStream,
    _box.Box,
    _codebox.CodeBox,
    _execution.Execution,
    _execution.OutputStream,
    _execution.InputStream,
    _files.Files,
    _files.FileReader,
)


def _wrap(value: Any) -> Any:
    if isinstance(value, _WRAPPED):
        return Synced(value)
    if isinstance(value, list) and any(isinstance(v, _WRAPPED) for v in value):
        return [_wrap(v) for v in value]  # e.g. Box.fork(n)
    return value


class Synced:
    """A blocking view of an async hutch object (attributes pass through, coroutines block)."""

    __slots__ = ("_target",)

    def __init__(self, target: Any) -> None:
        object.__setattr__(self, "_target", target)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if inspect.iscoroutinefunction(attr):

            @functools.wraps(attr)
            def blocking(*args: Any, **kwargs: Any) -> Any:
                return _wrap(run(attr(*args, **kwargs)))

            return blocking
        if inspect.ismethod(attr):  # e.g. files.read_stream(): a reader to iterate blocking

            @functools.wraps(attr)
            def wrapped(*args: Any, **kwargs: Any) -> Any:
                return _wrap(attr(*args, **kwargs))

            return wrapped
        return _wrap(attr)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._target, name, value)

    def __enter__(self) -> Any:
        run(self._target.__aenter__())
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        run(self._target.__aexit__(et, e, tb))

    def __iter__(self) -> Iterator[Any]:
        ait = self._target.__aiter__()
        while True:
            try:
                yield run(ait.__anext__())
            except StopAsyncIteration:
                return

    def __repr__(self) -> str:
        return f"sync:{self._target!r}"


class Box(Synced):
    """Blocking :class:`hutch.Box`: ``with Box() as box: box.exec("uname", "-a")``."""

    __slots__ = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Same arguments as :class:`hutch.Box`."""
        super().__init__(_box.Box(*args, **kwargs))

    def __enter__(self) -> Box:
        run(self._target.start())
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        run(self._target.remove())

    # Explicit signatures for the most used calls (the rest pass through __getattr__).
    def exec(self, *cmd: Any, **kwargs: Any) -> ExecResult:
        result: ExecResult = run(self._target.exec(*cmd, **kwargs))
        return result


class CodeBox(Box):
    """Blocking :class:`hutch.CodeBox`: ``with CodeBox() as box: box.run("print(1)")``."""

    __slots__ = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Same arguments as :class:`hutch.CodeBox`."""
        Synced.__init__(self, _codebox.CodeBox(*args, **kwargs))

    def __enter__(self) -> CodeBox:
        run(self._target.start())
        return self


class Runtime(Synced):
    """Blocking :class:`hutch.Runtime`: ``with Runtime() as rt: rt.create(image=…)``."""

    __slots__ = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Same arguments as :class:`hutch.Runtime`."""
        super().__init__(_runtime.Runtime(*args, **kwargs))

    @classmethod
    def default(cls) -> Runtime:
        rt = cls.__new__(cls)
        Synced.__init__(rt, _runtime.Runtime.default())
        return rt

    def __enter__(self) -> Runtime:
        run(self._target.open())
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        run(self._target.close())


class RemoteRuntime(Synced):
    """Blocking :func:`hutch.connect`: ``with hutch.sync.connect(url) as rt: rt.create(…)``."""

    __slots__ = ()

    def __enter__(self) -> RemoteRuntime:
        run(self._target.open())
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        run(self._target.close())


def connect(url: str | None = None, **kwargs: Any) -> RemoteRuntime:
    """The blocking twin of :func:`hutch.connect` (same arguments)."""
    from hutch.client import connect as _connect

    return RemoteRuntime(_connect(url, **kwargs))


__all__ = [
    "Box",
    "CodeBox",
    "ExecResult",
    "RemoteRuntime",
    "Runtime",
    "Synced",
    "connect",
    "run",
]
