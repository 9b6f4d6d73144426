"""Facades for users of the two seed SDKs: code written for them runs with only the import changed.

- :mod:`hutch.compat.boxlite` — ``Boxlite.default()``, ``BoxOptions``, ``SimpleBox``, ``CodeBox``,
  the native ``Box``/``Execution`` and BoxLite's metrics and errors.
- :mod:`hutch.compat.smolvm` — ``Machine``, ``MachineConfig``, ``with_machine``, ``quick_exec`` and
  smolvm's errors.

Both are thin adapters over the native API (:class:`hutch.Runtime`, :class:`hutch.Box`, or a
remote runtime from :func:`hutch.client.connect`): they translate arguments and results, and
re-raise every :class:`hutch.HutchError` as the facade's own error class — which also subclasses
the matching hutch class, so ``except hutch.NotFoundError`` keeps working on facade errors.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import ParamSpec, TypeVar

from hutch.errors import HutchError

P = ParamSpec("P")
T = TypeVar("T")


def translate(
    error: HutchError,
    mapping: Mapping[type[HutchError], type[HutchError]],
    fallback: type[HutchError],
) -> HutchError:
    """The facade error for ``error``: the mapping entry of its nearest class, else ``fallback``.

    Facade classes keep hutch's ``(message, hint=)`` constructor; the original error is chained
    by the caller (``raise … from error``)."""
    if isinstance(error, fallback):
        return error  # already a facade error
    for cls in type(error).__mro__:
        target = mapping.get(cls)
        if target is not None:
            return target(error.message, hint=error.hint)
    return fallback(error.message, hint=error.hint)


def translating(
    mapping: Mapping[type[HutchError], type[HutchError]], fallback: type[HutchError]
) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """Decorate an async facade method so hutch errors leave it as facade errors."""

    def wrap(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(fn)
        async def inner(*args: P.args, **kwargs: P.kwargs) -> T:
            try:
                return await fn(*args, **kwargs)
            except HutchError as e:
                mapped = translate(e, mapping, fallback)
                if mapped is e:
                    raise
                raise mapped from e

        return inner

    return wrap
