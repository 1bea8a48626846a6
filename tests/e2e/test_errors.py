"""Every client error of the live server has the right status and OpenAI's error shape."""
from __future__ import annotations

import concurrent.futures

import httpx
import pytest

from tests.e2e.conftest import KEYS

ADMIN = {"Authorization": f"Bearer {KEYS['admin']}"}
CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


def _error(r: httpx.Response, status: int, param: str | None = "*", code: str | None = "*") -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"] and "Traceback" not in err["message"]
    assert r.headers.get("x-request-id")
    if param != "*":
        assert err["param"] == param, err
    if code != "*":
        assert err["code"] == code, err
    return err


def _post(server, path: str, body, headers=ADMIN) -> httpx.Response:
    if isinstance(body, (dict, list)):
        return httpx.post(server.url + path, json=body, headers=headers, timeout=60)
    return httpx.post(server.url + path, content=body, timeout=60,
                      headers={**headers, "content-type": "application/json"})


@pytest.mark.parametrize("body", ['{"model": "base", "messages": [', "not json at all", ""])
def test_malformed_json_body(live_server, body):
    err = _error(_post(live_server, CHAT, body), 400)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("patch, param", [
    ({"max_tokens": "many"}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"messages": "hi"}, "messages"),
    ({"n": [2]}, "n"),
    ({"stream": {"yes": 1}}, "stream"),
])
def test_wrong_types(live_server, patch, param):
    err = _error(_post(live_server, CHAT, {"model": "base", "messages": MSG, **patch}), 400)
    assert err["param"].split(".")[0] == param


@pytest.mark.parametrize("patch, param", [
    ({"max_tokens": -5}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10**9}, "max_tokens"),
    ({"max_completion_tokens": 10**9}, "max_tokens"),
    ({"n": 9}, "n"),
    ({"n": 0}, "n"),
    ({"temperature": 3.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"logprobs": True, "top_logprobs": 50}, "logprobs"),
    ({"stop": [str(i) for i in range(17)]}, "stop"),
])
def test_out_of_range_parameters(live_server, patch, param):
    _error(_post(live_server, CHAT, {"model": "base", "messages": MSG, **patch}), 400, param)


def test_unknown_fields_are_ignored(live_server):
    r = _post(live_server, CHAT, {"model": "base", "messages": MSG, "max_tokens": 2,
                                  "frequency_penalty": 0.0, "some_future_field": {"x": 1}})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("model", ["no-such-adapter", "../acme-support", "acme-support/../beta-legal",
                                   "/etc/passwd", "..", ".hidden"])
def test_unknown_model_is_404(live_server, model):
    _error(_post(live_server, CHAT, {"model": model, "messages": MSG}), 404, "model", "model_not_found")
    _error(_post(live_server, "/v1/completions", {"model": model, "prompt": "x"}), 404, "model", "model_not_found")


def test_prompt_longer_than_the_context_is_413(live_server):
    long = "word " * 1500                     # the live server's context is 1024 tokens
    _error(_post(live_server, CHAT, {"model": "base", "messages": [{"role": "user", "content": long}]}), 413)
    _error(_post(live_server, "/v1/completions", {"model": "base", "prompt": long, "stream": True}), 413)


@pytest.mark.parametrize("rf", [
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
    {"type": "xml"},
])
def test_bad_response_format_is_400(live_server, rf):
    _error(_post(live_server, CHAT, {"model": "base", "messages": MSG, "response_format": rf}), 400)


@pytest.mark.parametrize("so", [{"json_object": True, "close_within": -3}, {"close_within": 8},
                                {"regex": "a+", "close_within": 8}])
def test_bad_close_within_is_400(live_server, so):
    err = _error(_post(live_server, CHAT, {"model": "base", "messages": MSG, "structured_outputs": so}), 400)
    assert "close_within" in err["message"]


def test_bad_token_ids_are_400(live_server):
    _error(_post(live_server, "/v1/completions", {"model": "base", "prompt": [1, 2, 10**7]}), 400, "prompt")
    _error(_post(live_server, "/v1/completions", {"model": "base", "prompt": []}), 400, "prompt")


def test_queue_full_is_429_with_retry_after(live_server):
    """--max-queue 24: eight requests of n=4 at once (32 waiting choices) overflow it."""
    body = {"model": "base", "prompt": "Write a long story about the sea. " * 4, "max_tokens": 1, "n": 4}
    for _ in range(3):      # a burst overflows unless the engine outruns eight HTTP posts; retry then
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            rs = list(pool.map(lambda _: _post(live_server, "/v1/completions", body), range(8)))
        assert all(r.status_code in (200, 429) for r in rs), [r.text for r in rs]
        limited = [r for r in rs if r.status_code == 429]
        if limited:
            break
    assert limited
    err = _error(limited[0], 429, None, "queue_full")
    assert err["type"] == "rate_limit_error"
    assert int(limited[0].headers["retry-after"]) >= 1
    assert live_server.metrics()["loraplex_api_queue_waiting"] == 0     # every place was given back


def test_unknown_route_is_404_in_openai_shape(live_server):
    _error(httpx.get(live_server.url + "/v1/nothing-here"), 404)


def test_health_is_fine_after_all_that(live_server):
    assert httpx.get(live_server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(live_server.url + "/ready").status_code == 200
