"""server/lora/adapter.py: PEFT adapters read with PEFT's semantics; every bad case is an AdapterError."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.errors import AdapterError
from server.lora.adapter import LoraArch, read_adapter, write_random_adapter
from tests.lora.helpers import save_peft_adapter, tiny_arch, tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def _peft_factors(model, path):
    """{module: (A, scaling * B)} as PeftModel holds them after loading `path`."""
    from peft import PeftModel
    pm = PeftModel.from_pretrained(model, path)
    out = {}
    for name, mod in pm.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            out[name] = (mod.lora_A["default"].weight.detach().clone(),
                         mod.lora_B["default"].weight.detach() * mod.scaling["default"])
    pm.unload()
    return out


@pytest.mark.parametrize("kwargs", [
    dict(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj")),
    dict(r=8, lora_alpha=8, use_rslora=True, target_modules=("q_proj", "down_proj")),
    dict(r=8, lora_alpha=32, target_modules=("q_proj", "k_proj", "o_proj", "up_proj"),
         rank_pattern={"q_proj": 4, r"layers\.1\.self_attn\.o_proj": 2}, alpha_pattern={"up_proj": 3}),
    dict(r=4, lora_alpha=8, target_modules=r".*\.(gate|down)_proj"),
    dict(r=4, lora_alpha=8, target_modules=("v_proj", "gate_proj"), layers_to_transform=[1]),
], ids=["basic", "rslora", "patterns", "regex", "layers"])
def test_matches_peft(model, tmp_path, kwargs):
    path = save_peft_adapter(model, str(tmp_path / "ad"), seed=3, **kwargs)
    ad = read_adapter("ad", path, tiny_arch(), max_lora_rank=16)
    want = _peft_factors(model, path)
    assert set(ad.weights) == set(want) and want
    for module, (a, b) in ad.weights.items():
        torch.testing.assert_close(a, want[module][0])
        torch.testing.assert_close(b, want[module][1])
        assert b.abs().sum() > 0
    assert ad.rank == max(a.shape[0] for a, _ in want.values())
    assert len(ad.content_hash) == 64 and ad.identity.startswith("ad@")


def test_rslora_and_rank_pattern_scale(model, tmp_path):
    path = save_peft_adapter(model, str(tmp_path / "r"), seed=4, r=16, lora_alpha=8, use_rslora=True,
                             target_modules=("q_proj",))
    raw = load_file(os.path.join(path, "adapter_model.safetensors"))
    ad = read_adapter("r", path, tiny_arch(), 16)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    torch.testing.assert_close(ad.weights["model.layers.0.self_attn.q_proj"][1], raw[key] * (8 / math.sqrt(16)))


def test_written_random_adapter_loads_in_peft(model, tmp_path):
    path = write_random_adapter(str(tmp_path / "w"), tiny_arch(), r=4, alpha=8, targets=("k_proj", "up_proj"),
                                seed=1, rank_pattern={"up_proj": 2})
    ad = read_adapter("w", path, tiny_arch(), 16)
    want = _peft_factors(model, path)
    assert set(ad.weights) == set(want)
    for module, (a, b) in ad.weights.items():
        torch.testing.assert_close(a, want[module][0])
        torch.testing.assert_close(b, want[module][1])
        assert a.abs().sum() > 0 and b.abs().sum() > 0
    assert ad.weights["model.layers.0.mlp.up_proj"][0].shape == (2, 64)
    # same seed -> same content hash; another seed -> another identity
    again = write_random_adapter(str(tmp_path / "w2"), tiny_arch(), 4, 8, ("k_proj", "up_proj"), 1,
                                 rank_pattern={"up_proj": 2})
    other = write_random_adapter(str(tmp_path / "w3"), tiny_arch(), 4, 8, ("k_proj", "up_proj"), 2,
                                 rank_pattern={"up_proj": 2})
    assert read_adapter("w", again, tiny_arch(), 16).content_hash == ad.content_hash
    assert read_adapter("w", other, tiny_arch(), 16).content_hash != ad.content_hash


def _edit_config(path, **changes):
    cfg_path = os.path.join(path, "adapter_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)


def _bad(tmp_path, how):
    path = write_random_adapter(str(tmp_path / "bad"), tiny_arch(), r=4, alpha=8, targets=("q_proj", "v_proj"), seed=0)
    wfile = os.path.join(path, "adapter_model.safetensors")
    if how == "dora":
        _edit_config(path, use_dora=True)
    elif how == "modules_to_save":
        _edit_config(path, modules_to_save=["lm_head"])
    elif how == "lm_head":
        _edit_config(path, target_modules=["q_proj", "v_proj", "lm_head"])
    elif how == "embedding":
        _edit_config(path, target_modules=".*(embed_tokens|q_proj|v_proj)")
    elif how == "bias":
        _edit_config(path, bias="lora_only")
    elif how == "rank":
        write_random_adapter(path, tiny_arch(), r=32, alpha=8, targets=("q_proj",), seed=0)
    elif how == "unknown":
        _edit_config(path, target_modules=["q_proj", "v_proj", "w_proj"])
    elif how == "no_match":
        _edit_config(path, target_modules=".*nothing")
    elif how == "shape":
        big = LoraArch.llama(128, 256, 2, 4, 2)
        write_random_adapter(path, big, r=4, alpha=8, targets=("q_proj", "v_proj"), seed=0)
    elif how == "missing":
        os.remove(wfile)
    elif how == "bin":
        os.remove(wfile)
        with open(os.path.join(path, "adapter_model.bin"), "wb") as f:
            f.write(b"\x80\x04pickle that must never be loaded")
    elif how == "corrupt":
        with open(wfile, "wb") as f:
            f.write(b"not safetensors at all")
    elif how == "only_a":
        t = load_file(wfile)
        save_file({k: v for k, v in t.items() if "lora_B" not in k or "layers.1.self_attn.q" not in k}, wfile)
    elif how == "untargeted":
        _edit_config(path, target_modules=["q_proj"])
    elif how == "no_config":
        os.remove(os.path.join(path, "adapter_config.json"))
    elif how == "regex":
        _edit_config(path, target_modules="(q_proj")
    elif how == "pattern_rank":
        _edit_config(path, rank_pattern={"q_proj": "eight"})
    elif how == "json":
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            f.write("{not json")
    return path


@pytest.mark.parametrize("how,file,words", [
    ("dora", "adapter_config.json", "use_dora"),
    ("modules_to_save", "adapter_config.json", "modules_to_save"),
    ("lm_head", "adapter_config.json", "lm_head"),
    ("embedding", "adapter_config.json", "embed_tokens"),
    ("bias", "adapter_config.json", "bias 'lora_only'"),
    ("rank", "adapter_config.json", "LoRA rank 32 is greater than max_lora_rank 16"),
    ("unknown", "adapter_config.json", "unknown target module 'w_proj'"),
    ("no_match", "adapter_config.json", "matches no module"),
    ("shape", "adapter_model.safetensors", "do not fit the base"),
    ("missing", "adapter_model.safetensors", "missing"),
    ("bin", "adapter_model.safetensors", "adapter_model.bin, which is a pickle"),
    ("corrupt", "adapter_model.safetensors", "not a readable safetensors"),
    ("only_a", "adapter_model.safetensors", "needs both lora_A and lora_B"),
    ("untargeted", "adapter_model.safetensors", "does not target"),
    ("no_config", "adapter_config.json", "missing"),
    ("json", "adapter_config.json", "not valid JSON"),
    ("regex", "adapter_config.json", "invalid regular expression"),
    ("pattern_rank", "adapter_config.json", "rank 'eight'"),
])
def test_refuses(tmp_path, how, file, words):
    path = _bad(tmp_path, how)
    with pytest.raises(AdapterError) as e:
        read_adapter("bad", path, tiny_arch(), max_lora_rank=16)
    assert file in str(e.value) and words in str(e.value), str(e.value)
