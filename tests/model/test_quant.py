"""NF4 base weights against transformers + bitsandbytes on the same checkpoint (a small
random Llama, so that both sides quantize in seconds; the default model's NF4 path is
exercised end to end in test_llama.py).

Both sides quantize the same float32 tensors with bitsandbytes' quantize_4bit (blocksize
64, NF4, no double quant), so the packed codes and absmax must be byte-identical.

Logits are compared twice:
- exact path (float32 dequantize + matmul on both sides): same codes, same maths, so only
  the summation-order noise of the dense test (~1e-5) remains: bound 1e-3, far below the
  NF4-vs-dense gap (~2 here, asserted > 0.1) that any wrong code, block or absmax causes;
- the fused CPU kernel both sides serve with: it computes in bfloat16, so float32 noise of
  ~1e-6 flips bf16 roundings (relative 2^-8) that the layers amplify (~0.02 here on logits
  of magnitude ~5); per layer the two sides are bit-identical on identical inputs (asserted
  with torch.equal), so the whole-model bound is 0.1, still well below the NF4 gap.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM as HFLlama

from server.config import EngineConfig
from server.model.loader import load_model
from server.model.quant import (has_fused_cpu_kernel, is_nf4, is_repacked, make_linear, nf4_codes,
                                set_fused_cpu)
from tests.model.reference import random_prompts, randomize_, reference_last_logits, run_schedule

EXACT_TOL = 1e-3
FUSED_TOL = 0.1


def _tiny_config() -> LlamaConfig:
    # every out_features a multiple of 32 and in_features of 64, as the fused CPU kernel's
    # tiles and the NF4 blocks need (true of real models)
    return LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       initializer_range=0.1, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def nf4_pair(tmp_path_factory):
    torch.manual_seed(0)
    dense = HFLlama(_tiny_config()).eval()
    randomize_(dense, 0)
    folder = tmp_path_factory.mktemp("tiny-nf4")
    dense.save_pretrained(str(folder))
    ours = load_model(EngineConfig(model=str(folder), quantization="nf4"), "cpu", torch.float32)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_compute_dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=bnb, dtype=torch.float32,
                                               device_map="cpu").eval()
    return ours, ref, dense


def test_nf4_codes_byte_identical_to_transformers(nf4_pair):
    ours, ref, dense = nf4_pair
    ref_modules = dict(ref.named_modules())
    linears = ours.lora_linears()
    assert len(linears) == 3 * 7
    for name, lin in linears.items():
        assert is_nf4(lin.base), name
        assert is_repacked(lin.base) == is_repacked(ref_modules[name])  # both sides move together
        codes, absmax = nf4_codes(lin.base)
        ref_codes, ref_absmax = nf4_codes(ref_modules[name])
        assert codes.dtype == torch.uint8 and codes.numel() == lin.in_features * lin.out_features // 2
        assert absmax.numel() == lin.in_features * lin.out_features // 64
        assert torch.equal(codes, ref_codes), name
        assert torch.equal(absmax, ref_absmax), name
        qs = lin.base.weight.quant_state
        assert qs.blocksize == 64 and qs.quant_type == "nf4" and not qs.nested


def test_nf4_logits_match_transformers_bnb(nf4_pair):
    ours, ref, dense = nf4_pair
    prompts = random_prompts([6, 21, 14], 512, seed=10)
    # Exact path on both sides (float32 dequantize + matmul): same codes, same maths.
    set_fused_cpu(ours, False)
    set_fused_cpu(ref, False)
    assert run_schedule(ours, ref, prompts, split=8, decode_steps=2) <= EXACT_TOL
    # The quantization really changed the model: NF4 logits differ clearly from dense ones.
    tokens = prompts[1]
    gap = (reference_last_logits(dense, tokens) - reference_last_logits(ref, tokens)).abs().max().item()
    assert gap > 100 * EXACT_TOL

    # The serving path on this CPU: bitsandbytes' fused kernel, in bf16 (see quant.py).
    set_fused_cpu(ours, True)
    set_fused_cpu(ref, True)
    g = torch.Generator().manual_seed(12)
    with torch.inference_mode():
        for name in ("model.layers.0.self_attn.k_proj", "model.layers.2.mlp.down_proj"):
            lin = ours.lora_linears()[name]
            x = torch.randn(5, lin.in_features, generator=g)  # (5, in)
            assert torch.equal(lin(x), ref.get_submodule(name)(x)), name  # same kernel, same codes
            if has_fused_cpu_kernel():
                assert is_repacked(lin.base)
    assert run_schedule(ours, ref, prompts, split=8, decode_steps=2) <= FUSED_TOL


def test_nf4_weight_bytes(nf4_pair):
    ours, _, dense = nf4_pair
    # 4-bit codes + one absmax per 64 weights for the linears (fp32; bf16 once the fused CPU
    # kernel has repacked them), bitsandbytes' 16-entry fp32 code book per linear; the rest
    # (embeddings, untied lm_head, norms) dense fp32
    linears = ours.lora_linears()
    linear_params = sum(l.in_features * l.out_features for l in linears.values())
    absmax_size = linears["model.layers.0.mlp.up_proj"].base.weight.quant_state.absmax.element_size()
    dense_params = sum(p.numel() for p in dense.parameters()) - linear_params
    expected = linear_params // 2 + linear_params // 64 * absmax_size + len(linears) * 16 * 4 + dense_params * 4
    assert ours.weight_bytes() == expected


@pytest.mark.parametrize("fused", [False, True])
def test_make_linear_nf4_matches_dequantized_reference(fused):
    """One NF4 linear against a float64 matmul with bitsandbytes' own dequantized weight."""
    import bitsandbytes.functional as F
    torch.manual_seed(0)
    w = torch.randn(96, 128) * 0.05
    b = torch.randn(96)
    lin = make_linear(w, b, "nf4", torch.device("cpu"), torch.float32)
    set_fused_cpu(lin, fused)
    codes, _ = nf4_codes(lin)
    deq = F.dequantize_4bit(codes, lin.weight.quant_state)  # (96, 128)
    assert (deq - w).abs().max().item() > 1e-4  # it is quantized, not the dense weight
    x = torch.randn(5, 128)
    with torch.inference_mode():
        y = lin(x)  # (5, 96)
    expected = x.double() @ deq.double().T + b.double()
    # exact path: float32 rounding only; fused CPU kernel: bf16 activations and absmax
    # (relative 2^-8 each) over 128 products of outputs of magnitude ~0.6
    tol = 2e-2 if fused and has_fused_cpu_kernel() else 1e-5
    assert (y.double() - expected).abs().max().item() < tol


def test_shapes_the_fused_kernel_cannot_tile_use_the_exact_path():
    torch.manual_seed(1)
    w = torch.randn(40, 64)  # 40 rows: not a multiple of the fused kernel's 32-row tiles
    lin = make_linear(w, None, "nf4", torch.device("cpu"), torch.float32)
    import bitsandbytes.functional as F
    deq = F.dequantize_4bit(nf4_codes(lin)[0], lin.weight.quant_state)  # (40, 64)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        assert torch.allclose(lin(x), x @ deq.T, atol=1e-5)  # (3, 40)
    assert not is_repacked(lin)
