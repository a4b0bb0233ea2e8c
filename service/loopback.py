"""Serve an ASGI app on a free loopback port in this process, for a `with` block.

For the demo, the reproduction's benchmarks and tools that need a real server next to them
(real HTTP, real uvicorn) without a subprocess. Production serving is `warm-serve`.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


@contextmanager
def serve(app: Any, *, timeout_s: float = 120.0, name: str = "loopback-server") -> Iterator[str]:
    """Serve `app` on 127.0.0.1; yield its base URL once `/ready` answers 200.

    The socket is bound here and handed to uvicorn, so no other process can take the port
    between choosing and serving it. On exit the server drains and its thread is joined.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=name, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not (server.started and _ready(url)):
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server at {url} did not become ready (see its log)")
            time.sleep(0.02)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()
