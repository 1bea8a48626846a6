"""Helpers for tests/lora: adapter popularity patterns and an fp64 loop reference."""
import random

import torch

from server.lora.mapping import LoraBatch

PATTERNS = ("distinct", "uniform", "zipf", "identical", "skewed")


def popularity(pattern: str, num_seqs: int, num_slots: int, rng: random.Random) -> list[int]:
    """One slot per sequence (-1 = base only) drawn by an adapter-popularity pattern."""
    if pattern == "distinct":
        return [i % num_slots for i in range(num_seqs)]
    if pattern == "uniform":
        return [rng.randrange(-1, num_slots) for _ in range(num_seqs)]
    if pattern == "zipf":
        weights = [1.0 / (k + 1) ** 1.5 for k in range(num_slots)]
        return rng.choices(range(num_slots), weights=weights, k=num_seqs)
    if pattern == "identical":
        return [num_slots - 1] * num_seqs
    if pattern == "skewed":
        return [0 if rng.random() < 0.8 else rng.randrange(-1, num_slots) for _ in range(num_seqs)]
    raise ValueError(pattern)


def make_batch(pattern: str, seq_lens: list[int], num_slots: int, slot_ranks: list[int],
               seed: int = 0) -> LoraBatch:
    """A LoraBatch of sequences (seq_lens rows each) with slots drawn by `pattern`."""
    rng = random.Random(seed)
    seq_slots = popularity(pattern, len(seq_lens), num_slots, rng)
    rows = [s for s, n in zip(seq_slots, seq_lens) for _ in range(n)]
    ranks = [slot_ranks[s] if s >= 0 else 0 for s in rows]
    return LoraBatch.from_row_slots(rows, ranks, "cpu")


def loop_reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, lora: LoraBatch,
                   y: torch.Tensor) -> torch.Tensor:
    """fp64, one row at a time: y[i] + B[s, :, :r] @ (A[s, :r] @ x[i]) for each row with slot s, rank r."""
    out = y.double().clone()
    rank_of = {}
    for s, r in zip(lora.seg_slots, lora.seg_ranks):
        rank_of[s] = r
    for i, s in enumerate(lora.token_slots.tolist()):
        if s < 0:
            continue
        r = rank_of[s]
        out[i] += b[s, :, :r].double() @ (a[s, :r].double() @ x[i].double())
    return out


def tiny_llama_config():
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=True, rms_norm_eps=1e-5)


def tiny_llama(seed: int = 0):
    """A random tiny Llama (fp32, eval); the same seed gives the same weights."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def tiny_arch():
    from server.lora.adapter import LoraArch
    c = tiny_llama_config()
    return LoraArch.llama(c.hidden_size, c.intermediate_size, c.num_hidden_layers,
                          c.num_attention_heads, c.num_key_value_heads)


def save_peft_adapter(model, path: str, seed: int, r: int = 8, lora_alpha: float = 16,
                      target_modules=("q_proj", "v_proj"), use_rslora: bool = False,
                      rank_pattern: dict | None = None, alpha_pattern: dict | None = None,
                      layers_to_transform: list[int] | None = None) -> str:
    """get_peft_model with random A and B (init_lora_weights=False), saved as safetensors."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    tm = target_modules if isinstance(target_modules, str) else list(target_modules)
    cfg = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=tm, use_rslora=use_rslora,
                     rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {},
                     layers_to_transform=layers_to_transform, init_lora_weights=False,
                     lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(path, safe_serialization=True)
    peft_model.unload()   # take the LoRA layers out again, so `model` can be reused
    return path


def lora_layers(arch) -> dict:
    """{module name: LinearWithLoRA over a random dense linear} for every module of `arch`."""
    from torch import nn

    from server.lora.linear import LinearWithLoRA
    torch.manual_seed(0)
    return {name: LinearWithLoRA(nn.Linear(d_in, d_out, bias=False), d_in, d_out)
            for name, (d_in, d_out) in arch.modules.items()}
