"""A bounded soak: 500 requests mixing adapters, streaming, client cancels, structured output and
bad inputs against one live server, 8 at a time. Every request gets the answer its kind
calls for; afterwards nothing is left running, queued or holding KV blocks, and the server's
RSS has grown by less than RSS_GROWTH_MIB between the end of the warm-up and the end."""
from __future__ import annotations

import concurrent.futures
import json
import random
import time

import httpx
import pytest

from tests.e2e.conftest import KEYS
from tests.faults.catalogue import Case, adapter_name_cases, grammar_cases, key_cases, numeric_cases, type_cases
from tests.faults.conftest import assert_nothing_left
from tests.faults.test_bad_inputs import assert_openai_error, send

pytestmark = pytest.mark.e2e

TOTAL = 500
WARMUP = 100
RSS_GROWTH_MIB = 150
DEADLINE_S = 420
MODELS = [("base", "acme"), ("acme-support", "acme"), ("beta-legal", "beta"), ("shared-json", "acme")]
KINDS = ["chat"] * 8 + ["stream"] * 4 + ["cancel"] * 2 + ["json"] * 2 + ["bad"] * 4


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def one(url: str, i: int, kind: str, bad: list[Case]) -> str:
    model, tenant = MODELS[i % len(MODELS)]
    headers = {"Authorization": f"Bearer {KEYS[tenant]}"}
    msgs = [{"role": "user", "content": f"Request {i}: say something about the number {i}."}]
    if kind == "bad":
        case = bad[i % len(bad)]
        assert_openai_error(send(url, case), case)
        return kind
    if kind == "chat":
        r = httpx.post(url + "/v1/chat/completions", headers=headers, timeout=120,
                       json={"model": model, "messages": msgs, "max_tokens": 4, "seed": i, "temperature": 0.7})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length"), r.text
        return kind
    if kind == "json":
        r = httpx.post(url + "/v1/chat/completions", headers=headers, timeout=120,
                       json={"model": model, "messages": msgs, "max_tokens": 24, "temperature": 0,
                             "response_format": {"type": "json_object"},
                             "structured_outputs": {"close_within": 12}})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(choice["message"]["content"]), dict)
        return kind
    body = {"model": model, "messages": msgs, "max_tokens": 8 if kind == "stream" else 64, "stream": True,
            "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", url + "/v1/chat/completions", headers=headers, json=body, timeout=120) as r:
        assert r.status_code == 200
        chunks = 0
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                assert "error" not in json.loads(line[6:]), line
                chunks += 1
                if kind == "cancel" and chunks == 3:
                    break                               # the client goes away mid-stream
    return kind


@pytest.mark.slow
def test_soak(fault_server):
    url = fault_server.url
    bad = numeric_cases() + type_cases() + grammar_cases() + adapter_name_cases() + key_cases()
    rng = random.Random(0)
    kinds = [rng.choice(KINDS) for _ in range(TOTAL)]
    start = time.monotonic()
    done: dict[str, int] = {}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        warm = list(pool.map(lambda i: one(url, i, kinds[i], bad), range(WARMUP)))
        before = rss_mib(fault_server.proc.pid)
        rest = list(pool.map(lambda i: one(url, i, kinds[i], bad), range(WARMUP, TOTAL)))
    after = rss_mib(fault_server.proc.pid)
    elapsed = time.monotonic() - start
    for k in warm + rest:
        done[k] = done.get(k, 0) + 1
    assert sum(done.values()) == TOTAL and elapsed < DEADLINE_S
    assert_nothing_left(fault_server)
    assert after - before < RSS_GROWTH_MIB, (before, after)
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    print(f"\nsoak: {TOTAL} requests {done} in {elapsed:.0f} s; RSS {before:.0f} -> {after:.0f} MiB "
          f"(+{after - before:.1f} MiB after {WARMUP} warm-up requests)")
