"""API keys and tenants on the live server: 401s, tenant isolation, admin-only adapter loading."""
from __future__ import annotations

import httpx
import openai
import pytest

from tests.e2e.conftest import KEYS
from tests.e2e.test_errors import _error


def _chat(server, model: str, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}".strip()} if key is not None else {}
    return httpx.post(server.url + "/v1/chat/completions", headers=headers, timeout=60,
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})


@pytest.mark.parametrize("key", [None, "", "sk-wrong-00000000", KEYS["acme"] + "x", KEYS["acme"][:-1]])
def test_missing_or_wrong_key_is_401(live_server, base_id, key):
    err = _error(_chat(live_server, base_id, key), 401)
    assert err["type"] == "authentication_error"
    for path in ("/v1/models", "/v1/adapters"):
        h = {"Authorization": f"Bearer {key}".strip()} if key is not None else {}
        _error(httpx.get(live_server.url + path, headers=h), 401)


def test_openai_client_without_the_right_key(live_server):
    c = openai.OpenAI(base_url=live_server.url + "/v1", api_key="sk-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        c.models.list()


def test_base_model_is_open_to_every_key(live_server, base_id):
    for tenant in ("acme", "beta", "admin"):
        assert _chat(live_server, base_id, KEYS[tenant]).status_code == 200
        assert _chat(live_server, "base", KEYS[tenant]).status_code == 200


def test_tenant_cannot_use_another_tenants_adapter(live_server):
    assert _chat(live_server, "acme-support", KEYS["acme"]).status_code == 200
    theirs = _error(_chat(live_server, "beta-legal", KEYS["acme"]), 404, "model", "model_not_found")
    missing = _error(_chat(live_server, "beta-nothing", KEYS["acme"]), 404, "model", "model_not_found")
    assert theirs["message"].replace("beta-legal", "X") == missing["message"].replace("beta-nothing", "X")
    _error(_chat(live_server, "acme-support", KEYS["beta"]), 404, "model", "model_not_found")
    h = {"Authorization": f"Bearer {KEYS['acme']}"}
    _error(httpx.get(live_server.url + "/v1/models/beta-legal", headers=h), 404, "model", "model_not_found")
    listed = [a["name"] for a in httpx.get(live_server.url + "/v1/adapters", headers=h).json()["data"]]
    assert listed == ["acme-support", "shared-json"]


def test_non_admin_cannot_load_or_unload(live_server):
    h = {"Authorization": f"Bearer {KEYS['acme']}"}
    r = httpx.post(live_server.url + "/v1/load_lora_adapter", headers=h,
                   json={"lora_name": "acme-new", "lora_path": str(live_server.adapters_dir / "acme-support")})
    assert _error(r, 403)["type"] == "permission_error"
    r = httpx.post(live_server.url + "/v1/unload_lora_adapter", headers=h, json={"lora_name": "acme-support"})
    _error(r, 403)
    assert _chat(live_server, "acme-support", KEYS["acme"]).status_code == 200   # still there
