import pytest

from loadtest.scenario import ScenarioError, bundled_names, load_scenario, parse_scenario

BASE = {"name": "t", "arrivals": {"mode": "closed", "concurrency": 2}, "requests": 10,
        "adapters": {"popularity": "uniform", "count": 3}, "max_tokens": 16}


def test_bundled_scenarios_load():
    names = bundled_names()
    assert {"smoke", "cpu-reference", "many-adapters", "cold-adapters"} <= set(names)
    ref = load_scenario("cpu-reference")
    (phase,) = ref.phases
    assert (phase.requests, phase.arrivals.concurrency, phase.max_tokens.value) == (64, 8, 64)
    assert (phase.adapters.popularity, phase.adapters.count, phase.json_fraction) == ("uniform", 4, 0.5)
    smoke = load_scenario("smoke.yaml")
    assert smoke.phases[0].requests == 6 and smoke.phases[0].max_tokens.value == 8


def test_phases_override_top_level_keys():
    s = load_scenario("many-adapters")
    assert [p.name for p in s.phases] == ["base-only", "adapters-32"]
    base, many = s.phases
    assert base.adapters.popularity == "base" and many.adapters.popularity == "distinct"
    assert base.requests == many.requests == 32 and base.arrivals == many.arrivals
    assert base.max_tokens == many.max_tokens


def test_lengths_fixed_and_uniform():
    s = parse_scenario({**BASE, "prompt_tokens": {"dist": "uniform", "min": 8, "max": 20},
                        "max_tokens": {"dist": "fixed", "value": 5}})
    p = s.phases[0]
    assert (p.prompt_tokens.dist, p.prompt_tokens.min, p.prompt_tokens.max) == ("uniform", 8, 20)
    assert p.max_tokens.value == 5 and p.json_max_tokens.value == 5


@pytest.mark.parametrize("patch, words", [
    ({"arrivals": {"mode": "open"}}, "arrivals.mode"),
    ({"arrivals": {"mode": "closed", "concurrency": 0}}, "concurrency"),
    ({"arrivals": {"mode": "poisson", "rate": -1}}, "rate"),
    ({"adapters": {"popularity": "pareto"}}, "popularity"),
    ({"adapters": {"popularity": "zipf", "count": 4, "alpha": 0}}, "alpha"),
    ({"adapters": {"popularity": "uniform", "count": 3, "colour": 1}}, "colour"),
    ({"adapters": {"popularity": "uniform", "count": 3, "adapter_names": ["x", "y"]}}, "adapter_names"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": {"dist": "uniform", "min": 9, "max": 3}}, "min=9"),
    ({"json_fraction": 1.5}, "json_fraction"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
    ({"system_prompt_tokens": -1}, "system_prompt_tokens"),
    ({"system_prompt_tokens": 1.5}, "system_prompt_tokens"),
    ({"requets": 3}, "requets"),
    ({"phases": [{"name": "a"}, {"name": "a"}]}, "unique"),
    ({"phases": [{"seed": 3}]}, "seed"),
])
def test_bad_values_raise_with_the_offending_key(patch, words):
    with pytest.raises(ScenarioError, match=words):
        parse_scenario({**BASE, **patch})


def test_missing_file_names_bundled_ones(tmp_path):
    with pytest.raises(ScenarioError, match="smoke"):
        load_scenario(str(tmp_path / "nope.yaml"))


def test_bad_yaml_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("requests: [1, 2\n")
    with pytest.raises(ScenarioError, match="bad.yaml"):
        load_scenario(str(f))


def test_adapter_names_replace_labels():
    s = parse_scenario({**BASE, "adapters": {"popularity": "uniform", "count": 2, "adapter_names": ["sql", "chat"]}})
    pop = s.phases[0].adapters
    assert (pop.label(1), pop.label(2)) == ("sql", "chat")
