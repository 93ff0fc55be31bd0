"""The server (serving/serve/server.py: uvicorn behind our connection layer) in a background thread on a
free loopback port (tests and benchmarks)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def background_server(app, host: str = "127.0.0.1", start_timeout: float = 30.0) -> Iterator[str]:
    """Serve `app` until the block ends; yields its base URL."""
    from ilf_deploy.serving.serve.server import IlfServer, listen, server_config

    sock = listen(host, 0)  # the OS picks a free port: parallel test runs cannot collide
    server = IlfServer(server_config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    try:
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
