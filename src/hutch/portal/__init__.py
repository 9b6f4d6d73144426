"""The host↔guest portal: frame codec and multiplexed channel (wire format: docs/PROTOCOL.md)."""

from hutch.portal.channel import (
    ExitInfo,
    Hello,
    Identity,
    PortalChannel,
    ProcessStream,
    SpawnRequest,
)
from hutch.portal.codec import PROTOCOL_VERSION

__all__ = [
    "PROTOCOL_VERSION",
    "ExitInfo",
    "Hello",
    "Identity",
    "PortalChannel",
    "ProcessStream",
    "SpawnRequest",
]
