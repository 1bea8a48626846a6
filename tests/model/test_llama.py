"""LlamaForCausalLM against transformers' forward on the same weights (fp32, dense).

Tolerance: both sides compute in float32 from identical weights; they differ only in
summation order (SDPA vs transformers' attention, batched vs single-sequence matmuls), which
moves logits by ~1e-5 here. 1e-3 leaves room for BLAS differences yet catches any wrong
rotary, mask, cache slot or norm (those move logits by >1e-1).
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM as HFLlama, Qwen2Config, Qwen2ForCausalLM

from server.config import EngineConfig
from server.model.default import ensure_default_model
from server.model.loader import load_model
from tests.model.reference import random_prompts, randomize_, run_schedule

TOL = 1e-3


@pytest.fixture(scope="module")
def default_pair():
    folder = ensure_default_model()
    ours = load_model(EngineConfig(model=str(folder), quantization="none"), "cpu", torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return ours, ref


def test_default_model_matches_transformers(default_pair):
    ours, ref = default_pair
    prompts = random_prompts([5, 23, 12, 37], ours.arch.vocab_size, seed=0)
    assert run_schedule(ours, ref, prompts, split=9, decode_steps=3) <= TOL


def test_default_model_arch_and_names(default_pair):
    ours, _ = default_pair
    a = ours.arch
    assert (a.hidden_size, a.num_layers, a.num_heads, a.num_kv_heads, a.head_dim) == (576, 30, 9, 3, 64)
    assert (a.intermediate_size, a.vocab_size, a.tie_word_embeddings) == (1536, 49152, True)
    assert a.eos_token_ids == (2,)
    names = ours.lora_linears()
    assert len(names) == 30 * 7
    assert "model.layers.0.self_attn.q_proj" in names and "model.layers.29.mlp.down_proj" in names
    assert names["model.layers.3.mlp.gate_proj"].out_features == 1536
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    # dense fp32: every parameter once (the tied lm_head is not counted twice)
    assert ours.weight_bytes() == 134_515_008 * 4  # SmolLM2-135M's parameter count, fp32


def _tiny(cls, config, tmp_path, seed):
    torch.manual_seed(seed)
    ref = cls(config).eval()
    randomize_(ref, seed)
    ref.save_pretrained(str(tmp_path))
    ours = load_model(EngineConfig(model=str(tmp_path), quantization="none"), "cpu", torch.float32)
    return ours, ref


def test_qwen2_qkv_bias_untied(tmp_path):
    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, initializer_range=0.2, rope_theta=10000.0)
    ours, ref = _tiny(Qwen2ForCausalLM, config, tmp_path, seed=1)
    assert ours.arch.qkv_bias and not ours.arch.o_bias and not ours.arch.tie_word_embeddings
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight
    q = ours.model.layers[0].self_attn.q_proj.base
    assert q.bias is not None and q.bias.abs().sum() > 0
    prompts = random_prompts([3, 19, 8], 300, seed=2)
    assert run_schedule(ours, ref, prompts, split=6, decode_steps=3, block_size=4) <= TOL


def test_llama3_rope_scaling(tmp_path):
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512,
                         initializer_range=0.2, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 32})
    ours, ref = _tiny(HFLlama, config, tmp_path, seed=3)
    assert ours.arch.rope.rope_type == "llama3"
    # the scaled frequencies must differ from the plain ones, or this test proves nothing
    from server.model.layers import RopeConfig, rope_inv_freq
    plain = rope_inv_freq(RopeConfig(theta=500000.0), 16)
    assert not torch.allclose(ours.inv_freq, plain)
    prompts = random_prompts([40, 70, 9], 256, seed=4)  # past original_max_position_embeddings
    assert run_schedule(ours, ref, prompts, split=33, decode_steps=2, block_size=8) <= TOL


def test_decode_batch_order_and_padding_do_not_leak(default_pair):
    """A sequence's logits do not depend on which other sequences share its decode step."""
    ours, _ = default_pair
    from tests.model.paged import PagedSequences
    ours.allocate_kv_cache(32, 4)
    pages = PagedSequences(32, 4, seed=5)
    a, b = random_prompts([3, 30], ours.arch.vocab_size, seed=6)
    pages.step({0: a, 1: b})
    together = ours(pages.step({0: [7], 1: [8]}))
    alone_pages = PagedSequences(32, 4, seed=7)
    ours.allocate_kv_cache(32, 4)
    alone_pages.step({0: a})
    alone = ours(alone_pages.step({0: [7]}))
    assert (together[0] - alone[0]).abs().max().item() <= TOL


