import pytest

from loadtest.modelmap import ModelMapError, load_model_map, parse_model_map


def test_no_map_sends_labels_unchanged():
    m = load_model_map(None)
    assert m.resolve("a3").model == "a3" and m.resolve("a3").body == {}


def test_entries_bodies_and_fallback(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text('base: smol\na1: {model: smol, body: {lora: [{id: 0, scale: 1.0}]}}\n"*": {model: "org/{name}"}\n')
    m = load_model_map(str(f))
    assert m.resolve("base").model == "smol"
    assert m.resolve("a1").body == {"lora": [{"id": 0, "scale": 1.0}]}
    assert m.resolve("a7").model == "org/a7"


def test_json_map_and_missing_label(tmp_path):
    f = tmp_path / "m.json"
    f.write_text('{"base": "x"}')
    with pytest.raises(ModelMapError, match="'a1'"):
        load_model_map(str(f)).resolve("a1")


@pytest.mark.parametrize("raw", [[], {}, {"a1": 3}, {"a1": {"model": "m", "extra": 1}},
                                 {"a1": {"model": "m", "body": {"messages": []}}}])
def test_bad_maps_raise(raw):
    with pytest.raises(ModelMapError):
        parse_model_map(raw)


@pytest.mark.parametrize("name", ["loraplex.yaml", "vllm.yaml", "llamacpp.yaml", "lorax.yaml"])
def test_shipped_maps_parse(name):
    m = load_model_map(name)
    for label in ("base", "a1", "a2", "a3", "a4"):
        assert m.resolve(label).model
