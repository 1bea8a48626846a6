"""The model being trained: the base (NF4 like the server's, or fp32) with PEFT LoRA layers.

NF4 uses exactly the server's quantizer settings (bitsandbytes NF4, blocksize 64, no double
quantization), so the adapter learns against the weights it will be served on.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from server.errors import ModelLoadError
from server.train.config import TrainConfig

log = logging.getLogger(__name__)


def compute_dtype(device: str) -> torch.dtype:
    """The server's compute dtype: float32 on CPU, bfloat16 on CUDA."""
    return torch.bfloat16 if device == "cuda" else torch.float32


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the tokenizer from {str(folder)!r}: {e}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(folder: Path, cfg: TrainConfig) -> nn.Module:
    """The frozen base model on cfg's device, NF4-quantized unless quantization is none."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    device = cfg.resolved_device()
    dtype = compute_dtype(device)
    quant = None
    if cfg.quantization == "nf4":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=False, bnb_4bit_compute_dtype=dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), quantization_config=quant, dtype=torch.float32 if quant else dtype,
            device_map=device)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the model from {str(folder)!r}: {e}") from e
    if quant is not None:
        from peft import prepare_model_for_kbit_training
        # casts norms/embeddings to fp32 and freezes the base; checkpointing is not worth
        # its recompute on models this size
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def add_lora(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """PEFT LoRA on cfg's targets: A random, B zero, so the wrapped model equals the base."""
    from peft import LoraConfig, get_peft_model
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=cfg.peft_targets,
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(cfg.seed)
    peft_model = get_peft_model(model, lora)
    n_train = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log.info("LoRA r=%d alpha=%g on %s: %d trainable parameters",
             cfg.r, cfg.lora_alpha, ",".join(cfg.targets), n_train)
    return peft_model
