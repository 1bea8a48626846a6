"""Helpers for tests/train: last-token logits of an adapter served by PEFT and by the server.

Tolerance: both sides compute the NF4 base in float32 on identical codes (PEFT's model on
bitsandbytes' exact dequantize + matmul, its bf16 CPU kernel switched off; ours on the
CPU kernel, with the float32 LM head) and add the LoRA term in float32; they differ in
summation order only (~1e-5 on tiny and default-model logits). 1e-3 still catches a wrong
scale (alpha/r), a transposed or missing module.
"""
from __future__ import annotations

from pathlib import Path

import torch

TOL = 1e-3


def peft_logits(folder, adapter, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-token logits (N, vocab) of PEFT's model with the adapter, and with it disabled."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tests.model.reference import bnb_exact
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                           bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=q, dtype=torch.float32,
                                                device_map="cpu")
    bnb_exact(base)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        lora = torch.stack([model(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts])  # (N, V)
        with model.disable_adapter():
            plain = torch.stack([model(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts])  # (N, V)
    return lora, plain


def server_logits(folder, adapter, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-token logits (N, vocab) of the server's model with the adapter in slot 0, and without."""
    from server.config import EngineConfig
    from server.lora.adapter import LoraArch, read_adapter
    from server.lora.mapping import LoraBatch
    from server.lora.ops import TORCH_OPS
    from server.lora.slots import LayerSlots
    from server.model.loader import load_model
    from tests.model.paged import PagedSequences

    model = load_model(EngineConfig(model=str(folder), quantization="nf4", lm_head_dtype="float32"), "cpu",
                       torch.float32)
    model.allocate_kv_cache(num_blocks=32, block_size=8)
    layers = model.lora_linears()
    lora = read_adapter(Path(adapter).name, str(adapter), LoraArch.from_layers(layers), max_lora_rank=16)
    for name, lin in layers.items():
        lin.slots = LayerSlots(1, 16, lin.in_features, lin.out_features, "cpu", torch.float32, TORCH_OPS)
        lin.slots.load(0, *lora.weights.get(name, (None, None)))
    out = []
    for use_lora in (True, False):
        batch = PagedSequences(32, 8, seed=1).step(dict(enumerate(prompts)))
        n = int(batch.input_ids.shape[0])
        if use_lora:
            batch.lora = LoraBatch.from_row_slots([0] * n, [lora.rank] * n, "cpu")
        out.append(model(batch))  # (N, V)
    return out[0], out[1]
