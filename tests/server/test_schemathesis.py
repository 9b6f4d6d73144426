"""schemathesis against ``/openapi.json`` of a real ``hutch serve``: no request it generates from the
spec, valid or not, gets a 5xx answer (its ``not_a_server_error`` check).

The server is a process of its own, on loopback TCP with its bearer token (sent with every
generated request), on a throw-away home with one running busybox box named ``fuzz``. Every REST
operation of the spec is exercised (schemathesis' examples, coverage and fuzzing phases, positive
and negative inputs), with these bounds, so the run is short and can neither hang nor multiply VMs:

* ``POST /v1/images/pull`` is left out: a generated reference that parses (``a``, ``0/0``) is a
  pull from a public registry, which is network I/O with its own long deadlines. Its one local
  error (a reference that does not parse is a 400) is tested in test_server.py.
* ``POST /v1/boxes/{id_or_name}/start`` is left out, and ``POST /v1/boxes`` is sent with
  ``"start": false`` whatever was generated: those are the two ways to boot a VM, and a generated
  name can hit a box an earlier request created. So boxes are only created (a record, no VM),
  listed, got, stopped (a no-op on them) and removed.
* Commands (``…/exec`` and ``…/exec/sse``) go to the running ``fuzz`` box, so they reach the guest
  agent with generated argv, env, cwd, user and stdin (that is where a 500 would hide), with
  ``timeout`` capped at :data:`EXEC_TIMEOUT` seconds (negative, zero and mistyped values are kept,
  for their 400s), so a generated command that happens to run forever ends.
* ``DELETE /v1/boxes/{…}`` and ``…/stop`` never name the ``fuzz`` box (its name or an id prefix
  of it is replaced), so it keeps running for the rest of the run. Nor do ``…/snapshot``,
  ``…/clone`` and ``…/fork``: the only running box is ``fuzz``, so they never freeze RAM or
  restore VMs (generated bodies still meet their validation; boxes the run creates are never
  started, so those answer 409).
* ``PUT /v1/pools`` is sent with ``"size": 0`` whenever a positive size was generated (other
  fields and mistyped sizes kept, for their 400s): a pool of size 0 is removed, never filled, so
  no seed box boots and no image is pulled; ``POST /v1/pools/wait`` then has no pool to wait for.
* At most :data:`EXAMPLES` fuzzed examples per operation, with a fixed seed (set
  ``HUTCH_SCHEMATHESIS_EXAMPLES`` / ``HUTCH_SCHEMATHESIS_SEED`` to explore further); no example
  database is written.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from schemathesis.checks import not_a_server_error

from tests.support.homes import make_home
from tests.support.registry import free_port
from tests.support.server import ServerProcess

pytestmark = [pytest.mark.server, pytest.mark.vm]

EXAMPLES = int(os.environ.get("HUTCH_SCHEMATHESIS_EXAMPLES", "10"))
SEED = int(os.environ.get("HUTCH_SCHEMATHESIS_SEED", "5"))
#: The running box generated commands go to.
BOX = "fuzz"
#: Upper bound on a generated command's run time (seconds).
EXEC_TIMEOUT = 3.0
LEFT_OUT = ("/v1/images/pull", "/v1/boxes/{id_or_name}/start")


@dataclass
class Fuzzed:
    server: ServerProcess
    box_id: str  # of the running box BOX


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    home = make_home(tmp_path_factory.mktemp("srv-fuzz") / "home")
    server = ServerProcess(home, listen=f"127.0.0.1:{free_port()}").start()
    try:
        with server.http(token=server.token) as c:
            r = c.post("/v1/boxes", json={"name": BOX, "start": True}, timeout=120)
            assert r.status_code == 201, r.text
        yield Fuzzed(server, r.json()["id"])
    finally:
        server.stop()


@pytest.fixture(scope="module")
def api_schema(fuzzed: Fuzzed) -> Any:
    fuzz_server = fuzzed.server
    headers = {"Authorization": f"Bearer {fuzz_server.token}"}
    config = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "suppress-health-check": ["too_slow", "filter_too_much"],
            "headers": headers,
            "request-timeout": 60,
            "generation": {"mode": "all", "max-examples": EXAMPLES, "database": "none"},
        }
    )
    return schemathesis.openapi.from_url(
        f"{fuzz_server.url}/openapi.json", headers=headers, config=config
    )


schema = schemathesis.pytest.from_fixture("api_schema")
for _path in LEFT_OUT:
    schema = schema.exclude(path=_path)


def _is_fuzz_box(value: object, box_id: str) -> bool:
    return isinstance(value, str) and (
        value == BOX or (len(value) >= 4 and box_id.startswith(value.lower()))
    )


def bound(case: Any, box_id: str) -> None:
    """Keep a generated request within the bounds of the module docstring."""
    path = case.operation.path
    method = case.method.upper()
    body = case.body if isinstance(case.body, dict) else None
    if (method, path) == ("POST", "/v1/boxes") and body is not None and "start" in body:
        body["start"] = False
    if (method, path) == ("PUT", "/v1/pools") and body is not None:
        size = body.get("size", 1)
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            body["size"] = 0  # validated as generated, but never a pool that boots VMs
    params = case.path_parameters
    if params is None or "id_or_name" not in params:
        return
    if path.endswith(("/exec", "/exec/sse")):
        params["id_or_name"] = BOX
        if body is not None:
            timeout = body.get("timeout")
            number = isinstance(timeout, int | float) and not isinstance(timeout, bool)
            if timeout is None or (number and timeout > EXEC_TIMEOUT):
                body["timeout"] = EXEC_TIMEOUT
    elif (
        method == "DELETE" or path.endswith(("/stop", "/snapshot", "/clone", "/fork"))
    ) and _is_fuzz_box(params["id_or_name"], box_id):
        params["id_or_name"] = "not-the-fuzz-box"


@schema.parametrize()
def test_no_server_errors(case: Any, fuzzed: Fuzzed) -> None:
    bound(case, fuzzed.box_id)
    case.call_and_validate(checks=[not_a_server_error], timeout=EXEC_TIMEOUT + 30)


def test_the_fuzz_box_survived(fuzzed: Fuzzed) -> None:
    """Runs after the generated requests: the box is still running and answers."""
    fuzz_server = fuzzed.server
    with fuzz_server.http(token=fuzz_server.token) as c:
        assert c.get(f"/v1/boxes/{BOX}").json()["state"] == "running"
        r = c.post(f"/v1/boxes/{BOX}/exec", json={"cmd": ["echo", "ok"]})
        assert r.status_code == 200 and r.json()["stdout_b64"] == "b2sK"
    assert "Traceback" not in fuzz_server.tail(200)  # no 500 was logged either
