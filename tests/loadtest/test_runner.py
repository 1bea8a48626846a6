import time

import pytest

from loadtest.modelmap import ModelMap, parse_model_map
from loadtest.runner import Runner, chat_url, check_json
from loadtest.scenario import parse_scenario
from loadtest.workload import plan_phase

from .fake_openai import FakeServer

PERSON = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}


def scen(**kw):
    base = {"name": "t", "seed": 3, "requests": 12, "arrivals": {"mode": "closed", "concurrency": 3},
            "adapters": {"popularity": "uniform", "count": 3}, "max_tokens": 5, "ignore_eos": True}
    return parse_scenario({**base, **kw})


def run(s, fake, model_map=ModelMap()):
    return Runner(s, "http://fake:1/v1/", "k", model_map, progress=False, transport=fake.transport()).run()


def test_chat_url_and_check_json():
    assert chat_url("http://h:8/") == chat_url("http://h:8/v1") == "http://h:8/v1/chat/completions"
    assert check_json('{"age": 3}', PERSON) == (True, None)
    assert check_json('{"age": "x"}', PERSON)[0] is False
    assert check_json('{"age": ', PERSON)[1].startswith("not JSON")


def test_closed_loop_measures_every_request():
    fake = FakeServer()
    s = scen(json_fraction=0.4)
    r = run(s, fake)
    assert len(r.requests) == 12 and all(x.status == "ok" for x in r.requests)
    assert fake.max_active == 3  # the concurrency, never more
    free = [x for x in r.requests if x.schema is None]
    assert free and all(x.completion_tokens == 5 and x.chunks == 5 and len(x.itl) == 4 for x in free)
    assert all(x.text == " w0 w1 w2 w3 w4" and x.usage_reported for x in free)
    for x in r.requests:
        assert 0 < x.ttft <= x.e2e and x.prompt_tokens == 11 and x.finish_reason == "length"
    js = [x for x in r.requests if x.schema is not None]
    assert js and all(x.json_valid == (x.schema == "person") for x in js)
    assert [x.adapter for x in r.requests] == [p.adapter for p in plan_phase(s, 0)]
    (ph,) = r.phases
    assert (ph.planned, ph.sent) == (12, 12) and ph.end > ph.start


def test_request_bodies_follow_the_scenario_and_the_map():
    fake = FakeServer()
    mm = parse_model_map({"base": "smol", "*": {"model": "smol", "body": {"lora": [{"id": 0, "scale": 1.0}]}}})
    run(scen(json_fraction=0.5, adapters={"popularity": "uniform", "count": 2, "base_fraction": 0.3}), fake, mm)
    assert {b["model"] for b in fake.bodies} == {"smol"}
    for b in fake.bodies:
        assert b["stream"] is True and b["stream_options"] == {"include_usage": True}
        assert b["messages"][0]["role"] == "user" and b["temperature"] == 0.0
        if "response_format" in b:
            assert b["response_format"]["type"] == "json_schema" and "ignore_eos" not in b
        else:
            assert b["ignore_eos"] is True
    assert any("lora" in b for b in fake.bodies) and any("lora" not in b for b in fake.bodies)


def test_errors_are_recorded_not_raised():
    fake = FakeServer()
    s = scen(requests=3, adapters={"popularity": "distinct", "adapter_names": ["missing", "broken", "nousage"]})
    r = run(s, fake)
    by = {x.adapter: x for x in r.requests}
    assert by["missing"].status == "error" and by["missing"].http_status == 404
    assert "model 'missing' not found" in by["missing"].error
    assert by["broken"].status == "error" and "engine failed" in by["broken"].error
    nu = by["nousage"]
    assert nu.status == "ok" and not nu.usage_reported and nu.completion_tokens == nu.chunks == 5


def test_time_limit_cancels_in_flight_requests():
    fake = FakeServer()
    s = scen(requests=8, duration_s=0.3, adapters={"popularity": "identical", "adapter_names": ["slow"]})
    t = time.perf_counter()
    r = run(s, fake)
    assert time.perf_counter() - t < 5
    assert len(r.requests) == 3 and all(x.status == "cancelled" for x in r.requests)
    assert r.phases[0].sent == 3 and r.phases[0].planned == 8


def test_poisson_arrivals_follow_the_plan():
    fake = FakeServer()
    s = scen(requests=10, arrivals={"mode": "poisson", "rate": 40.0})
    r = run(s, fake)
    planned = [p.arrival_s for p in plan_phase(s, 0)]
    assert all(x.status == "ok" for x in r.requests)
    for x, a in zip(r.requests, planned):
        assert x.start - r.phases[0].start == pytest.approx(a, abs=0.05)


def test_model_map_gap_fails_before_sending():
    from loadtest.modelmap import ModelMapError
    fake = FakeServer()
    with pytest.raises(ModelMapError):
        run(scen(), fake, parse_model_map({"a1": "x"}))
    assert fake.bodies == []
