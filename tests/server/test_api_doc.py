"""docs/API.md against the server's own /openapi.json: every method and path of the spec is in the
endpoint table of API.md, and every row of that table is in the spec — except the two that OpenAPI
cannot or does not describe (the WebSocket exec stream, and /openapi.json itself), which must
then exist in the application's routes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from websockets.asyncio.client import unix_connect
from websockets.exceptions import InvalidStatus

from tests.support.server import ServerProcess

pytestmark = pytest.mark.server

API_MD = Path(__file__).resolve().parents[2] / "docs" / "API.md"
#: `METHOD /path` in a table cell (the path may carry an example query string).
ENDPOINT = re.compile(r"`(GET|POST|PUT|PATCH|DELETE|HEAD) (/[^`\s?]*)(?:\?[^`]*)?`")
#: Documented but absent from OpenAPI by nature: WebSockets, and the spec's own URL.
NOT_IN_OPENAPI = {("GET", "/v1/boxes/{}/exec/ws"), ("GET", "/openapi.json")}


def normalise(path: str) -> str:
    """``{box}`` in the docs is ``{id_or_name}`` in the spec: compare with the names blanked."""
    return re.sub(r"\{[^}]*\}", "{}", path)


def documented_endpoints(text: str) -> set[tuple[str, str]]:
    """(METHOD, path) of the first cell of every row of the table under "## Endpoints"."""
    section = text.split("\n## Endpoints", 1)[1].split("\n## ", 1)[0]
    found: set[tuple[str, str]] = set()
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        first_cell = line.split("|")[1]
        for method, path in ENDPOINT.findall(first_cell):
            found.add((method, normalise(path)))
    return found


def test_the_endpoint_table_parses() -> None:
    docs = documented_endpoints(API_MD.read_text())
    assert ("POST", "/v1/boxes/{}/start") in docs and ("POST", "/v1/boxes/{}/stop") in docs
    assert ("GET", "/v1/boxes") in docs and ("DELETE", "/v1/images/{}") in docs
    assert len(docs) >= 18


def test_api_md_matches_openapi(unix_server: ServerProcess) -> None:
    with unix_server.http() as c:
        spec = c.get("/openapi.json").json()
    in_spec = {
        (method.upper(), normalise(path))
        for path, item in spec["paths"].items()
        for method in item
        if method in {"get", "post", "put", "patch", "delete", "head"}
    }
    docs = documented_endpoints(API_MD.read_text())
    assert in_spec - docs == set(), "in /openapi.json but not in docs/API.md"
    assert docs - in_spec == NOT_IN_OPENAPI, "in docs/API.md but not in /openapi.json"


async def test_endpoints_outside_openapi_exist(unix_server: ServerProcess) -> None:
    with unix_server.http() as c:
        assert c.get("/openapi.json").json()["openapi"].startswith("3.")
    # the WebSocket route answers its handshake: for a missing box, with that box's 404
    sock = str(unix_server.home / "hutch.sock")
    with pytest.raises(InvalidStatus) as info:
        await unix_connect(sock, "ws://hutch/v1/boxes/no-such-box/exec/ws")
    response = info.value.response
    assert response.status_code == 404
    assert json.loads(response.body or b"{}")["error"]["message"] == (
        "no box with id or name 'no-such-box'"
    )
