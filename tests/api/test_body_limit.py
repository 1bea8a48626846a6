"""BodyLimit: a body over the limit gets 413 before the app sees it; one within it arrives whole."""
from __future__ import annotations

import asyncio

from server.api.body_limit import BodyLimit

LIMIT = 1000


def call(chunks: list[bytes], content_length: int | None = None) -> tuple[list[dict], list[bytes] | None, int]:
    """Run BodyLimit over an app that records the body it reads.
    -> (messages sent, the body chunks the app saw or None, chunks the client sent)."""
    seen: list[bytes] | None = None
    received = 0

    async def app(scope, receive, send):
        nonlocal seen
        seen = []
        while True:
            m = await receive()
            seen.append(m.get("body", b""))
            if not m.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive():
        nonlocal received
        if received < len(chunks):
            received += 1
            return {"type": "http.request", "body": chunks[received - 1], "more_body": received < len(chunks)}
        await asyncio.sleep(30)      # a client that sent everything: nothing more comes
        return {"type": "http.disconnect"}

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    headers = [] if content_length is None else [(b"content-length", str(content_length).encode())]
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers,
             "state": {"request_id": "rid-1"}}
    asyncio.run(asyncio.wait_for(BodyLimit(app, LIMIT)(scope, receive, send), 5))
    return sent, seen, received


def test_a_body_within_the_limit_reaches_the_app_whole():
    sent, seen, _ = call([b"a" * 600, b"b" * 400], 1000)
    assert sent[0]["status"] == 200 and b"".join(seen) == b"a" * 600 + b"b" * 400


def test_a_declared_length_over_the_limit_is_413_without_the_app():
    sent, seen, received = call([b"x" * 800, b"x" * 800], 1600)
    assert seen is None and sent[0]["status"] == 413 and received == 2      # the rest was drained first
    assert b"request_too_large" in sent[1]["body"]
    assert (b"x-request-id", b"rid-1") in sent[0]["headers"]


def test_a_chunked_body_is_stopped_when_it_passes_the_limit():
    sent, seen, received = call([b"x" * 600] * 5)
    assert seen is None and sent[0]["status"] == 413 and received == 5
    sent, seen, _ = call([b"x" * 600, b"x" * 401])                         # the last chunk passes it
    assert seen is None and sent[0]["status"] == 413
