"""A killed engine replica: its requests fail with a clear 503, the others finish, Serve replaces it.

In this package's last module: the app it leaves has a new replica, which the other modules
do not expect."""
from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import httpx
import pytest

from tests.e2e.conftest import KEYS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ADMIN = {"Authorization": f"Bearer {KEYS['admin']}"}
MODELS = ["acme-support", "beta-legal", "shared-json", "ops-fourth", "base", "survivor"]


def _post(app, model: str, max_tokens: int) -> httpx.Response:
    return httpx.post(app.url + "/v1/chat/completions", headers=ADMIN, timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": "Count slowly to fifty."}],
        "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0})


def test_a_killed_replica_fails_only_its_requests_and_is_replaced(ray_app):
    pids = ray_app.replica_pids()
    assert len(pids) == 2, pids
    before = set(ray_app.replica_metrics("loraplex_requests_running"))
    assert len(before) == 2, before
    r = httpx.post(ray_app.url + "/v1/load_lora_adapter", headers=ADMIN, timeout=120, json={
        "lora_name": "survivor", "lora_path": str(ray_app.adapters_dir / "beta-legal")})
    assert r.status_code == 200, r.text
    time.sleep(2.0)                   # both replicas apply it and export their version
    version = max(ray_app.replica_metrics("loraplex_adapter_log_version").values(), default=0)
    assert version > 0
    victim = pids[0]
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        futures = [pool.submit(_post, ray_app, m, 64) for m in MODELS[:5] * 2]
        time.sleep(2.0)                     # every request is running on one replica or the other
        os.kill(victim, signal.SIGKILL)
        results = [f.result(timeout=150) for f in futures]     # none hangs
    statuses = sorted(r.status_code for r in results)
    assert set(statuses) <= {200, 503}, statuses
    lost = [r.json()["error"] for r in results if r.status_code == 503]
    assert lost and len(lost) < len(results), statuses          # the victim's failed, the other's finished
    assert {e["code"] for e in lost} == {"replica_lost"} and all("retry" in e["message"] for e in lost)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:                          # Serve starts a replacement
        now = ray_app.replica_pids()
        if len(now) == 2 and victim not in now and httpx.get(ray_app.url + "/ready").status_code == 200:
            break
        time.sleep(1.0)
    else:
        raise AssertionError(f"no replacement replica: {ray_app.replica_pids()}")
    # the replacement applies the log it missed: the admin load made before it started
    deadline = time.monotonic() + 30
    while not any(k not in before and v >= version and v > 0
                  for k, v in ray_app.replica_metrics("loraplex_adapter_log_version").items()):
        assert time.monotonic() < deadline, ray_app.replica_metrics("loraplex_adapter_log_version")
        time.sleep(0.5)
    time.sleep(2.0)                                            # it is routed to
    later = [_post(ray_app, m, 4) for m in MODELS * 2]
    assert [r.status_code for r in later] == [200] * len(later), [r.text for r in later if r.status_code != 200]