@pytest.mark.parametrize("quantization,dtype", [("nf4", torch.float32), ("none", torch.bfloat16)])
def test_greedy_chat_answer(quantization, dtype):
    """The default model answers a factual question through the paged cache: NF4 as served
    on CPU, and bfloat16 (the CUDA compute dtype) through our layers."""
    from transformers import AutoTokenizer
    from tests.model.paged import PagedSequences
    folder = ensure_default_model()
    model = load_model(EngineConfig(model=str(folder), quantization=quantization), "cpu", dtype)
    dense_fp32 = 134_515_008 * 4
    # NF4 serves its LM head from a bf16 copy of the tied embedding (tests/model/test_lm_head.py)
    head_copy = 0 if model.lm_head_bf16 is None else model.lm_head_bf16.numel() * 2
    assert (head_copy > 0) == (quantization == "nf4")
    assert model.weight_bytes() - head_copy < (0.35 if quantization == "nf4" else 0.51) * dense_fp32
    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True)
    ids = ids if isinstance(ids, list) else ids["input_ids"]
    model.allocate_kv_cache(16, 16)
    pages = PagedSequences(16, 16)
    logits = model(pages.step({0: ids}))
    out: list[int] = []
    for _ in range(10):
        out.append(int(logits.argmax(-1)[0]))
        logits = model(pages.step({0: out[-1:]}))
    assert "Paris" in tok.decode(out)


def test_mistral(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM
    config = MistralConfig(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32,  # 4*32 != 64
                           max_position_embeddings=256, sliding_window=None, initializer_range=0.2,
                           tie_word_embeddings=False)
    ours, ref = _tiny(MistralForCausalLM, config, tmp_path, seed=8)
    assert ours.arch.architecture == "MistralForCausalLM" and ours.arch.head_dim == 32
    prompts = random_prompts([5, 13, 9], 200, seed=9)
    assert run_schedule(ours, ref, prompts, split=7, decode_steps=2) <= TOL


def test_sliding_window_caps_the_context():
    from server.model.llama import LlamaArch
    base = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 64,
            "num_attention_heads": 4, "num_hidden_layers": 1, "intermediate_size": 96, "vocab_size": 10,
            "max_position_embeddings": 32768}
    assert LlamaArch.from_config({**base, "sliding_window": 4096}, None, "c").max_position_embeddings == 4096
    assert LlamaArch.from_config({**base, "sliding_window": None}, None, "c").max_position_embeddings == 32768
    qwen = {**base, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "sliding_window": 4096}
    assert LlamaArch.from_config({**qwen, "use_sliding_window": False}, None, "c").max_position_embeddings == 32768
    assert LlamaArch.from_config({**qwen, "use_sliding_window": True}, None, "c").max_position_embeddings == 4096


def test_eos_ids_from_config_and_generation_config():
    from server.model.llama import LlamaArch
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
           "num_hidden_layers": 1, "intermediate_size": 96, "vocab_size": 10, "eos_token_id": 7}
    assert LlamaArch.from_config(cfg, {"eos_token_id": [5, 7, 9]}, "c").eos_token_ids == (5, 7, 9)
    assert LlamaArch.from_config(cfg, None, "c").eos_token_ids == (7,)
    from server.errors import ModelLoadError
    with pytest.raises(ModelLoadError, match="hidden_size"):
        LlamaArch.from_config({k: v for k, v in cfg.items() if k != "hidden_size"}, None, "c")
