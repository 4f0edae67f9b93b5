"""An ASGI middleware that refuses request bodies over a size limit with 413, before or while
they are read (a declared Content-Length over it is refused without reading a byte)."""
from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

from .uploads import RequestError

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def too_large(max_bytes: int) -> str:
    return f"request body over {max_bytes:,} bytes; send fewer or smaller images"


async def send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class BodyLimit:
    """Wraps an ASGI app: bodies over ``max_bytes`` get 413 {"error": ...}."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await send_json(send, 413, {"error": too_large(self.max_bytes)})
            return
        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise RequestError(413, too_large(self.max_bytes))  # answered by the app's handler
            return message

        await self.app(scope, limited, send)
