"""--request-timeout: a request past its deadline ends with a clear error (504 before the
response starts, an in-band error event in a stream); others are unaffected and nothing leaks."""
from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.e2e.conftest import KEYS, start_server

pytestmark = pytest.mark.e2e
AUTH = {"Authorization": f"Bearer {KEYS['admin']}"}
LONG = {"model": "acme-support", "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 900, "ignore_eos": True, "temperature": 0}


def test_requests_past_the_deadline_end_with_a_timeout_error(tmp_path):
    server = start_server(tmp_path, ["--request-timeout", "1.5"])
    try:
        t0 = time.monotonic()
        r = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, json=LONG, timeout=60)
        took = time.monotonic() - t0
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout", r.text
        assert "1.5 s" in r.json()["error"]["message"] and 1.4 < took < 10
        events = []
        with httpx.stream("POST", server.url + "/v1/chat/completions", headers=AUTH, json={**LONG, "stream": True},
                          timeout=60) as s:
            assert s.status_code == 200
            events = [json.loads(line[6:]) for line in s.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        assert any(e.get("choices") for e in events) and events[-1]["error"]["code"] == "request_timeout"
        short = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, timeout=60,
                           json={**LONG, "max_tokens": 3})
        assert short.status_code == 200
        m = server.metrics()
        assert m["loraplex_requests_running"] == 0 and m["loraplex_kv_cache_blocks_used"] == 0
    finally:
        server.stop()
