"""bench-local's set-up: the adapters it writes are ones the server reads for the default model."""
import json
import os

import torch

from loadtest.bench import write_adapters
from loadtest.scenario import load_scenario
from loadtest.workload import adapter_labels, plan_phase
from server.lora.adapter import LoraArch, read_adapter
from server.model.default import ensure_default_model


def test_labels_of_the_bundled_scenarios():
    assert sorted(adapter_labels(plan_phase(load_scenario("cpu-reference"), 0))) == ["a1", "a2", "a3", "a4"]
    cold = adapter_labels(plan_phase(load_scenario("cold-adapters"), 0))
    assert cold == [f"cold{i}" for i in range(1, 33)]
    many = load_scenario("many-adapters")
    assert adapter_labels(plan_phase(many, 0)) == [] and len(adapter_labels(plan_phase(many, 1))) == 32


def test_written_adapters_load_for_the_default_model(tmp_path):
    write_adapters(["a1", "a2"], str(tmp_path), "default", rank=8, alpha=16.0, targets=("q_proj", "v_proj"))
    cfg = json.loads((ensure_default_model() / "config.json").read_text())
    arch = LoraArch.llama(cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"],
                          cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg.get("head_dim", 0))
    a1 = read_adapter("a1", os.path.join(tmp_path, "a1"), arch, max_lora_rank=16)
    a2 = read_adapter("a2", os.path.join(tmp_path, "a2"), arch, max_lora_rank=16)
    assert a1.rank == 8 and a1.targets == ("q_proj", "v_proj")
    assert len(a1.weights) == 2 * cfg["num_hidden_layers"]
    a, b = a1.weights["model.layers.0.self_attn.q_proj"]
    assert a.shape == (8, 576) and b.shape == (576, 8) and torch.count_nonzero(b) == b.numel()
    assert not torch.equal(b, a2.weights["model.layers.0.self_attn.q_proj"][1])  # seeded per adapter
