"""BodyLimit: pure ASGI middleware that answers 413 to a request body over --max-request-bytes.

The body is counted as it arrives, before anything parses it: a Content-Length over the
limit is refused without reading it into memory, and a chunked body is refused as soon as
it passes the limit. A body within the limit is buffered once and handed to the app as it
came. Before the 413 is sent, the rest of an oversized body is read and dropped (for at
most DRAIN_MAX_BYTES or DRAIN_MAX_S), so the client, still sending, reads the answer
instead of a reset connection.
"""
from __future__ import annotations

import asyncio
import time

from server.api import errors

DRAIN_MAX_BYTES = 256 * 2**20
DRAIN_MAX_S = 10.0
_BODY_METHODS = (b"POST", b"PUT", b"PATCH")


def too_large(limit: int) -> errors.APIError:
    return errors.APIError(413, f"the request body is larger than this server's limit of {limit} bytes",
                           "invalid_request_error", None, "request_too_large")


class BodyLimit:
    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"].encode() not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send, True)
            return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return                      # the client went away mid-body: nobody to answer
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await self._refuse(scope, receive, send, message.get("more_body", False))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        del chunks
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()          # afterwards: disconnect detection, as usual

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, more: bool) -> None:
        """Drop what is left of the body (bounded), then answer 413."""
        deadline = time.monotonic() + DRAIN_MAX_S
        read = 0
        while more and read < DRAIN_MAX_BYTES and time.monotonic() < deadline:
            try:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                break
            if message["type"] == "http.disconnect":
                return
            read += len(message.get("body", b""))
            more = message.get("more_body", False)
        rid = scope.get("state", {}).get("request_id", "-")
        await errors.error_response(too_large(self.max_bytes), rid)(scope, receive, send)


def _content_length(scope) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
