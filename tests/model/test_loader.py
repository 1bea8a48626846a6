"""load_model: folders, shards, GGUF cache keys, and every way a model path can be bad."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM as HFLlama

from server.config import EngineConfig
from server.errors import ModelLoadError
from server.model import loader
from server.model.loader import load_model
from tests.model.reference import random_prompts, randomize_, run_schedule


def _tiny_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       initializer_range=0.2, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, HFLlama]:
    torch.manual_seed(0)
    ref = HFLlama(_tiny_config()).eval()
    randomize_(ref, 0)
    path = tmp_path_factory.mktemp("tiny")
    ref.save_pretrained(str(path))
    return path, ref


def _load(path: Path | str, quantization: str = "none"):
    return load_model(EngineConfig(model=str(path), quantization=quantization), "cpu", torch.float32)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_matches_reference(tiny, tmp_path):
    path, ref = tiny
    ref.save_pretrained(str(tmp_path), max_shard_size="40KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    ours = _load(tmp_path)
    prompts = random_prompts([4, 11, 7], 128, seed=1)
    assert run_schedule(ours, ref, prompts, split=5, decode_steps=2) <= 1e-3


def test_nf4_load_of_tiny_model(tiny):
    path, _ = tiny
    ours = _load(path, "nf4")
    dense = _load(path, "none")
    assert ours.weight_bytes() < dense.weight_bytes()
    q = ours.lora_linears()["model.layers.1.self_attn.o_proj"]
    assert q.base.weight.dtype == torch.uint8 and (q.in_features, q.out_features) == (64, 64)


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist.*nowhere"):
        _load(tmp_path / "nowhere")


def test_folder_without_config(tiny, tmp_path):
    path = _copy(tiny[0], tmp_path / "m")
    (path / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        _load(path)


def test_folder_without_weights(tiny, tmp_path):
    path = _copy(tiny[0], tmp_path / "m")
    for f in path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelLoadError, match=r"no \*.safetensors"):
        _load(path)


def test_unsupported_architecture_is_named(tiny, tmp_path):
    path = _copy(tiny[0], tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel") as e:
        _load(path)
    assert "config.json" in str(e.value)


def test_unsupported_rope_type(tiny, tmp_path):
    path = _copy(tiny[0], tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="yarn"):
        _load(path)


def test_truncated_safetensors(tiny, tmp_path):
    path = _copy(tiny[0], tmp_path / "m")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        _load(path)


def test_garbage_safetensors(tiny, tmp_path):
    path = _copy(tiny[0], tmp_path / "m")
    (path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="corrupt or unreadable.*model.safetensors"):
        _load(path)


def test_missing_tensor_is_named(tiny, tmp_path):
    path = _copy(tiny[0], tmp_path / "m")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        _load(path)


def test_wrong_shape_is_named(tiny, tmp_path):
    path = _copy(tiny[0], tmp_path / "m")
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.norm.weight"] = torch.ones(65)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"model\.norm\.weight.*\(65,\).*\(64,\)"):
        _load(path)


def test_shard_named_in_index_but_missing(tiny, tmp_path):
    tiny[1].save_pretrained(str(tmp_path), max_shard_size="40KB")
    victim = sorted(tmp_path.glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(ModelLoadError, match=victim.name):
        _load(tmp_path)


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="model.bin"):
        _load(f)


def test_gguf_converted_once_into_cache_keyed_by_hash(tiny, tmp_path, monkeypatch):
    """The GGUF path: converted into <cache>/gguf-<sha256 prefix>, reused on the next load."""
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path / "cache"))
    calls: list[Path] = []

    def fake_convert(gguf: Path, target: Path) -> None:  # stands in for transformers' converter
        calls.append(gguf)
        shutil.copytree(tiny[0], target)

    import server.model.default as default
    monkeypatch.setattr(default, "convert_gguf", fake_convert)
    a = tmp_path / "a.gguf"
    a.write_bytes(b"GGUF" + b"\1" * 100)
    first = loader.resolve_model_dir(str(a))
    assert first.parent == tmp_path / "cache" and first.name.startswith("gguf-")
    assert loader.resolve_model_dir(str(a)) == first and len(calls) == 1
    b = tmp_path / "b.gguf"
    b.write_bytes(b"GGUF" + b"\2" * 100)
    assert loader.resolve_model_dir(str(b)) != first and len(calls) == 2
    assert _load(a).arch.num_layers == 2


def test_corrupt_gguf_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="bad.gguf"):
        _load(bad)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def _slot_dtypes(model) -> set:
    slots = [m.slots for m in model.lora_linears().values()]
    return {s.a.dtype for s in slots} | {s.b.dtype for s in slots}


def test_lora_slots_are_bf16_for_nf4_on_the_cpu_kernels_and_exact_when_asked(tiny):
    """auto: bf16 slots for an NF4 float32 model where the CPU kernels run (half the bytes an
    adapter row reads); float32 slots for a dense model and whenever lora_dtype says so."""
    folder, _ = tiny
    nf4 = load_model(EngineConfig(model=str(folder), quantization="nf4", max_loras=2), "cpu", torch.float32)
    assert _slot_dtypes(nf4) == {torch.bfloat16}
    exact = load_model(EngineConfig(model=str(folder), quantization="nf4", max_loras=2, lora_dtype="float32"),
                       "cpu", torch.float32)
    assert _slot_dtypes(exact) == {torch.float32}
    dense = load_model(EngineConfig(model=str(folder), quantization="none", max_loras=2), "cpu", torch.float32)
    assert _slot_dtypes(dense) == {torch.float32}
    asked = load_model(EngineConfig(model=str(folder), quantization="none", max_loras=2, lora_dtype="bfloat16"),
                       "cpu", torch.float32)
    assert _slot_dtypes(asked) == {torch.bfloat16}


def test_a_lora_dtype_that_cannot_run_is_refused_with_the_reason(tiny, monkeypatch):
    folder, _ = tiny
    with pytest.raises(ModelLoadError, match="lora_dtype float32 needs a float32 model"):
        load_model(EngineConfig(model=str(folder), quantization="none", lora_dtype="float32"), "cpu", torch.bfloat16)
    monkeypatch.setattr(loader, "_cpu_kernel", lambda device: None)  # no CPU kernels here
    with pytest.raises(ModelLoadError, match="lora_dtype bfloat16 needs .* CPU kernels"):
        load_model(EngineConfig(model=str(folder), quantization="nf4", lora_dtype="bfloat16"), "cpu", torch.float32)
    auto = load_model(EngineConfig(model=str(folder), quantization="nf4", max_loras=2), "cpu", torch.float32)
    assert _slot_dtypes(auto) == {torch.float32}  # auto falls back to the exact slots
    from server.config import ConfigError
    with pytest.raises(ConfigError, match="lora_dtype must be one of"):
        EngineConfig(lora_dtype="float16")


def test_the_cli_passes_lora_dtype_through():
    from server.cli import build_parser, engine_config
    assert engine_config(build_parser().parse_args(["bench", "--lora-dtype", "float32"])).lora_dtype == "float32"
    assert engine_config(build_parser().parse_args(["bench"])).lora_dtype == "auto"


def test_a_bfloat16_model_keeps_its_dtype_for_the_head_and_the_slots(tiny):
    """lm_head_dtype float32 on a bf16 model keeps the head in the model dtype (as before);
    lora_dtype auto gives its slots the model dtype; neither refuses."""
    folder, _ = tiny
    model = load_model(EngineConfig(model=str(folder), quantization="none", lm_head_dtype="float32", max_loras=2),
                       "cpu", torch.bfloat16)
    assert model.lm_head_bf16 is None and _slot_dtypes(model) == {torch.bfloat16}
