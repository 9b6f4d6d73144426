"""hutch: micro-VM sandboxes for Python.

``async with hutch.Box() as box: print((await box.exec("uname", "-a")).stdout)``;
the blocking twin is :mod:`hutch.sync`.
"""

from hutch.box import Box
from hutch.client import connect
from hutch.codebox import CodeBox
from hutch.errors import (
    BadRequestError,
    ConfigError,
    ConflictError,
    ConnectionError,
    EngineError,
    ExecutionError,
    GuestPermissionError,
    HutchError,
    ImageError,
    InternalError,
    InvalidStateError,
    NetworkError,
    NotFoundError,
    OutputLimitError,
    ParseError,
    PortalError,
    SetupError,
    StorageError,
    TimeoutError,
    UnauthorizedError,
    UnsupportedEngineError,
)
from hutch.execution import ExecResult, Execution
from hutch.files import FileInfo, Files, TransferReport
from hutch.runtime.options import BoxOptions, Port, Volume
from hutch.runtime.pool import PoolSpec, PoolStatus
from hutch.runtime.runtime import Runtime
from hutch.runtime.snapshots import Snapshot
from hutch.runtime.store import BoxRecord

__version__ = "0.1.0"

__all__ = [
    "BadRequestError",
    "Box",
    "BoxOptions",
    "BoxRecord",
    "CodeBox",
    "ConfigError",
    "ConflictError",
    "ConnectionError",
    "EngineError",
    "ExecResult",
    "Execution",
    "ExecutionError",
    "FileInfo",
    "Files",
    "GuestPermissionError",
    "HutchError",
    "ImageError",
    "InternalError",
    "InvalidStateError",
    "NetworkError",
    "NotFoundError",
    "OutputLimitError",
    "ParseError",
    "PoolSpec",
    "PoolStatus",
    "Port",
    "PortalError",
    "Runtime",
    "SetupError",
    "Snapshot",
    "StorageError",
    "TimeoutError",
    "TransferReport",
    "UnauthorizedError",
    "UnsupportedEngineError",
    "Volume",
    "__version__",
    "connect",
]
