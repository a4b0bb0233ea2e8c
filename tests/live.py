"""A real uvicorn server on a loopback port, running the service app in a thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.settings import Settings
from service.state import ServiceState


@dataclass
class Live:
    """A running server: its base URL and the app state behind it."""

    url: str
    state: ServiceState
    server: uvicorn.Server

    def client(self, **kwargs: Any) -> httpx.Client:
        """A client for this server."""
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 60), **kwargs)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as {'name{label="v",...}': value}."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples


def free_socket() -> socket.socket:
    """A bound loopback socket on a free port, handed to uvicorn (no port race)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def free_port() -> int:
    """A port free at the time of asking (for servers in another process)."""
    with free_socket() as sock:
        port: int = sock.getsockname()[1]
        return port


def wait_until(predicate: Any, timeout: float = 60, what: str = "condition") -> None:
    """Poll `predicate` until it is true or fail after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if predicate():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def live_server(
    settings: Settings,
    *,
    ready: bool = True,
    wrap: Callable[[Any], Any] | None = None,
    sock: socket.socket | None = None,
) -> Iterator[Live]:
    """Serve `settings` on a loopback port; wait for /ready unless `ready` is False.

    `wrap` puts ASGI middleware around the app (fault injection); `sock` serves on a socket
    bound beforehand (a client may already be knocking at the port).
    """
    app = create_app(settings)
    sock = sock or free_socket()
    port = sock.getsockname()[1]
    served = wrap(app) if wrap is not None else app
    config = uvicorn.Config(served, log_level="warning", timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    live = Live(f"http://127.0.0.1:{port}", app.state.warm, server)
    try:
        wait_until(lambda: server.started, what="server start")
        if ready:
            wait_until(  # a compiled model compiles before it is ready: tens of seconds
                lambda: httpx.get(f"{live.url}/ready", timeout=5).status_code == 200,
                timeout=180,
                what="/ready",
            )
        yield live
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "server thread did not stop"
