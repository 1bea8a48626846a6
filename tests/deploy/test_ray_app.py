"""The replicated app on Ray Serve: loopback only, the single server's outputs, adapter affinity,
streaming, a client going away, hot loads and reloads."""
from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import time

import httpx
import openai
import psutil
import pytest

from server.lora.adapter import write_random_adapter
from tests.deploy.conftest import FOURTH
from tests.e2e.conftest import ADAPTERS, KEYS, model_arch

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ADMIN = {"Authorization": f"Bearer {KEYS['admin']}"}
REPLICA = "x-loraplex-replica"


def _chat(server, model: str, text: str, max_tokens: int = 12) -> httpx.Response:
    r = httpx.post(server.url + "/v1/chat/completions", headers=ADMIN, timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
        "temperature": 0})
    assert r.status_code == 200, r.text
    return r


def _loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def test_every_ray_process_listens_and_talks_on_loopback_only(ray_app):
    procs = [psutil.Process(ray_app.proc.pid), *psutil.Process(ray_app.proc.pid).children(recursive=True)]
    names = {p.name() for p in procs}
    assert {"gcs_server", "raylet"} <= names, names          # the whole local Ray is under the server
    listening, talking = [], []
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
        except psutil.Error:
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                listening.append((p.name(), c.laddr.ip, c.laddr.port))
            elif c.raddr:
                talking.append((p.name(), c.laddr.ip, c.raddr.ip))
    assert len(listening) >= 5, listening
    assert [x for x in listening if not _loopback(x[1])] == [], listening
    assert [x for x in talking if not (_loopback(x[1]) and _loopback(x[2]))] == []


def test_forty_requests_match_a_single_server_and_keep_to_one_replica(ray_app, single, base_id):
    models = [base_id, "acme-support", "beta-legal", "shared-json", "ops-fourth"]
    jobs = [(models[i % 5], f"Name a colour and a number ({i}).") for i in range(40)]
    first = {}
    for model, text in jobs[:5]:            # each adapter's first request, one at a time
        first[model] = _chat(ray_app, model, text).headers[REPLICA]
    time.sleep(1.0)                         # the replicas report the ids they hold to Serve's routers
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda j: _chat(ray_app, *j), jobs[5:]))
        want = list(pool.map(lambda j: _chat(single, *j).json()["choices"][0]["message"]["content"], jobs))
    texts = [_chat(ray_app, m, t).json()["choices"][0]["message"]["content"] for m, t in jobs[:5]]
    texts += [r.json()["choices"][0]["message"]["content"] for r in got]
    assert texts == want
    served = {m: {first[m]} for m in models}
    for (model, _), r in zip(jobs[5:], got):
        served[model].add(r.headers[REPLICA])
    for model in models[1:]:
        assert served[model] == {first[model]}, (model, served)
    replicas = set().union(*served.values())
    assert len(replicas) == 2, served       # both replicas served (4 adapters over 2 replicas)


def _chunks(server, model: str, text: str) -> list[dict]:
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEYS["admin"], max_retries=0)
    stream = c.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], max_tokens=10,
                                       temperature=0, stream=True, stream_options={"include_usage": True})
    return [ch.model_dump(exclude={"id", "created", "system_fingerprint"}) for ch in stream]


def test_streaming_has_the_single_servers_shape(ray_app, single):
    for model in ("acme-support", "base"):
        got, want = _chunks(ray_app, model, "Tell me a story."), _chunks(single, model, "Tell me a story.")
        assert got == want
        assert len(got) >= 4 and got[-1]["usage"]["completion_tokens"] == 10


def _running(ray_app) -> dict[str, float]:
    return ray_app.replica_metrics("loraplex_requests_running")


