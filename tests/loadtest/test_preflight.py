"""Preflight: a run stops before sending anything when the server lacks a model the scenario
names (the message names them and --model-map), or maps them with --map-missing."""
from __future__ import annotations

import httpx
import pytest

from loadtest.modelmap import ModelMap, parse_model_map
from loadtest.preflight import PreflightError, check, scenario_labels
from loadtest.scenario import parse_scenario

SCEN = parse_scenario({"name": "t", "seed": 1, "requests": 20, "arrivals": {"mode": "closed", "concurrency": 2},
                       "adapters": {"popularity": "uniform", "count": 3, "base_fraction": 0.3}, "max_tokens": 4})


def served(models: list[dict], aliases: tuple[str, ...] = ()):
    asked: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        assert request.headers["authorization"] == "Bearer k"
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": models})
        name = request.url.path.removeprefix("/v1/models/")
        return httpx.Response(200 if name in aliases else 404, json={})
    return httpx.MockTransport(handle), asked


CARDS = [{"id": "Base-1", "parent": None}, {"id": "ad-x", "parent": "Base-1"}, {"id": "ad-y", "parent": "Base-1"}]


def test_labels_of_a_scenario():
    assert set(scenario_labels(SCEN)) == {"base", "a1", "a2", "a3"}


def test_missing_models_stop_the_run_with_their_names():
    transport, _ = served(CARDS, aliases=("base",))
    with pytest.raises(PreflightError) as e:
        check(SCEN, "http://h:1", "k", ModelMap(), transport=transport)
    msg = str(e.value)
    assert all(f"{label} (sent as '{label}')" in msg for label in ("a1", "a2", "a3"))
    assert "--model-map" in msg and "--map-missing" in msg and "ad-x" in msg and "base (sent" not in msg


def test_a_complete_map_passes_unchanged():
    transport, asked = served(CARDS)
    mm = parse_model_map({"base": "Base-1", "a1": "ad-x", "a2": "ad-y", "a3": "ad-x"})
    assert check(SCEN, "http://h:1/v1", "k", mm, transport=transport) is mm
    assert asked == ["/v1/models"]                     # everything listed: no per-model look-ups


def test_map_missing_spreads_labels_over_served_adapters():
    transport, _ = served(CARDS)
    mm = check(SCEN, "http://h:1", "k", ModelMap(), map_missing=True, transport=transport)
    assert mm.resolve("base").model == "Base-1"
    assert {mm.resolve(a).model for a in ("a1", "a2", "a3")} == {"ad-x", "ad-y"}


def test_map_missing_needs_adapters_and_errors_are_clear():
    transport, _ = served([{"id": "Base-1"}])
    with pytest.raises(PreflightError, match="serves no adapters"):
        check(SCEN, "http://h:1", "k", ModelMap(), map_missing=True, transport=transport)
    down = httpx.MockTransport(lambda r: httpx.Response(401, json={"error": {"message": "bad key"}}))
    with pytest.raises(PreflightError, match="answered 401"):
        check(SCEN, "http://h:1", "k", ModelMap(), transport=down)
