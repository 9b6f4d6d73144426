"""``/v1/boxes/{id}/files/…``: a box's files over HTTP (``box.files``, :mod:`hutch.files`).

Contents travel as raw bytes, streamed both ways: ``GET …/files/content`` sends the guest file as
the guest agent reads it (credit-limited, so a slow client slows the guest's read, never fills
server memory) and ``PUT …/files/content`` feeds the request body to the guest chunk by chunk.
An upload is limited to ``max_file`` bytes (its own limit: these routes are exempt from the
16 MiB request-body limit); a larger one is a 400 ``BadRequestError`` and the partial guest file
is removed. Metadata (``list``, ``stat``) and changes (``mkdir``, ``remove``, ``chmod``) are JSON.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field
from starlette.responses import StreamingResponse

from hutch.errors import BadRequestError, HutchError
from hutch.files import FileInfo, guest_path
from hutch.runtime.runtime import Runtime

#: Default bound on one uploaded file (bytes).
MAX_FILE = 16 << 30
#: The path prefix of the content routes (exempt from the body limit: see :class:`BodyLimit`).
CONTENT_SUFFIX = "/files/content"

GuestPath = Annotated[str, Query(min_length=1, description="absolute guest path")]


class FileInfoModel(BaseModel):
    """One guest file as ``lstat`` sees it."""

    name: str
    type: str = Field(description="file, dir, symlink or other")
    size: int
    mode: int = Field(description="permission bits (& 0o7777)")
    mtime: float = Field(description="seconds since the epoch")
    link_target: str | None = None


class MkdirRequest(BaseModel):
    path: str
    parents: bool = True
    mode: int = Field(0o755, ge=0, le=0o7777)


class ChmodRequest(BaseModel):
    path: str
    mode: int = Field(ge=0, le=0o7777)


class WriteResult(BaseModel):
    path: str
    size: int


def info_json(info: FileInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "type": info.type,
        "size": info.size,
        "mode": info.mode,
        "mtime": info.mtime,
        "link_target": info.link_target,
    }


def files_routes(router: APIRouter, rt: Runtime, *, max_file: int = MAX_FILE) -> None:
    prefix = "/v1/boxes/{id_or_name}/files"

    @router.get(
        prefix + "/content",
        tags=["files"],
        response_class=StreamingResponse,
        responses={200: {"content": {"application/octet-stream": {}}}},
    )
    async def read_file(id_or_name: str, path: GuestPath) -> StreamingResponse:
        """A guest file's contents (symlinks followed), streamed."""
        box = await rt.get(id_or_name)
        reader = box.files.read_stream(path)
        try:  # the first chunk before the answer: a missing file is a 404, not a broken 200
            first = await reader.__anext__()
        except StopAsyncIteration:
            first = b""
        except BaseException:
            await reader.aclose()
            raise

        async def body() -> AsyncIterator[bytes]:
            try:
                if first:
                    yield first
                async for chunk in reader:
                    yield chunk
            finally:
                await reader.aclose()

        return StreamingResponse(body(), media_type="application/octet-stream")

    @router.put(prefix + "/content", response_model=WriteResult, tags=["files"])
    async def write_file(
        id_or_name: str,
        path: GuestPath,
        request: Request,
        mode: Annotated[int, Query(ge=0, le=0o7777)] = 0o644,
    ) -> dict[str, Any]:
        """Create or replace a guest file with the request body (streamed; at most the server's
        upload limit, 16 GiB unless configured)."""
        box = await rt.get(id_or_name)
        p = guest_path(path)
        received = 0

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal received
            async for chunk in request.stream():
                received += len(chunk)
                if received > max_file:
                    raise BadRequestError(
                        f"the file is larger than the server's upload limit of {max_file} bytes",
                        hint="Split it, or start the server with a larger limit.",
                    )
                if chunk:
                    yield chunk

        try:
            size = await box.files.write(p, chunks(), mode=mode)
        except BadRequestError:
            if received > max_file:
                with contextlib.suppress(HutchError):
                    await box.files.remove(p)
            raise
        return {"path": p, "size": size}

    @router.get(prefix + "/list", response_model=list[FileInfoModel], tags=["files"])
    async def list_files(id_or_name: str, path: GuestPath) -> list[dict[str, Any]]:
        """A guest directory's entries (without . and ..), sorted by name."""
        box = await rt.get(id_or_name)
        return [info_json(i) for i in await box.files.list(path)]

    @router.get(prefix + "/stat", response_model=FileInfoModel, tags=["files"])
    async def stat_file(id_or_name: str, path: GuestPath) -> dict[str, Any]:
        """``lstat`` of a guest path (a symlink is described, not followed)."""
        box = await rt.get(id_or_name)
        return info_json(await box.files.stat(path))

    @router.post(prefix + "/mkdir", status_code=204, tags=["files"])
    async def make_dir(id_or_name: str, body: MkdirRequest) -> Response:
        """Create a directory (``parents``: with its parents, an existing one is fine)."""
        box = await rt.get(id_or_name)
        await box.files.mkdir(body.path, parents=body.parents, mode=body.mode)
        return Response(status_code=204)

    @router.post(prefix + "/chmod", status_code=204, tags=["files"])
    async def change_mode(id_or_name: str, body: ChmodRequest) -> Response:
        """Set a guest path's permission bits."""
        box = await rt.get(id_or_name)
        await box.files.chmod(body.path, body.mode)
        return Response(status_code=204)

    @router.delete(prefix, status_code=204, tags=["files"])
    async def remove_file(id_or_name: str, path: GuestPath, recursive: bool = False) -> Response:
        """Remove a file, symlink or empty directory (``recursive``: a whole tree)."""
        box = await rt.get(id_or_name)
        await box.files.remove(path, recursive=recursive)
        return Response(status_code=204)


def is_upload(scope: Mapping[str, Any]) -> bool:
    """Is this request a file upload (``PUT …/files/content``), which has its own size limit?"""
    return scope.get("method") == "PUT" and str(scope.get("path", "")).endswith(CONTENT_SUFFIX)
