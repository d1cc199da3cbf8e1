"""An app served by uvicorn on a free loopback port, in a thread of this process: what
tests and the serving load test talk to (`leapc serve` runs uvicorn in the foreground)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn

from leapc.runtime.engine import Engine
from leapc.runtime.serving.app import ServeConfig, create_app


@contextlib.contextmanager
def serving_in_thread(engine: Engine, config: ServeConfig,
                      start_timeout: float = 30.0) -> Iterator[str]:
    """Serve ``engine`` until the block ends; yields the base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, config), host="127.0.0.1",
                                           port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the server on port {port} did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
