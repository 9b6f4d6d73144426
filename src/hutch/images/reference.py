"""Image references, normalised the way Docker does it.

``busybox`` → ``docker.io/library/busybox:latest``; ``ghcr.io/org/app@sha256:…``;
``localhost:5000/team/tool:1.2``; ``[::1]:5000/x``. The grammar follows the OCI distribution
reference grammar (lower-case path components joined by ``.``, ``_``, ``__`` or dashes; tags of up
to 128 word characters; ``algorithm:hex`` digests). Hand-written rather than a dependency: it is one
regular expression per part, and every rejection has to say *why* in a :class:`ParseError` (a BadRequestError).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hutch.errors import ParseError

DOCKER_HUB = "docker.io"
#: Where Docker Hub's registry API actually answers.
DOCKER_HUB_API = "registry-1.docker.io"
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}
DEFAULT_TAG = "latest"
MAX_NAME = 255

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}")
_HOST = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])"
    r"(?::[0-9]{1,5})?"
)
_HINT = "Use NAME[:TAG][@DIGEST], e.g. busybox, python:3.12-slim, localhost:5000/team/app:1.0."


def _bad(text: str, why: str) -> ParseError:
    return ParseError(f"invalid image reference {text!r}: {why}", hint=_HINT)


@dataclass(frozen=True)
class ImageReference:
    """A parsed, normalised reference. ``str()`` gives the canonical form."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """The host[:port] whose ``/v2/`` API serves this image."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def selector(self) -> str:
        """What to ask the registry's manifest endpoint for: the digest if pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def familiar(self) -> str:
        """The short form Docker prints: ``busybox:latest``, ``org/app:1``, ``ghcr.io/x/y:2``."""
        if self.registry == DOCKER_HUB:
            short = self.repository.removeprefix("library/")
        else:
            short = self.name
        return (
            short
            + (f":{self.tag}" if self.tag else "")
            + (f"@{self.digest}" if self.digest else "")
        )

    def __str__(self) -> str:
        return (
            self.name
            + (f":{self.tag}" if self.tag else "")
            + (f"@{self.digest}" if self.digest else "")
        )

    @classmethod
    def parse(cls, text: str) -> ImageReference:
        """Parse and normalise; :class:`ParseError` saying why when ``text`` is not valid."""
        if not isinstance(text, str) or not text:
            raise _bad(str(text), "it is empty")
        if text != text.strip() or any(c.isspace() for c in text):
            raise _bad(text, "it contains white space")
        rest, digest = text, None
        if "@" in rest:
            rest, digest = rest.split("@", 1)
            if not _DIGEST.fullmatch(digest):
                raise _bad(text, f"digest {digest!r} is not ALGORITHM:HEX")
            algo, hexpart = digest.split(":", 1)
            if algo == "sha256" and not re.fullmatch(r"[0-9a-f]{64}", hexpart):
                raise _bad(text, "a sha256 digest has exactly 64 lower-case hex digits")
        tag = None
        slash = rest.rfind("/")
        colon = rest.rfind(":")
        if colon > slash:  # a colon after the last slash separates the tag (not a registry port)
            rest, tag = rest[:colon], rest[colon + 1 :]
            if not _TAG.fullmatch(tag):
                raise _bad(
                    text, f"tag {tag!r} must be 1-128 of [A-Za-z0-9_.-], not starting with . or -"
                )
        if not rest:
            raise _bad(text, "the repository name is missing")
        first, sep, remainder = rest.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
            registry, path = first, remainder
            if not _HOST.fullmatch(registry):
                raise _bad(text, f"registry {registry!r} is not a valid HOST[:PORT]")
            if ":" in registry and not registry.endswith("]"):
                port = int(registry.rsplit(":", 1)[1])
                if not 1 <= port <= 65535:
                    raise _bad(text, f"registry port {port} is out of range 1..65535")
            registry = registry.lower() if not registry.startswith("[") else registry
            if registry in _HUB_ALIASES:
                registry = DOCKER_HUB
        else:
            registry, path = DOCKER_HUB, rest
        if not path:
            raise _bad(text, "the repository name is missing")
        for part in path.split("/"):
            if not part:
                raise _bad(text, "the repository path has an empty component (// or a trailing /)")
            if part != part.lower() and _COMPONENT.fullmatch(part.lower()):
                raise _bad(text, f"repository names must be lower-case ({part!r})")
            if not _COMPONENT.fullmatch(part):
                raise _bad(
                    text,
                    f"repository component {part!r} may only hold a-z, 0-9 and single '.', '_', "
                    "'__' or '-' runs between them",
                )
        if registry == DOCKER_HUB and "/" not in path:
            path = f"library/{path}"
        if len(registry) + 1 + len(path) > MAX_NAME:
            raise _bad(text, f"the name is longer than {MAX_NAME} characters")
        if tag is None and digest is None:
            tag = DEFAULT_TAG
        return cls(registry=registry, repository=path, tag=tag, digest=digest)
