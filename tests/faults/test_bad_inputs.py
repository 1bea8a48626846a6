"""One client's mistake is that client's error: a barrage of bad inputs against a live server
while 8 good streaming requests (base and adapters) run on it.

Asserted: every bad input gets a 4xx in OpenAI's error shape (never a 5xx); the at-the-limit
inputs succeed; every good request finishes with the tokens of an undisturbed run (greedy);
/health answers in under 1 s at every probe, the 20 MB body included; afterwards no request
is running or waiting and the KV pool is free (read from /metrics).
"""
from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import httpx
import pytest

from tests.e2e.conftest import KEYS
from tests.faults.catalogue import Case, bad_inputs, edge_inputs
from tests.faults.conftest import MAX_BODY, assert_nothing_left

pytestmark = pytest.mark.e2e

# (model, key) of the 8 good streams: base and three adapters, two tenants
GOOD = [("base", "acme"), ("acme-support", "acme"), ("beta-legal", "beta"), ("shared-json", "acme"),
        ("base", "beta"), ("acme-support", "admin"), ("beta-legal", "admin"), ("shared-json", "admin")]
GOOD_TOKENS = 200
PROBE_EVERY_S = 0.05


def send(url: str, case: Case) -> httpx.Response:
    headers = {"content-type": "application/json", **case.headers}
    if case.key is not None:
        headers.setdefault("Authorization", f"Bearer {case.key}")
    body = case.body
    if callable(body):
        content = body()
    elif isinstance(body, (bytes, str)):
        content = body
    else:
        content = json.dumps(body)
    return httpx.post(url + case.path, content=content, headers=headers, timeout=120)


def assert_openai_error(r: httpx.Response, case: Case) -> None:
    expected = case.status if isinstance(case.status, tuple) else (case.status,)
    assert r.status_code in expected, f"{case.name}: {r.status_code} {r.text[:300]}"
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, case.name
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"], case.name
    assert r.headers.get("x-request-id"), case.name


class GoodStream(threading.Thread):
    """One greedy streaming chat request; records its text and when it finished."""

    def __init__(self, url: str, index: int) -> None:
        super().__init__(daemon=True)
        self.url, self.index = url, index
        self.text, self.finish, self.error = "", None, None
        self.started = threading.Event()
        self.done_at: float | None = None

    def run(self) -> None:
        model, tenant = GOOD[self.index]
        body = {"model": model, "stream": True, "max_tokens": GOOD_TOKENS, "temperature": 0, "ignore_eos": True,
                "messages": [{"role": "user", "content": f"Write a story about lighthouse number {self.index}."}]}
        try:
            with httpx.stream("POST", self.url + "/v1/chat/completions", json=body, timeout=600,
                              headers={"Authorization": f"Bearer {KEYS[tenant]}"}) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        self.error = chunk["error"]
                        break
                    for c in chunk["choices"]:
                        self.text += c["delta"].get("content") or ""
                        self.finish = c.get("finish_reason") or self.finish
                    if self.text:
                        self.started.set()
        except Exception as e:      # reported by the test
            self.error = repr(e)
        finally:
            self.done_at = time.monotonic()
            self.started.set()


def run_good(url: str) -> list[GoodStream]:
    streams = [GoodStream(url, i) for i in range(len(GOOD))]
    for s in streams:
        s.start()
    return streams


class HealthProbe(threading.Thread):
    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=10) as c:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    r = c.get(self.url + "/health")
                    if r.status_code != 200:
                        self.failures.append(r.text)
                except httpx.HTTPError as e:
                    self.failures.append(repr(e))
                self.latencies.append(time.monotonic() - t0)
                time.sleep(PROBE_EVERY_S)


def test_bad_inputs_fail_alone_while_good_requests_stream(fault_server):
    url = fault_server.url
    reference = run_good(url)                    # undisturbed run: the tokens to match
    for s in reference:
        s.join(600)
    assert all(s.error is None and s.finish == "length" for s in reference), [s.error for s in reference]

    bad = bad_inputs(fault_server, MAX_BODY)
    edge = edge_inputs()
    assert len({c.name for c in bad}) == len(bad) >= 60

    probe = HealthProbe(url)
    probe.start()
    good = run_good(url)
    for s in good:
        assert s.started.wait(300), "a good stream never started"
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        bad_results = list(pool.map(lambda c: send(url, c), bad))
        edge_results = list(pool.map(lambda c: send(url, c), edge))
    barrage_end = time.monotonic()
    running_through = sum(s.done_at is None or s.done_at > barrage_end for s in good)
    for s in good:
        s.join(600)
    probe.stop.set()
    probe.join(30)

    wrong = []
    for case, r in zip(bad, bad_results):
        try:
            assert_openai_error(r, case)
        except (AssertionError, ValueError) as e:
            wrong.append(str(e).splitlines()[0])
    wrong += [f"{c.name}: {r.status_code} {r.text[:200]}" for c, r in zip(edge, edge_results) if r.status_code != 200]
    assert not wrong, "\n".join(wrong)
    assert running_through >= 8, f"only {running_through} good streams ran through the barrage"
    for ref, s in zip(reference, good):
        assert s.error is None and s.finish == "length", (s.index, s.error)
        assert s.text == ref.text, f"good stream {s.index} changed"
    worst = max(probe.latencies)
    assert not probe.failures and worst < 1.0, (worst, probe.failures[:3])
    print(f"\nfaults: {len(bad)} distinct bad inputs, all 4xx; {len(edge)} edge inputs, all 200; "
          f"8/8 good streams identical; /health worst {worst * 1000:.0f} ms over {len(probe.latencies)} probes")

    assert_nothing_left(fault_server)
    assert httpx.get(url + "/health").json() == {"status": "ok"}
