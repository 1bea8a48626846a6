"""LlamaForCausalLM: the Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2).

Module names follow transformers' (`model.layers.{i}.self_attn.q_proj`, `model.norm`,
`lm_head`, ...) so checkpoint tensors map one to one and LoRA target names match PEFT's.
The model is built with every weight on the meta device; server/model/loader.py fills
them in. forward() takes a ForwardBatch and returns float32 logits for its logits_rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from server.errors import ModelLoadError
from server.lora.linear import LinearWithLoRA
from server.model.batch import ForwardBatch
from server.model.layers import MLP, Attention, AttentionPlan, RMSNorm, RopeConfig, rope_cos_sin, rope_inv_freq
from server.model.quant import quant_tensors

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class LlamaArch:
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None

    @staticmethod
    def from_config(cfg: dict, generation: dict | None, source: str) -> "LlamaArch":
        """Parse an HF config.json (and generation_config.json) dict; `source` names the file."""
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise ModelLoadError(
                f"{source}: unsupported architecture {archs or cfg.get('model_type')!r}; "
                f"supported: {', '.join(ARCHITECTURES)}")
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            attention_bias = bool(cfg.get("attention_bias", False))
            qwen = arch == "Qwen2ForCausalLM"
            kv_heads = int(cfg.get("num_key_value_heads") or heads)
            if heads % kv_heads:
                raise ModelLoadError(f"{source}: num_attention_heads ({heads}) is not a multiple of "
                                     f"num_key_value_heads ({kv_heads})")
            return LlamaArch(
                architecture=arch, hidden_size=hidden, num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads, num_kv_heads=kv_heads,
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                intermediate_size=int(cfg["intermediate_size"]), vocab_size=int(cfg["vocab_size"]),
                max_position_embeddings=_context_len(cfg),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope=_rope(cfg, source),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=qwen or attention_bias, o_bias=attention_bias and not qwen,
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                eos_token_ids=_eos_ids(cfg, generation or {}), bos_token_id=cfg.get("bos_token_id"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"{source}: bad or missing field in model config: {e!r}") from e


def _context_len(cfg: dict) -> int:
    """The context length served exactly. Attention here is full causal, so a sliding-window
    model (Mistral v0.1, Qwen2 with use_sliding_window) is served up to its window, where
    full and windowed attention agree."""
    n = int(cfg.get("max_position_embeddings", 2048))
    window = cfg.get("sliding_window")
    uses_window = cfg.get("use_sliding_window", cfg.get("model_type") == "mistral")
    if uses_window and isinstance(window, int) and 0 < window < n:
        return window
    return n


def _rope(cfg: dict, source: str) -> RopeConfig:
    """transformers 5 puts rope settings in `rope_parameters`; older configs use
    `rope_theta` + `rope_scaling`."""
    params = dict(cfg.get("rope_scaling") or {})
    params.update(cfg.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ModelLoadError(f"{source}: unsupported rope type {rope_type!r}; supported: {ROPE_TYPES}")
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=float(params["factor"]))
    return RopeConfig(theta=theta, rope_type="llama3", factor=float(params["factor"]),
                      low_freq_factor=float(params["low_freq_factor"]),
                      high_freq_factor=float(params["high_freq_factor"]),
                      original_max_position_embeddings=int(params.get(
                          "original_max_position_embeddings", cfg.get("max_position_embeddings", 8192))))


def _eos_ids(cfg: dict, generation: dict) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (generation.get("eos_token_id"), cfg.get("eos_token_id")):
        for i in (source if isinstance(source, list) else [source]):
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return tuple(ids)


class DecoderLayer(nn.Module):
    def __init__(self, arch: LlamaArch) -> None:
        super().__init__()
        self.self_attn = Attention(arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim,
                                   arch.qkv_bias, arch.o_bias)
        self.mlp = MLP(arch.hidden_size, arch.intermediate_size, arch.mlp_bias)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, "meta")
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, "meta")

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch,
                plan: AttentionPlan) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, batch, plan)  # (T, hidden)
        return h + self.mlp(self.post_attention_layernorm(h), batch.lora)  # (T, hidden)


class LlamaModel(nn.Module):
    def __init__(self, arch: LlamaArch) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size, device="meta")
        self.layers = nn.ModuleList(DecoderLayer(arch) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, "meta")


class LlamaForCausalLM(nn.Module):
    def __init__(self, arch: LlamaArch, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.arch = arch
        self.device = device
        self.dtype = dtype
        self.model = LlamaModel(arch)
        self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False, device="meta")
        self.inv_freq = rope_inv_freq(arch.rope, arch.head_dim).to(device)  # (hd/2,) float32
        self.block_size = 0
        self.num_blocks = 0
        # LM head in bfloat16 on the CPU kernel (set_lm_head_bf16), else lm_head in `dtype`
        self.lm_head_bf16: torch.Tensor | None = None  # (vocab, hidden) bfloat16
        self.cpu_kernel = None  # server.cpu_kernel.CpuKernel, with lm_head_bf16
        self.decode_step = None  # server.model.compiled.CompiledDecode, or None: eager

    def set_attention_kernel(self, kernel) -> None:
        """Decode attention on `kernel` (a CpuKernel; float32 caches on the CPU) or, with None,
        on the torch path (gather + SDPA), the oracle."""
        for layer in self.model.layers:
            layer.self_attn.kernel = kernel

    def set_pointwise_kernel(self, kernel) -> None:
        """RMSNorm, rotary with the K/V cache write, and SiLU(gate) * up on `kernel` (a CpuKernel:
        float32 on the CPU, the torch ops' maths in one call each), or, with None, as torch ops
        (the oracle)."""
        for m in self.modules():
            if isinstance(m, (RMSNorm, MLP)):
                m.kernel = kernel
            elif isinstance(m, Attention):
                m.rope_kernel = kernel

    def set_lm_head_bf16(self, kernel) -> None:
        """Read the LM head as bfloat16 weights (half the bytes of float32) through `kernel`
        (a CpuKernel: float32 activations, products and sums), or, with None, as lm_head's own
        float32 weights (the oracle). The float32 weights stay: a tied head is the embedding."""
        self.cpu_kernel = kernel
        self.lm_head_bf16 = None if kernel is None else self.lm_head.weight.detach().to(torch.bfloat16).contiguous()

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        """Per layer K and V caches (num_blocks, block_size, n_kv_heads, head_dim)."""
        shape = (num_blocks, block_size, self.arch.num_kv_heads, self.arch.head_dim)
        for layer in self.model.layers:
            layer.self_attn.k_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
            layer.self_attn.v_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.block_size = block_size
        self.num_blocks = num_blocks

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits (B, vocab) float32 at batch.logits_rows; writes K/V at batch.slot_mapping.
        A decode-only batch takes the compiled step when one is set (server/model/compiled.py)."""
        assert self.block_size > 0, "allocate_kv_cache before forward"
        plan = AttentionPlan.build(batch, self.block_size, in_place=self.model.layers[0].self_attn.kernel is not None)
        if self.decode_step is not None and not plan.prefill_seqs:
            return self.decode_step(batch, plan)
        return self.run(batch, plan)

    def run(self, batch: ForwardBatch, plan: AttentionPlan, layer_step=None) -> torch.Tensor:
        """forward's maths. `layer_step(layer, h, cos, sin, batch, plan)`, when given, runs each
        decoder layer (the compiled step's one compiled layer function); else each layer's own
        forward, eager: the oracle."""
        h = self.model.embed_tokens(batch.input_ids)  # (T, hidden)
        cos, sin = rope_cos_sin(self.inv_freq, batch.positions, self.dtype)  # (T, hd)
        for layer in self.model.layers:
            h = layer(h, cos, sin, batch, plan) if layer_step is None else layer_step(layer, h, cos, sin, batch, plan)
        h = self.model.norm(h[batch.logits_rows])  # (B, hidden)
        if self.lm_head_bf16 is not None:
            return self.cpu_kernel.bf16_matmul(h.float().contiguous(), self.lm_head_bf16)  # (B, vocab)
        return self.lm_head(h).float()  # (B, vocab)

    def lora_linears(self) -> dict[str, LinearWithLoRA]:
        """Every LoRA-capable linear by its HF module name, e.g. 'model.layers.0.self_attn.q_proj'."""
        return {name: m for name, m in self.named_modules() if isinstance(m, LinearWithLoRA)}

    def weight_bytes(self) -> int:
        """Resident bytes of all weights: parameters, NF4 absmax and code books, the bf16 copy
        of the LM head; each storage once (tied weights, fused bases and their row views)."""
        tensors = list(self.parameters()) + [b for b in (self.lm_head_bf16,) if b is not None]
        for m in self.modules():
            tensors += quant_tensors(m)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())
