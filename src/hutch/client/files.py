"""``RemoteBox.files``: a remote box's files with the interface of :class:`hutch.files.Files`.

Only the primitives go over HTTP (``/v1/boxes/{id}/files/…``, :mod:`hutch.server.files_routes`):
``stat``, ``list``, ``mkdir``, ``remove``, ``chmod``, and contents streamed both ways. ``read``,
``exists`` and the tree transfers ``upload``/``download`` are :class:`~hutch.files.Files`'s own,
run on these primitives — so a download from a remote box has the same defences against a hostile
guest tree (validated names, directory fds, ``O_NOFOLLOW``, bounded entries) as a local one.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from hutch.files import FileInfo, FileReader, Files, WriteData, byte_chunks, guest_path

if TYPE_CHECKING:
    from hutch.client.runtime import RemoteBox

__all__ = ["RemoteFileReader", "RemoteFiles"]


def _info(d: dict[str, Any]) -> FileInfo:
    return FileInfo(
        name=str(d["name"]),
        type=d["type"],
        size=int(d["size"]),
        mode=int(d["mode"]),
        mtime=float(d["mtime"]),
        link_target=d.get("link_target"),
    )


class RemoteFileReader(FileReader):
    """The chunks of one remote guest file, streamed from the server (see :class:`FileReader`)."""

    def __init__(self, files: RemoteFiles, path: str) -> None:
        self._remote_files = files
        self.path = path
        self._done = False
        self._chunks: AsyncIterator[bytes] | None = None

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        if self._chunks is None:
            box = self._remote_files._remote
            self._chunks = box._rt._t.stream_bytes(
                f"{box._path}/files/content", params={"path": self.path}
            )
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            self._done = True
            raise
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        self._done = True
        chunks, self._chunks = self._chunks, None
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()  # closes the HTTP stream: the server cancels the guest's read

    def __del__(self) -> None:
        pass  # the HTTP stream is closed by its own finaliser


class RemoteFiles(Files):
    """``box.files`` of a :class:`~hutch.client.RemoteBox` (the methods of :class:`Files`)."""

    def __init__(self, box: RemoteBox) -> None:  # no super().__init__: there is no local Box
        self._remote = box

    def __repr__(self) -> str:
        return f"<Files of remote box {self._remote.id}>"

    def _url(self, op: str) -> str:
        return f"{self._remote._path}/files/{op}"

    async def stat(self, path: str | os.PathLike[str]) -> FileInfo:
        r = await self._remote._rt._t.request(
            "GET", self._url("stat"), params={"path": guest_path(path)}
        )
        return _info(r.json())

    async def list(self, path: str | os.PathLike[str] = "/") -> builtins.list[FileInfo]:
        r = await self._remote._rt._t.request(
            "GET", self._url("list"), params={"path": guest_path(path)}, read_timeout=None
        )
        return [_info(d) for d in r.json()]

    async def mkdir(
        self, path: str | os.PathLike[str], *, parents: bool = True, mode: int = 0o755
    ) -> None:
        body = {"path": guest_path(path), "parents": parents, "mode": mode & 0o7777}
        await self._remote._rt._t.request("POST", self._url("mkdir"), json=body)

    async def remove(self, path: str | os.PathLike[str], *, recursive: bool = False) -> None:
        params = {"path": guest_path(path), "recursive": "true" if recursive else "false"}
        await self._remote._rt._t.request(
            "DELETE", self._remote._path + "/files", params=params, read_timeout=None
        )

    async def chmod(self, path: str | os.PathLike[str], mode: int) -> None:
        body = {"path": guest_path(path), "mode": mode & 0o7777}
        await self._remote._rt._t.request("POST", self._url("chmod"), json=body)

    def read_stream(self, path: str | os.PathLike[str]) -> FileReader:
        return RemoteFileReader(self, guest_path(path))

    async def write(
        self,
        path: str | os.PathLike[str],
        data: WriteData,
        *,
        mode: int = 0o644,
    ) -> int:
        async def chunks() -> AsyncIterator[bytes]:
            async for chunk in byte_chunks(data):
                yield bytes(chunk)

        params = {"path": guest_path(path), "mode": mode & 0o7777}
        r = await self._remote._rt._t.upload(self._url("content"), chunks(), params=params)
        return int(r.json()["size"])
