"""Preflight: before `loadtest run` sends anything, check that the server serves every model
the scenario will name, so a run never reports a wall of 404s for adapters it lacks.

The served models come from GET /v1/models (cards with a `parent` are adapters, cards
without one are base models); a name not listed is also tried as GET /v1/models/{name},
which answers for aliases (loraplex's "base"). Missing models stop the run with a message
that names them and --model-map; with --map-missing, scenario labels the server lacks are
spread over the adapters it serves (round-robin, in name order; "base" goes to a base model).
"""
from __future__ import annotations

import httpx

from loadtest.modelmap import ModelMap, Target
from loadtest.scenario import Scenario
from loadtest.workload import plan_phase


class PreflightError(RuntimeError):
    """The server cannot serve the scenario as mapped (or cannot be asked)."""


def models_url(base_url: str) -> str:
    url = base_url.rstrip("/")
    return (url if url.endswith("/v1") else url + "/v1") + "/models"


def scenario_labels(scenario: Scenario) -> list[str]:
    """Every adapter label the scenario's phases will send, in first-use order."""
    seen: dict[str, None] = {}
    for i in range(len(scenario.phases)):
        for plan in plan_phase(scenario, i):
            seen.setdefault(plan.adapter, None)
    return list(seen)


def check(scenario: Scenario, base_url: str, api_key: str | None, model_map: ModelMap,
          map_missing: bool = False, transport: httpx.BaseTransport | None = None) -> ModelMap:
    """The model map to run with: model_map itself when the server serves everything it names,
    else (map_missing) one that sends missing labels to served models; else PreflightError."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = models_url(base_url)
    with httpx.Client(headers=headers, timeout=30.0, transport=transport) as client:
        try:
            r = client.get(url)
        except httpx.HTTPError as e:
            raise PreflightError(f"cannot reach {url}: {e}") from e
        if r.status_code != 200:
            raise PreflightError(f"GET {url} answered {r.status_code}: {r.text[:200]}")
        cards = r.json().get("data", [])
        served = {c["id"] for c in cards}
        adapters = sorted(c["id"] for c in cards if c.get("parent"))
        bases = [c["id"] for c in cards if not c.get("parent")]

        def serves(model: str) -> bool:
            return model in served or client.get(f"{url}/{model}").status_code == 200

        labels = scenario_labels(scenario)
        missing = [label for label in labels if not serves(model_map.resolve(label).model)]
    if not missing:
        return model_map
    names = ", ".join(f"{label} (sent as {model_map.resolve(label).model!r})" for label in missing)
    if not map_missing:
        raise PreflightError(
            f"the server at {base_url} does not serve {names}; it serves {sorted(served)}. "
            "Map scenario labels onto served models with --model-map FILE (lines 'label: model'), "
            "or pass --map-missing to spread them over the served adapters")
    entries = {label: model_map.resolve(label) for label in labels}
    spread = 0
    for label in missing:
        if label == "base" and bases:
            entries[label] = Target(model=bases[0])
        elif adapters:
            entries[label] = Target(model=adapters[spread % len(adapters)])
            spread += 1
        else:
            raise PreflightError(f"the server at {base_url} serves no adapters to map {names} onto")
    return ModelMap(entries=entries, source=f"{model_map.source or 'identity'} + --map-missing")
