"""``hutch serve``: the runtime over REST, WebSocket and SSE (see docs/API.md).

- :mod:`hutch.server.app` — ``create_app(runtime, token=…)``, the FastAPI application;
- :mod:`hutch.server.serve` — listening (Unix socket or TCP), uvicorn, the shutdown sequence;
- :mod:`hutch.server.auth` — the bearer token;
- :mod:`hutch.server.streams` — buffered, SSE and WebSocket execs;
- :mod:`hutch.server.wire` — the formats shared with :mod:`hutch.client` (no FastAPI import).

This package imports nothing on its own, so ``hutch.client`` can use ``hutch.server.wire``
without loading the server's dependencies.
"""
