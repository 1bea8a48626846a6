"""An in-process fake of an OpenAI-compatible streaming endpoint (httpx.MockTransport).

Unit tests of the runner use it; the real end-to-end check is tests/e2e/test_loadtest_smoke.py.
"""
from __future__ import annotations

import asyncio
import json

import httpx

VALID = {"person": '{"name": "Ada", "age": 36, "city": "London", "has_pet": false}'}


class FakeServer:
    """Streams `max_tokens` one-word chunks `gap_s` apart; model names steer failures:
    `missing` -> 404, `broken` -> an error event mid-stream, `slow` -> never finishes,
    `nousage` -> no usage chunk. Schema requests get valid JSON for `person`, else a fragment."""

    def __init__(self, gap_s: float = 0.002) -> None:
        self.gap_s = gap_s
        self.bodies: list[dict] = []
        self.active = 0
        self.max_active = 0

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/chat/completions"
        body = json.loads(request.content)
        self.bodies.append(body)
        if body["model"] == "missing":
            return httpx.Response(404, json={"error": {"message": "model 'missing' not found", "type": "x"}})
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=self.stream(body))

    async def stream(self, body: dict):
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        done = False
        try:
            yield _event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            rf = body.get("response_format")
            if rf:
                name = rf["json_schema"]["name"]
                pieces = [VALID.get(name, '{"trunc')]
            else:
                pieces = [f" w{i}" for i in range(body["max_tokens"])]
            for i, piece in enumerate(pieces):
                await asyncio.sleep(self.gap_s if body["model"] != "slow" else 30.0)
                if body["model"] == "broken" and i == 1:
                    yield _event({"error": {"message": "engine failed", "code": 500}})
                    await asyncio.sleep(30.0)  # the client must stop at the error event
                yield _event({"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
            yield _event({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
            if body["model"] != "nousage":
                usage = {"prompt_tokens": 11, "completion_tokens": len(pieces) * (3 if rf else 1)}
                yield _event({"choices": [], "usage": usage})
            self.active -= 1  # the client may stop reading at [DONE]: count it done now
            done = True
            yield b"data: [DONE]\n\n"
        finally:
            if not done:
                self.active -= 1


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"
