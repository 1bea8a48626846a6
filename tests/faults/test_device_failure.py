"""A failure that is no request's fault (the device runs out of memory in the forward) stops
the engine: streams end with an error instead of hanging, /health turns 503 and the process
exits non-zero within seconds, so a supervisor restarts it."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.e2e.conftest import KEYS, start_server
from tests.faults.faulty_server import TRIGGER_SEED

pytestmark = pytest.mark.e2e
AUTH = {"Authorization": f"Bearer {KEYS['admin']}"}


def _stream(url: str, body: dict, out: dict) -> None:
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]" and "error" in json.loads(line[6:]):
                    out["error"] = json.loads(line[6:])["error"]
    except httpx.HTTPError as e:
        out["transport"] = repr(e)
    out["done"] = time.monotonic()


def test_device_failure_makes_health_503_and_the_process_exit(tmp_path):
    server = start_server(tmp_path, [], module="tests.faults.faulty_server")
    try:
        msgs = [{"role": "user", "content": "Tell me a long story."}]
        good = {"model": "acme-support", "messages": msgs, "max_tokens": 400, "ignore_eos": True, "stream": True,
                "temperature": 0}
        outs = [{} for _ in range(2)]
        threads = [threading.Thread(target=_stream, args=(server.url, good, o)) for o in outs]
        for t in threads:
            t.start()
        time.sleep(1.0)
        assert httpx.get(server.url + "/health").status_code == 200
        failed_at = time.monotonic()
        r = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, timeout=60,
                       json={"model": "base", "messages": msgs, "max_tokens": 4, "seed": TRIGGER_SEED})
        assert r.status_code in (500, 503) and set(r.json()["error"]) == {"message", "type", "param", "code"}
        unhealthy = None
        while time.monotonic() - failed_at < 10:
            h = httpx.get(server.url + "/health", timeout=2)
            if h.status_code == 503:
                unhealthy = time.monotonic() - failed_at
                assert "engine stopped" in h.json()["error"]
                break
            time.sleep(0.05)
        assert unhealthy is not None and unhealthy < 5, unhealthy
        r = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, timeout=10,
                       json={"model": "base", "messages": msgs, "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"
        code = server.proc.wait(timeout=30)
        exited = time.monotonic() - failed_at
        assert code != 0 and exited < 15, (code, exited)
        for t in threads:
            t.join(30)
        for o in outs:                              # the streams ended, with an error, not a hang
            assert "done" in o and ("error" in o or "transport" in o), o
        print(f"\ndevice failure: /health 503 after {unhealthy * 1000:.0f} ms, exit code {code} after {exited:.1f} s")
    finally:
        server.stop()
        if server.proc.returncode not in (0, 1):
            print(server.log_tail())
