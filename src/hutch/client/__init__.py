"""``hutch.client.connect()``: the runtime of a ``hutch serve`` server, with the same interface.

```python
async with hutch.client.connect() as rt:               # the default home's Unix socket
    box = await rt.create(image="busybox", name="w")
    await box.start()
    print((await box.exec("uname", "-r")).stdout)       # the same hutch.ExecResult
    proc = await box.spawn("cat")                       # streamed over a WebSocket
    await proc.stdin.write(b"hi"); await proc.stdin.close()
    print(await proc.wait())
    await box.remove()
```

Addresses: ``unix:///PATH`` or ``http://HOST:PORT`` (``None``: ``HUTCH_HOME/hutch.sock``). On TCP
the bearer token is ``token=``, else read from ``HUTCH_HOME/server.token`` when this user can
read it. Errors are the server's, re-raised as the same :mod:`hutch.errors` classes; no server
answering is :class:`hutch.ConnectionError`, a deadline :class:`hutch.TimeoutError`.
"""

from __future__ import annotations

from hutch.client.execution import RemoteExecution
from hutch.client.runtime import RemoteBox, RemoteRuntime
from hutch.client.transport import DEFAULT_TIMEOUT, Transport, default_token, parse_url


def connect(
    url: str | None = None, *, token: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> RemoteRuntime:
    """A :class:`RemoteRuntime` for the server at ``url``. No I/O yet: ``async with connect()``
    or ``rt = await connect()`` checks that it answers (ConnectionError otherwise). ``timeout`` bounds connecting and each
    quick request; booting, stopping and commands wait as long as they take on the server (an
    exec's own ``timeout`` plus a grace)."""
    address = parse_url(url)
    if token is None:
        token = default_token(address)
    return RemoteRuntime(Transport(address, token=token, timeout=timeout))


__all__ = ["RemoteBox", "RemoteExecution", "RemoteRuntime", "connect"]
