"""ASGI middleware in front of the real service that injects failures on chosen requests."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

Scope = dict[str, Any]


@dataclass
class Fault:
    """What to do to one request: wait `delay_s`, then answer `status` or pass it through."""

    status: int | None = None
    retry_after: str | None = None
    delay_s: float = 0.0
    type: str = "injected"
    when: bytes | None = None  # only requests whose body contains this


@dataclass
class Seen:
    """One request that reached the injector."""

    method: str
    path: str
    body: bytes
    fault: Fault | None

    def items(self) -> int:
        """Number of items in a /v1/score body."""
        return len(json.loads(self.body)["items"])


@dataclass
class Faults:
    """Wraps an ASGI app; requests to `paths` take the next planned fault, if any."""

    app: Any
    paths: tuple[str, ...] = ("/v1/score", "/v1/rerank", "/v1/models")
    plan: deque[Fault] = field(default_factory=deque)
    seen: list[Seen] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    def then(self, *faults: Fault) -> Faults:
        """Queue faults for the next requests, in order."""
        self.plan.extend(faults)
        return self

    def hits(self, path: str) -> list[Seen]:
        """The requests seen on `path`."""
        return [s for s in self.seen if s.path == path]

    def _take(self, body: bytes) -> Fault | None:
        for fault in self.plan:
            if fault.when is None or fault.when in body:
                self.plan.remove(fault)
                return fault
        return None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        fault = self._take(body)
        self.seen.append(Seen(scope["method"], scope["path"], body, fault))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if fault is not None and fault.delay_s:
                await asyncio.sleep(fault.delay_s)
            if fault is not None and fault.status is not None:
                await _answer(send, fault)
                return
            replayed = False

            async def replay() -> dict[str, Any]:
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            await self.app(scope, replay, send)
        finally:
            self.in_flight -= 1


async def _answer(send: Any, fault: Fault) -> None:
    payload = json.dumps({"error": {"type": fault.type, "message": "injected fault"}}).encode()
    headers = [(b"content-type", b"application/json")]
    if fault.retry_after is not None:
        headers.append((b"retry-after", fault.retry_after.encode()))
    await send({"type": "http.response.start", "status": fault.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
