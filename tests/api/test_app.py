"""server/api/app.py without a model: health/readiness while loading, gating, error shapes, request ids."""
from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.config import EngineConfig, ServerConfig
from server.errors import ModelLoadError


@pytest.fixture
def loading_app():
    """An app whose model load blocks until released, then fails with ModelLoadError."""
    release = threading.Event()
    app = create_app(ServerConfig(engine=EngineConfig(model="/models/Llama-3.2-1B")))

    def starter(config: EngineConfig):
        assert config.model == "/models/Llama-3.2-1B"
        release.wait(30)
        raise ModelLoadError("model path does not exist: /models/Llama-3.2-1B")

    app.state.server.starter = starter
    yield app, release
    release.set()


def _is_error(r, status: int, code: str | None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code
    assert r.headers["x-request-id"]
    return err


def test_while_loading(loading_app):
    app, release = loading_app
    with TestClient(app) as c:
        assert c.get("/health").json() == {"status": "ok"}
        r = c.get("/ready")
        assert r.status_code == 503 and r.json() == {"ready": False, "draining": False, "model": "Llama-3.2-1B"}
        body = {"model": "Llama-3.2-1B", "messages": [{"role": "user", "content": "hi"}]}
        err = _is_error(c.post("/v1/chat/completions", json=body), 503, "service_unavailable")
        assert "loading" in err["message"]
        _is_error(c.get("/v1/models"), 503, "service_unavailable")
        # validation still comes first: a malformed body is a 400 even while loading
        _is_error(c.post("/v1/chat/completions", content=b"{", headers={"content-type": "application/json"}),
                  400, "invalid_json")
        assert "vllm:num_requests_running 0.0" in c.get("/metrics").text
        release.set()


def test_failed_load_is_reported(loading_app):
    app, release = loading_app
    release.set()
    with TestClient(app) as c:
        for _ in range(100):
            if app.state.server.load_error:
                break
            threading.Event().wait(0.02)
        r = c.get("/health")
        assert r.status_code == 503 and "does not exist" in r.json()["error"]
        err = _is_error(c.post("/v1/completions", json={"model": "x", "prompt": "hi"}), 503, "service_unavailable")
        assert "failed to load" in err["message"]


def test_draining_refuses_new_v1_requests(loading_app):
    app, release = loading_app
    with TestClient(app) as c:
        app.state.server.gate.draining = True
        _is_error(c.post("/v1/completions", json={"model": "x", "prompt": "hi"}), 503, "service_unavailable")
        _is_error(c.get("/v1/models"), 503, "service_unavailable")
        assert c.get("/health").status_code == 200
        assert c.get("/ready").json()["draining"] is True
        release.set()


def test_unexpected_exception_is_a_500_without_traceback(loading_app, caplog):
    app, release = loading_app

    async def boom():
        raise RuntimeError("secret internals at line 42")
    app.add_api_route("/v1/boom", boom)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/v1/boom", headers={"x-request-id": "trace-me-1"})
        err = _is_error(r, 500, "internal_error")
        assert r.headers["x-request-id"] == "trace-me-1"
        assert "trace-me-1" in err["message"] and "secret" not in r.text and "Traceback" not in r.text
        release.set()
    assert any("trace-me-1" in rec.getMessage() and rec.exc_info for rec in caplog.records)


def test_request_ids_are_unique_and_single(loading_app):
    app, release = loading_app
    with TestClient(app) as c:
        a, b = c.get("/health"), c.get("/v1/models")
        assert a.headers["x-request-id"] != b.headers["x-request-id"]
        assert len(b.headers.get_list("x-request-id")) == 1
        ok = c.get("/health", headers={"x-request-id": "x" * 65})     # too long: replaced
        assert ok.headers["x-request-id"] != "x" * 65
        release.set()


def test_keys_file_makes_routes_need_a_key(tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text('{"keys": [{"key": "sk-test-12345678", "tenant": "t", "adapters": []}]}')
    app = create_app(ServerConfig(api_keys=str(keys)))
    release = threading.Event()

    def starter(config: EngineConfig):
        release.wait(30)
        raise ModelLoadError("not needed here")
    app.state.server.starter = starter
    with TestClient(app) as c:
        err = _is_error(c.get("/v1/models"), 401, "invalid_api_key")
        assert err["type"] == "authentication_error"
        _is_error(c.get("/v1/models", headers={"Authorization": "Bearer sk-nope-1234"}), 401, "invalid_api_key")
        # the right key gets past auth (then 503: still loading)
        _is_error(c.get("/v1/models", headers={"Authorization": "Bearer sk-test-12345678"}), 503,
                  "service_unavailable")
        r = c.post("/v1/load_lora_adapter", headers={"Authorization": "Bearer sk-test-12345678"},
                   json={"lora_name": "a", "lora_path": "/tmp"})
        _is_error(r, 403, "insufficient_permissions")
        release.set()
