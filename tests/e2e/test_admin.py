"""Loading and unloading adapters over HTTP (vLLM-compatible bodies) on the live server."""
from __future__ import annotations

import json

import httpx

from server.lora.adapter import write_random_adapter
from tests.e2e.conftest import KEYS, model_arch
from tests.e2e.test_errors import _error

ADMIN = {"Authorization": f"Bearer {KEYS['admin']}"}


def _load(server, name: str, path) -> httpx.Response:
    return httpx.post(server.url + "/v1/load_lora_adapter", headers=ADMIN, timeout=60,
                      json={"lora_name": name, "lora_path": str(path)})


def _complete(server, model: str) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", headers=ADMIN, timeout=60,
                      json={"model": model, "prompt": "The ocean is", "max_tokens": 6, "temperature": 0})


def test_load_use_unload(live_server):
    path = write_random_adapter(str(live_server.adapters_dir / "uploads" / "elsewhere"), model_arch(live_server.model_dir), r=4, alpha=8.0,
                                targets=("q_proj", "v_proj", "o_proj"), seed=99, std=0.2)
    r = _load(live_server, "ops-fresh", path)
    assert r.status_code == 200, r.text
    assert "ops-fresh" in r.text
    _error(_load(live_server, "ops-fresh", path), 400, "lora_name", "adapter_exists")
    adapted = _complete(live_server, "ops-fresh")
    assert adapted.status_code == 200 and adapted.json()["model"] == "ops-fresh"
    base = _complete(live_server, "base").json()["choices"][0]["text"]
    assert adapted.json()["choices"][0]["text"] != base
    rows = {a["name"]: a for a in httpx.get(live_server.url + "/v1/adapters", headers=ADMIN).json()["data"]}
    assert rows["ops-fresh"]["rank"] == 4 and rows["ops-fresh"]["requests_served"] >= 1
    assert set(rows["ops-fresh"]["targets"]) == {"q_proj", "v_proj", "o_proj"}
    r = httpx.post(live_server.url + "/v1/unload_lora_adapter", headers=ADMIN, json={"lora_name": "ops-fresh"})
    assert r.status_code == 200, r.text
    _error(_complete(live_server, "ops-fresh"), 404, "model", "model_not_found")
    r = httpx.post(live_server.url + "/v1/unload_lora_adapter", headers=ADMIN, json={"lora_name": "ops-fresh"})
    _error(r, 404, "lora_name")


def test_load_errors(live_server):
    tmp_path = live_server.adapters_dir / "uploads"      # admin loads come from inside the adapters folder
    tmp_path.mkdir(exist_ok=True)
    _error(_load(live_server, "ghost", tmp_path / "does-not-exist"), 404, "lora_path")
    _error(_load(live_server, "../escape", live_server.adapters_dir / "acme-support"), 400, "lora_name")
    _error(_load(live_server, "a/b", live_server.adapters_dir / "acme-support"), 400, "lora_name")
    _error(_load(live_server, "base", live_server.adapters_dir / "acme-support"), 400, "lora_name")
    # a broken adapter: valid config, weights of the wrong shape
    broken = tmp_path / "broken"
    write_random_adapter(str(broken), model_arch(live_server.model_dir), r=4, alpha=8.0,
                         targets=("q_proj",), seed=5, std=0.2)
    (broken / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    _error(_load(live_server, "broken-one", broken), 400, "lora_path", "invalid_adapter")
    # a config that is not JSON
    bad_cfg = tmp_path / "bad-config"
    bad_cfg.mkdir()
    (bad_cfg / "adapter_config.json").write_text("{not json")
    _error(_load(live_server, "bad-config", bad_cfg), 400, "lora_path", "invalid_adapter")
    # rank above --max-lora-rank (16)
    big = write_random_adapter(str(tmp_path / "big"), model_arch(live_server.model_dir), r=32, alpha=8.0,
                               targets=("q_proj",), seed=6, std=0.2)
    err = _error(_load(live_server, "too-big", big), 400, "lora_path", "invalid_adapter")
    assert "32" in err["message"]
    r = httpx.post(live_server.url + "/v1/load_lora_adapter", headers=ADMIN, content=json.dumps({"lora_name": 3}),
                   timeout=30)
    _error(r, 400)
    assert httpx.get(live_server.url + "/health").json() == {"status": "ok"}
    names = [a["name"] for a in httpx.get(live_server.url + "/v1/adapters", headers=ADMIN).json()["data"]]
    assert not {"ghost", "broken-one", "bad-config", "too-big"} & set(names)
