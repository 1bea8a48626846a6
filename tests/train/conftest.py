"""Shared fixtures for tests/train: a tiny random Llama folder with the default tokenizer."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from server.model.default import ensure_default_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="session")
def default_folder() -> Path:
    return ensure_default_model()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, default_folder) -> Path:
    """A random 2-layer Llama (hidden 64) saved as an HF folder, with SmolLM2's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM
    folder = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, initializer_range=0.1,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    for name in TOKENIZER_FILES:
        if (default_folder / name).is_file():
            shutil.copy(default_folder / name, folder / name)
    return folder


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}
