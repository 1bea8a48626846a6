"""Client disconnects free engine resources; SIGTERM drains in-flight requests and exits 0."""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.e2e.conftest import KEYS, start_server

ADMIN = {"Authorization": f"Bearer {KEYS['admin']}"}


def _open_stream(url: str, model: str, max_tokens: int, first: threading.Event | None = None,
                 read_all: bool = True) -> dict:
    """POST a streaming completion; read one content chunk (then hang up unless read_all)."""
    body = {"model": model, "prompt": "Tell me a very long story about a lighthouse keeper.",
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    result = {"text": "", "finish": None, "usage": None, "done": False}
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", url + "/v1/completions", json=body, headers=ADMIN) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    result["done"] = True
                    break
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result["usage"] = chunk["usage"]
                for c in chunk["choices"]:
                    result["text"] += c["text"]
                    result["finish"] = c["finish_reason"] or result["finish"]
                if result["text"] and first is not None:
                    first.set()
                if result["text"] and not read_all:
                    break        # leaving the block closes the connection mid-stream
    return result


def _wait_idle(server, timeout: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if (m["loraplex_requests_running"] == 0 and m["loraplex_requests_waiting"] == 0
                and m["loraplex_kv_cache_blocks_used"] == 0 and m["loraplex_api_queue_waiting"] == 0):
            return m
        if time.monotonic() > deadline:
            pytest.fail(f"engine not idle after {timeout} s: running={m['loraplex_requests_running']} "
                        f"waiting={m['loraplex_requests_waiting']} kv={m['loraplex_kv_cache_blocks_used']}")
        time.sleep(0.2)


def _aborted(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items()
               if k.startswith("loraplex_requests_total{") and 'status="aborted"' in k)


def test_disconnecting_20_streams_frees_the_engine(live_server):
    before = _aborted(_wait_idle(live_server))
    threads = [threading.Thread(target=_open_stream, args=(
        live_server.url, "acme-support" if i % 2 else "base", 400, None, False)) for i in range(20)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    m = _wait_idle(live_server)
    assert time.monotonic() - start < 60, "requests ran to completion instead of being aborted"
    assert m["loraplex_kv_cache_usage_ratio"] == 0.0
    assert m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0.0
    assert _aborted(m) - before == 20
    r = httpx.post(live_server.url + "/v1/completions", headers=ADMIN, timeout=60,
                   json={"model": "acme-support", "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200


# Enough tokens that the drain outlasts the probes below: at ~40 ms a step, 96 tokens
# keep the streams running for seconds after SIGTERM (12 once finished within 0.5 s).
TOKENS = 96


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_then_exits_0(tmp_path):
    server = start_server(tmp_path, ["--drain-timeout", "60"], quantization="nf4")
    try:
        firsts = [threading.Event() for _ in range(8)]
        results: list[dict | None] = [None] * 8

        def run(i: int) -> None:
            results[i] = _open_stream(server.url, "acme-support" if i % 2 else "base", TOKENS, firsts[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for e in firsts:
            assert e.wait(120), "a stream produced no token"
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while httpx.get(server.url + "/ready").status_code != 503:   # the drain has begun
            assert time.monotonic() < deadline, "SIGTERM did not start a drain"
            time.sleep(0.05)
        r = httpx.post(server.url + "/v1/completions", headers=ADMIN, timeout=30,
                       json={"model": "base", "prompt": "late", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"
        for t in threads:
            t.join(120)
        for res in results:
            assert res is not None and res["done"] and res["finish"] == "length"
            assert res["usage"]["completion_tokens"] == TOKENS
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.stop()