def _wait(cond, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_client_going_away_aborts_the_request_on_its_replica(ray_app):
    _wait(lambda: len(_running(ray_app)) == 2, 30, "both replicas' metrics")
    body = {"model": "beta-legal", "messages": [{"role": "user", "content": "Write a long essay."}],
            "max_tokens": 600, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", ray_app.url + "/v1/chat/completions", headers=ADMIN, json=body) as r:
            assert r.status_code == 200
            replica = r.headers[REPLICA]
            events = (line for line in r.iter_lines() if line)
            for _ in range(6):
                assert next(events).startswith("data: ")
            _wait(lambda: _running(ray_app).get(replica, 0) >= 1, 20, "the request to show as running")
    # closed after a few of 600 tokens: the replica frees it long before it could finish
    start = time.monotonic()
    _wait(lambda: _running(ray_app).get(replica, 1) == 0, 15, "the replica to abort the request")
    assert time.monotonic() - start < 15


def _load(server, name: str, path) -> httpx.Response:
    return httpx.post(server.url + "/v1/load_lora_adapter", headers=ADMIN, timeout=120,
                      json={"lora_name": name, "lora_path": str(path)})


def _unload(server, name: str) -> httpx.Response:
    return httpx.post(server.url + "/v1/unload_lora_adapter", headers=ADMIN, timeout=60, json={"lora_name": name})


def test_hot_load_reaches_both_replicas_and_a_reload_never_serves_old_weights(ray_app, single):
    arch = model_arch(ray_app.model_dir)
    text = "Describe the sea in one line."
    for server in (ray_app, single):
        for version, seed in (("v1", 31), ("v2", 32)):
            write_random_adapter(str(server.adapters_dir / "uploads" / version), arch, r=8, alpha=16.0,
                                 targets=("q_proj", "v_proj", "down_proj"), seed=seed, std=0.3)
    loads_before = ray_app.replica_metrics("loraplex_adapter_loads_total")
    assert _load(ray_app, "hot", ray_app.adapters_dir / "uploads" / "v1").status_code == 200
    assert _load(single, "hot", single.adapters_dir / "uploads" / "v1").status_code == 200
    # every replica applies the change (it reads the adapter), not only the one that checked it
    _wait(lambda: all(v > loads_before.get(k, 0) for k, v in ray_app.replica_metrics("loraplex_adapter_loads_total").items())
          and len(ray_app.replica_metrics("loraplex_adapter_loads_total")) == 2, 20, "both replicas to load it")
    old = _chat(ray_app, "hot", text).json()["choices"][0]["message"]["content"]
    assert old == _chat(single, "hot", text).json()["choices"][0]["message"]["content"]
    for server in (ray_app, single):
        assert _unload(server, "hot").status_code == 200
        assert _load(server, "hot", server.adapters_dir / "uploads" / "v2").status_code == 200
    want = _chat(single, "hot", text).json()["choices"][0]["message"]["content"]
    assert want != old                      # the new weights answer differently
    for _ in range(6):                      # whichever replica takes it, the new weights answer
        assert _chat(ray_app, "hot", text).json()["choices"][0]["message"]["content"] == want
    assert _unload(ray_app, "hot").status_code == 200
    assert httpx.post(ray_app.url + "/v1/chat/completions", headers=ADMIN, timeout=60, json={
        "model": "hot", "messages": [{"role": "user", "content": text}], "max_tokens": 2}).status_code == 404


def test_the_apps_metrics_count_every_replica(ray_app):
    per_replica = _wait(lambda: (lambda m: m if len(m) == 2 else None)(
        ray_app.replica_metrics("loraplex_kv_cache_blocks_total")), 20, "both replicas' metrics")
    text = httpx.get(ray_app.url + "/metrics", timeout=10).text
    total = next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 if line.startswith("loraplex_kv_cache_blocks_total "))
    assert total == sum(per_replica.values()) > max(per_replica.values())


def test_models_and_adapters_answer_for_the_whole_app(ray_app):
    ids = {m["id"] for m in httpx.get(ray_app.url + "/v1/models", headers=ADMIN).json()["data"]}
    assert {*ADAPTERS, *FOURTH} <= ids
    names = [a["name"] for a in httpx.get(ray_app.url + "/v1/adapters", headers=ADMIN).json()["data"]]
    assert {*ADAPTERS, *FOURTH} <= set(names)
