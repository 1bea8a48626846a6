"""/metrics of the live server: request, token, latency and adapter series move as requests run."""
from __future__ import annotations

import threading

import httpx

from tests.e2e.conftest import KEYS
from tests.e2e.test_lifecycle import _open_stream, _wait_idle

ADMIN = {"Authorization": f"Bearer {KEYS['admin']}"}


def _value(m: dict[str, float], name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in m.items()
               if k.split("{")[0] == name and all(w in k for w in want))


def test_request_and_token_counters_match_usage(live_server):
    before = _wait_idle(live_server)
    r = httpx.post(live_server.url + "/v1/completions", headers=ADMIN, timeout=60,
                   json={"model": "beta-legal", "prompt": "Contracts are", "max_tokens": 5, "n": 2,
                         "ignore_eos": True}).json()
    after = live_server.metrics()
    assert _value(after, "loraplex_requests_total", adapter="beta-legal", status="ok") - \
        _value(before, "loraplex_requests_total", adapter="beta-legal", status="ok") == 1
    assert _value(after, "loraplex_prompt_tokens_total", adapter="beta-legal") - \
        _value(before, "loraplex_prompt_tokens_total", adapter="beta-legal") == r["usage"]["prompt_tokens"]
    assert _value(after, "loraplex_generation_tokens_total", adapter="beta-legal") - \
        _value(before, "loraplex_generation_tokens_total", adapter="beta-legal") == 10
    for h in ("loraplex_time_to_first_token_seconds_count", "loraplex_e2e_request_latency_seconds_count"):
        assert _value(after, h, adapter="beta-legal") > _value(before, h, adapter="beta-legal")
    assert _value(after, "loraplex_inter_token_latency_seconds_count", adapter="beta-legal") - \
        _value(before, "loraplex_inter_token_latency_seconds_count", adapter="beta-legal") == 8
    # the adapter had to be brought to a device slot at least once in this server's life
    assert after["loraplex_adapter_loads_total"] >= 1 and after["loraplex_adapter_load_seconds_total"] > 0
    assert after["loraplex_adapter_device_misses_total"] >= 1
    assert after["loraplex_adapter_device_hits_total"] >= 1
    assert 1 <= after["loraplex_lora_device_slots_used"] <= after["loraplex_lora_device_slots_total"] == 4


def test_lora_requests_info_names_running_adapters(live_server):
    first = threading.Event()
    t = threading.Thread(target=_open_stream, args=(live_server.url, "acme-support", 40, first, True))
    t.start()
    try:
        assert first.wait(60)
        m = live_server.metrics()
        info = [k for k in m if k.startswith("vllm:lora_requests_info{")]
        assert len(info) == 1 and 'running_lora_adapters="acme-support"' in info[0] and 'max_lora="4"' in info[0]
        assert m["vllm:num_requests_running"] >= 1 and m["loraplex_kv_cache_blocks_used"] >= 1
        assert 0 < m["vllm:kv_cache_usage_perc"] <= 1
    finally:
        t.join(120)
    _wait_idle(live_server)


def test_a_responses_request_counts_as_a_chat_request_does(live_server):
    before = _wait_idle(live_server)
    r = httpx.post(live_server.url + "/v1/responses", headers=ADMIN, timeout=60,
                   json={"model": "shared-json", "input": "Hello", "max_output_tokens": 4}).json()
    after = live_server.metrics()
    assert _value(after, "loraplex_requests_total", adapter="shared-json", status="ok") - \
        _value(before, "loraplex_requests_total", adapter="shared-json", status="ok") == 1
    assert _value(after, "loraplex_generation_tokens_total", adapter="shared-json") - \
        _value(before, "loraplex_generation_tokens_total", adapter="shared-json") == r["usage"]["output_tokens"]
