"""Prefix caching through the API: usage.prompt_tokens_details.cached_tokens, tenants isolated
unless they share a namespace, cache_salt, the metrics routers read, and the admin reset."""
import uuid

import httpx
import openai
import pytest

from tests.e2e.conftest import KEYS

SYSTEM = ("You are the support assistant of a lighthouse company. Answer briefly and politely. "
          "Our lighthouses stand on the northern coast, each with a keeper, a lamp and a logbook. ")


def _system() -> str:
    """A system prompt no other test sends (so its blocks are cached only by this test)."""
    return f"[{uuid.uuid4().hex}] " + SYSTEM * 3


def _cached(server, tenant: str, system: str, salt: str | None = None, model: str = "base") -> int:
    body = {"model": model, "max_tokens": 2, "temperature": 0,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Hello?"}]}
    if salt is not None:
        body["cache_salt"] = salt
    r = httpx.post(server.url + "/v1/chat/completions", headers=server.headers(tenant), json=body, timeout=120)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] <= usage["prompt_tokens"]
    return usage["prompt_tokens_details"]["cached_tokens"]


def test_a_repeated_prompt_is_served_from_the_cache_with_the_openai_client(live_server, base_id):
    client = openai.OpenAI(base_url=live_server.url + "/v1", api_key=KEYS["acme"], max_retries=0)
    system = _system()
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Where is the lamp?"}]
    first = client.chat.completions.create(model=base_id, messages=messages, max_tokens=3, temperature=0)
    second = client.chat.completions.create(model=base_id, messages=messages, max_tokens=3, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens - 16 and cached % 16 == 0
    assert second.choices[0].message.content == first.choices[0].message.content
    stream = client.completions.create(model=base_id, prompt=system, max_tokens=2, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    usage = [c.usage for c in stream if c.usage is not None][-1]
    assert usage.prompt_tokens_details.cached_tokens == 0     # a completion prompt is not the chat one
    # through an adapter: its own namespace, then its own hits
    assert _cached(live_server, "acme", system, model="acme-support") == 0
    assert _cached(live_server, "acme", system, model="acme-support") > 0


def test_tenants_never_hit_each_others_blocks_unless_they_share_a_namespace(live_server):
    system = _system()
    assert _cached(live_server, "acme", system) == 0
    assert _cached(live_server, "acme", system) > 0
    assert _cached(live_server, "beta", system) == 0          # beta sent the same prompt: no hit
    assert _cached(live_server, "pub1", system) == 0
    assert _cached(live_server, "pub2", system) > 0           # both opted into "public"
    assert _cached(live_server, "beta", system) > 0           # its own blocks, from its first request


def test_cache_salt_separates_requests_of_one_tenant(live_server):
    system = _system()
    assert _cached(live_server, "acme", system, salt="user-1") == 0
    assert _cached(live_server, "acme", system, salt="user-2") == 0
    assert _cached(live_server, "acme", system) == 0
    assert _cached(live_server, "acme", system, salt="user-1") > 0
    r = httpx.post(live_server.url + "/v1/completions", headers=live_server.headers("acme"), timeout=30,
                   json={"model": "base", "prompt": "x", "max_tokens": 1, "cache_salt": ""})
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"


def test_metrics_count_queries_and_hits_by_adapter(live_server, base_id):
    before = live_server.metrics()
    system = _system()
    _cached(live_server, "acme", system)
    hit = _cached(live_server, "acme", system)
    after = live_server.metrics()
    key = f'loraplex_prefix_cache_hits_total{{adapter="{base_id}"}}'
    assert after[key] - before.get(key, 0) == hit > 0
    assert after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"] == hit
    assert after["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"] >= 2 * hit
    assert after["loraplex_kv_cache_blocks_cached"] > 0
    cached = f'loraplex_cached_prompt_tokens_total{{adapter="{base_id}"}}'
    assert after[cached] - before.get(cached, 0) == hit


@pytest.mark.parametrize("tenant", ["acme", None])
def test_only_an_admin_may_reset_the_cache(live_server, tenant):
    r = httpx.post(live_server.url + "/reset_prefix_cache", headers=live_server.headers(tenant), timeout=30)
    assert r.status_code == (403 if tenant else 401)


def test_reset_empties_the_cache(live_server):
    system = _system()
    _cached(live_server, "acme", system)
    assert _cached(live_server, "acme", system) > 0
    r = httpx.post(live_server.url + "/reset_prefix_cache", headers=live_server.headers("admin"), timeout=30)
    assert r.status_code == 200 and r.json()["blocks_dropped"] > 0
    assert _cached(live_server, "acme", system) == 0
    assert live_server.metrics()["loraplex_kv_cache_blocks_cached"] > 0    # that request's blocks
