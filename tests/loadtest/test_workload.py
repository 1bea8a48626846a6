from dataclasses import replace

import numpy as np
import pytest

from loadtest.scenario import parse_scenario
from loadtest.workload import (CHARS_PER_TOKEN, adapter_labels, instructions_list, plan_phase, schemas_list,
                               zipf_probabilities)


def scenario(adapters, requests=400, **extra):
    return parse_scenario({"name": "t", "seed": 7, "requests": requests, "adapters": adapters,
                           "max_tokens": {"dist": "uniform", "min": 4, "max": 12}, **extra})


def names(s, phase=0):
    return [p.adapter for p in plan_phase(s, phase)]


def test_base_only_and_identical():
    assert set(names(scenario({"popularity": "base"}))) == {"base"}
    assert set(names(scenario({"popularity": "identical", "count": 5}))) == {"a1"}


def test_uniform_counts_match_expectation():
    n, k = 4000, 4
    got = names(scenario({"popularity": "uniform", "count": k}, requests=n))
    counts = np.array([got.count(f"a{i}") for i in range(1, k + 1)])
    assert counts.sum() == n
    # each count ~ Binomial(n, 1/k): sd = sqrt(n p (1-p)) ~ 27; allow 5 sd
    assert np.all(np.abs(counts - n / k) < 5 * np.sqrt(n * (1 / k) * (1 - 1 / k)))


def test_zipf_rank_frequencies_match_the_law():
    n, k, alpha = 20000, 8, 1.2
    got = names(scenario({"popularity": "zipf", "count": k, "alpha": alpha}, requests=n))
    freq = np.array([got.count(f"a{i}") for i in range(1, k + 1)]) / n
    p = np.array([i ** -alpha for i in range(1, k + 1)])
    p /= p.sum()
    np.testing.assert_allclose(zipf_probabilities(k, alpha), p, rtol=1e-12)
    assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / n))
    assert np.all(np.diff(freq[:4]) < 0)  # the head is strictly ordered by rank


def test_distinct_never_repeats():
    got = names(scenario({"popularity": "distinct", "prefix": "cold"}, requests=300))
    assert len(set(got)) == 300 and got[0] == "cold1" and got[-1] == "cold300"


def test_base_fraction_mixes_in_base_requests():
    got = names(scenario({"popularity": "distinct", "base_fraction": 0.25}, requests=2000))
    adapters = [g for g in got if g != "base"]
    assert abs(got.count("base") / 2000 - 0.25) < 0.04
    assert len(set(adapters)) == len(adapters)  # still distinct


def test_adapter_names_are_used():
    s = scenario({"popularity": "uniform", "count": 2, "adapter_names": ["sql", "chat"]})
    assert set(names(s)) == {"sql", "chat"}
    assert adapter_labels(plan_phase(s, 0)) in (["sql", "chat"], ["chat", "sql"])


def test_same_seed_same_sequence_other_seed_differs():
    s = scenario({"popularity": "zipf", "count": 6}, requests=50, json_fraction=0.5,
                 prompt_tokens={"dist": "uniform", "min": 10, "max": 200},
                 arrivals={"mode": "poisson", "rate": 3.0})
    assert plan_phase(s, 0) == plan_phase(s, 0)
    assert plan_phase(replace(s, seed=8), 0) != plan_phase(s, 0)


def test_lengths_json_fraction_and_prompts():
    s = scenario({"popularity": "base"}, requests=1000, json_fraction=0.3, json_max_tokens=99,
                 prompt_tokens={"dist": "uniform", "min": 20, "max": 300})
    plans = plan_phase(s, 0)
    free = [p for p in plans if p.schema is None]
    js = [p for p in plans if p.schema is not None]
    assert {p.max_tokens for p in js} == {99}
    assert {p.max_tokens for p in free} == set(range(4, 13))  # uniform is inclusive of both ends
    assert abs(len(js) / 1000 - 0.3) < 0.05
    assert {p.schema_name for p in js} == {s["name"] for s in schemas_list()}
    assert len({p.prompt.rsplit("task: ", 1)[-1] for p in free}) > 30  # varied instructions
    for p in plans:  # long prompts are padded to about the target; the task comes last
        assert len(p.prompt) <= 300 * CHARS_PER_TOKEN + 200
    assert max(len(p.prompt) for p in plans) > 250 * CHARS_PER_TOKEN


def test_poisson_arrivals_have_the_rate():
    s = scenario({"popularity": "base"}, requests=4000, arrivals={"mode": "poisson", "rate": 5.0})
    t = np.array([p.arrival_s for p in plan_phase(s, 0)])
    assert t[0] == 0.0 and np.all(np.diff(t) >= 0)
    gaps = np.diff(t)
    assert abs(gaps.mean() - 0.2) < 0.02 and abs(gaps.std() - 0.2) < 0.02  # exponential: sd = mean
    closed = scenario({"popularity": "base"}, requests=5)
    assert all(p.arrival_s is None for p in plan_phase(closed, 0))


def test_phases_draw_independent_streams():
    s = parse_scenario({"seed": 1, "requests": 20, "adapters": {"popularity": "uniform", "count": 9},
                        "phases": [{"name": "x"}, {"name": "y"}]})
    assert [p.adapter for p in plan_phase(s, 0)] != [p.adapter for p in plan_phase(s, 1)]


def test_bundled_data_is_varied():
    assert len(instructions_list()) >= 40 and len(set(instructions_list())) == len(instructions_list())
    assert len(schemas_list()) == 8


@pytest.mark.parametrize("name", ["smoke", "cpu-reference", "many-adapters", "cold-adapters"])
def test_bundled_scenarios_plan(name):
    from loadtest.scenario import load_scenario
    s = load_scenario(name)
    for i in range(len(s.phases)):
        plans = plan_phase(s, i)
        assert len(plans) == s.phases[i].requests


def test_a_shared_system_prompt_is_the_same_for_every_request_of_a_phase():
    from loadtest.modelmap import ModelMap
    from loadtest.runner import request_body
    s = scenario({"popularity": "uniform", "count": 4}, requests=20, system_prompt_tokens=1000,
                 prompt_tokens={"dist": "uniform", "min": 12, "max": 40},
                 phases=[{"name": "one"}, {"name": "two", "system_prompt_tokens": 0}])
    plans = plan_phase(s, 0)
    systems = {p.system for p in plans}
    assert len(systems) == 1 and None not in systems
    (system,) = systems
    assert 0.9 * 1000 * CHARS_PER_TOKEN <= len(system) <= 1.1 * 1000 * CHARS_PER_TOKEN
    assert len({p.prompt for p in plans}) > 10                  # the user turns differ
    assert plan_phase(s, 0) == plans                            # seeded
    body = request_body(plans[0], s.phases[0], ModelMap())
    assert body["messages"][0] == {"role": "system", "content": system}
    assert body["messages"][1]["role"] == "user"
    assert all(p.system is None for p in plan_phase(s, 1))
    assert len(request_body(plan_phase(s, 1)[0], s.phases[1], ModelMap())["messages"]) == 1
