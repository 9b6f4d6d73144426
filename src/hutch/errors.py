"""The one exception tree of hutch.

Every error carries a ``hint``: what the user can do about it. ``http_status`` (a class attribute,
the one mapping) is the status the server (a later issue) will send it as.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence


class HutchError(Exception):
    """Base of every hutch error."""

    http_status: int = 500
    default_hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\nhint: {self.hint}"
        return self.message


class ConnectionError(HutchError, builtins.ConnectionError):
    http_status = 503
    default_hint = "Check that the hutch server is running and reachable."


class TimeoutError(HutchError, builtins.TimeoutError):
    http_status = 408
    default_hint = "Raise the timeout, or check the console log for where the guest stalled."


class NotFoundError(HutchError):
    http_status = 404
    default_hint = "Check the name; `hutch ps -a` lists boxes and `hutch images` images."


class ConflictError(HutchError):
    http_status = 409
    default_hint = "Pick another name, or remove what holds this one first."


class InvalidStateError(HutchError):
    http_status = 409
    default_hint = "Check the box's state (`hutch ps -a`); start or stop it first."


class BadRequestError(HutchError):
    http_status = 400
    default_hint = "Fix the request as the message says."


class ConfigError(BadRequestError):
    http_status = 400
    default_hint = "Fix the option or config.toml key the message names."


class GuestPermissionError(BadRequestError):
    """The guest refused a file operation (``EACCES``/``EPERM``/``EROFS``)."""

    http_status = 403
    default_hint = "Check the guest path's owner and mode, and whether it is on a read-only volume."


class UnauthorizedError(HutchError):
    http_status = 401
    default_hint = (
        "Check the credentials (config.toml [registries], ~/.docker/config.json, the token)."
    )


class ImageError(HutchError):
    http_status = 400
    default_hint = "The image is invalid or could not be fetched; see the message."


class StorageError(HutchError):
    http_status = 500
    default_hint = "Free disk space (`hutch prune`) or make HUTCH_HOME writable."


class NetworkError(HutchError):
    http_status = 500
    default_hint = "Check that the host is reachable; retrying resumes where it stopped."


class PortalError(HutchError):
    """The host↔guest channel broke or the guest sent something invalid."""

    http_status = 500
    default_hint = "The guest agent misbehaved or died; see the box's console log. Run `hutch setup` if the agent is outdated."


class EngineError(HutchError):
    """QEMU could not be started or died."""

    http_status = 500
    default_hint = "Run `hutch doctor` to check QEMU, the kernel and the accelerator."


class UnsupportedEngineError(EngineError):
    http_status = 500
    default_hint = "Use accel='auto' or 'tcg'; `hutch doctor` says why KVM is not usable."


class SetupError(HutchError):
    """Host set-up (packages, kernel, agent, images) failed or is missing."""

    http_status = 500
    default_hint = "Run `hutch setup` (as root, or after installing the packages it names)."


class ParseError(BadRequestError):
    """Text that should follow a grammar does not (an image reference, a size, a listen address)."""

    http_status = 400
    default_hint = "The input could not be parsed; check its format."


class OutputLimitError(HutchError):
    """A buffered exec produced more output than its limit."""

    http_status = 400
    default_hint = "Use spawn() to stream large output, or raise max_output_bytes."


class InternalError(HutchError):
    http_status = 500
    default_hint = "This is a bug in hutch: please report it with the message."


def status_table() -> dict[str, int]:
    """The one mapping of error classes to HTTP statuses (what the server sends)."""
    out: dict[str, int] = {}
    todo: list[type[HutchError]] = [HutchError]
    while todo:
        cls = todo.pop()
        if cls.__module__ == __name__:  # (facade subclasses, e.g. hutch.compat's, map alike)
            out[cls.__name__] = cls.http_status
        todo.extend(cls.__subclasses__())
    return dict(sorted(out.items()))


class ExecutionError(HutchError):
    """A command exited unsuccessfully (raised by ``ExecResult.assert_success``)."""

    http_status = 500

    def __init__(
        self,
        command: Sequence[str],
        exit_code: int | None,
        stdout: str,
        stderr: str,
        *,
        signal: int | None = None,
        hint: str | None = None,
    ) -> None:
        self.command = list(command)
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr
        self.signal = signal
        how = f"was killed by signal {signal}" if signal is not None else f"exited with {exit_code}"
        tail = stderr.strip().splitlines()[-5:]
        msg = f"command {self.command!r} {how}"
        if tail:
            msg += ":\n  " + "\n  ".join(tail)
        super().__init__(msg, hint=hint or "Inspect stdout/stderr on this error.")
