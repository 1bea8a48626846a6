"""server/train/trainer.py end to end on a tiny random Llama (NF4 base, as the server runs it).

The adapter it writes is checked three ways: against the base before training (B = 0, so
the model is the base), as a file (PEFT layout, safetensors keys, provenance), and served:
the server's model with the adapter in a slot gives PEFT's logits on the same NF4 base
(tolerance: tests/train/helpers.py).
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from server.cli import main as cli_main
from server.train.config import TrainConfig
from server.train.data import load_examples
from server.train.model import add_lora, load_base, load_tokenizer
from server.fingerprint import model_content_hash, read_base_hash
from server.train.provenance import BASE_MODEL
from server.train.trainer import make_batch, train
from tests.train.conftest import chat, write_jsonl
from tests.train.helpers import TOL, peft_logits, server_logits

WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "candle", "forest", "rocket", "violet", "bridge"]
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
PEFT_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


@pytest.fixture(scope="module")
def tiny_cfg(tiny_folder, tmp_path_factory) -> TrainConfig:
    root = tmp_path_factory.mktemp("train")
    data = write_jsonl(root / "data.jsonl", [chat(f"Spell {w}.", " ".join(w.upper())) for w in WORDS])
    return TrainConfig(data=str(data), out=str(root / "adapters" / "tiny"), model=str(tiny_folder), r=4,
                       targets=TARGETS, epochs=6, lr=3e-2, batch=4, max_len=64, seed=0)


@pytest.fixture(scope="module")
def trained(tiny_cfg):
    return train(tiny_cfg, progress=False)


def test_lora_starts_as_the_base(tiny_cfg, tiny_folder):
    tok = load_tokenizer(tiny_folder)
    batch = make_batch(load_examples(tiny_cfg.data, tok, tiny_cfg.max_len)[:3], tok.pad_token_id, "cpu")
    model = load_base(tiny_folder, tiny_cfg).eval()
    with torch.no_grad():
        base = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    peft = add_lora(model, tiny_cfg).eval()
    b_weights = {n: p for n, p in peft.named_parameters() if "lora_B" in n}
    a_weights = {n: p for n, p in peft.named_parameters() if "lora_A" in n}
    assert len(b_weights) == len(a_weights) == 2 * len(TARGETS)
    assert all(torch.count_nonzero(p) == 0 for p in b_weights.values())
    assert all(torch.count_nonzero(p) > 0 for p in a_weights.values())
    assert {n for n, p in peft.named_parameters() if p.requires_grad} == set(a_weights) | set(b_weights)
    with torch.no_grad():
        wrapped = peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(wrapped, base, rtol=0, atol=0)


def test_loss_decreases(trained, tiny_cfg):
    assert trained.steps == 6 * 3 and len(trained.losses) == trained.steps  # 12 examples / batch 4, 6 epochs
    first, last = sum(trained.losses[:3]) / 3, sum(trained.losses[-3:]) / 3
    assert last < first - 1.5, trained.losses  # nats; starts near ln(49152) = 10.8


def test_adapter_files_and_provenance(trained, tiny_cfg, tiny_folder):
    out = trained.out
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["bias"]) == ("LORA", 4, 8.0, "none")
    assert sorted(cfg["target_modules"]) == sorted(f"{t}_proj" for t in TARGETS)
    assert not cfg.get("modules_to_save") and not cfg.get("use_dora")
    assert cfg["inference_mode"] is True and cfg["base_model_name_or_path"] == str(tiny_folder)
    expected = {f"base_model.model.model.layers.{i}.{PEFT_NAMES[t]}.lora_{ab}.weight"
                for i in range(2) for t in TARGETS for ab in "AB"}
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == expected
        meta = f.metadata()
        b = f.get_tensor("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight")
        assert b.shape == (64, 4) and b.dtype == torch.float32 and torch.count_nonzero(b) > 0
    assert read_base_hash(out / "adapter_model.safetensors") == model_content_hash(tiny_folder)
    assert meta[BASE_MODEL] == str(tiny_folder)


def test_rewriting_keeps_other_files(trained, tiny_cfg):
    readme = trained.out / "README.md"
    readme.write_text("kept")
    try:
        again = train(dataclasses.replace(tiny_cfg, epochs=1), progress=False)
        assert again.out == trained.out and readme.read_text() == "kept"
        assert not [p for p in trained.out.parent.iterdir() if p.name.startswith(".")]  # no temp left
    finally:
        readme.unlink()


def test_dense_base_trains_too(tiny_cfg, tmp_path):
    """--quantization none: the same loop on the fp32 base (no bitsandbytes)."""
    result = train(dataclasses.replace(tiny_cfg, quantization="none", out=str(tmp_path / "dense")), progress=False)
    assert sum(result.losses[-3:]) / 3 < sum(result.losses[:3]) / 3 - 1.5, result.losses
    with safe_open(str(result.out / "adapter_model.safetensors"), framework="pt") as f:
        assert '"quantization": "none"' in f.metadata()["loraplex_train"]


def test_server_serves_the_adapter_like_peft(trained, tiny_folder):
    tok = load_tokenizer(tiny_folder)
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Spell {w}."}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False) for w in ("apple", "zebra", "moon")]
    ref_lora, ref_base = peft_logits(tiny_folder, trained.out, prompts)
    ours_lora, ours_base = server_logits(tiny_folder, trained.out, prompts)
    assert (ref_lora - ref_base).abs().max() > 100 * TOL  # the adapter changes the output
    assert (ours_base - ref_base).abs().max() <= TOL
    assert (ours_lora - ref_lora).abs().max() <= TOL


def test_cli_reports_bad_data_with_line_numbers(tiny_folder, tmp_path, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", [chat("a", "b"), {"prompt": 3, "completion": "x"}])
    rc = cli_main(["train", "--model", str(tiny_folder), "--data", str(data), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "line 2: 'prompt' must be a string" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
    rc = cli_main(["train", "--data", str(data), "--out", str(tmp_path / "x"), "--targets", "q,lm_head"])
    assert rc == 2 and "unknown --targets ['lm_head']" in capsys.readouterr().err
