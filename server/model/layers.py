"""The maths of one Llama-family decoder layer: RMSNorm, rotary, SwiGLU MLP, attention.

Attention reads and writes a paged KV cache: per layer K and V tensors
(num_blocks, block_size, n_kv_heads, head_dim); token t of a sequence lives in block
block_table[t // block_size] at offset t % block_size. Every linear is a LinearWithLoRA
called as proj(x, lora).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from server.lora.linear import LinearWithLoRA
from server.lora.mapping import LoraBatch
from server.model.batch import ForwardBatch


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"        # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0      # llama3 only
    high_freq_factor: float = 4.0     # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) float32, with Llama-3 / linear scaling applied."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = ((rope.original_max_position_embeddings / wavelen - rope.low_freq_factor)
                  / (rope.high_freq_factor - rope.low_freq_factor))
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    assert rope.rope_type == "default", rope.rope_type
    return inv_freq


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (T, head_dim) in `dtype` for the tokens' positions, computed in float32."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary on x (T, H, hd) (HF's layout: pairs are (i, i + hd/2))."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # (T, H, hd)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, device: torch.device | str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device), requires_grad=False)
        self.eps = eps
        self.kernel = None  # server.cpu_kernel.CpuKernel (float32 on a CPU), else the torch ops below

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel.rms_norm(x, self.weight, self.eps)  # (T, hidden)
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)  # (T, hidden) float32
        return self.weight * h.to(x.dtype)


def _lora_linear(in_features: int, out_features: int, bias: bool) -> LinearWithLoRA:
    """A LinearWithLoRA whose base is a meta placeholder; the loader puts the real base in."""
    return LinearWithLoRA(nn.Linear(in_features, out_features, bias=bias, device="meta"),
                          in_features, out_features)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool) -> None:
        super().__init__()
        self.gate_proj = _lora_linear(hidden_size, intermediate_size, bias)
        self.up_proj = _lora_linear(hidden_size, intermediate_size, bias)
        self.down_proj = _lora_linear(intermediate_size, hidden_size, bias)
        self.gate_up: nn.Module | None = None  # fused gate/up base (the loader's), or None
        self.kernel = None  # server.cpu_kernel.CpuKernel: silu(gate) * up in one call; None: torch

    def forward(self, x: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
        if self.gate_up is None:
            gate, up = self.gate_proj(x, lora), self.up_proj(x, lora)  # (T, inter) each
        else:
            inter = self.gate_proj.out_features
            y = self.gate_up(x)  # (T, 2 * inter), one matmul
            gate, up = self.gate_proj.add_lora(x, y[:, :inter], lora), self.up_proj.add_lora(x, y[:, inter:], lora)
        h = F.silu(gate) * up if self.kernel is None else self.kernel.silu_mul(gate, up)  # (T, inter)
        return self.down_proj(h, lora)  # (T, hidden)


class Attention(nn.Module):
    """GQA self-attention over the paged KV cache."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.q_proj = _lora_linear(hidden_size, num_heads * head_dim, qkv_bias)
        self.k_proj = _lora_linear(hidden_size, num_kv_heads * head_dim, qkv_bias)
        self.v_proj = _lora_linear(hidden_size, num_kv_heads * head_dim, qkv_bias)
        self.o_proj = _lora_linear(num_heads * head_dim, hidden_size, o_bias)
        self.qkv: nn.Module | None = None  # fused q/k/v base (the loader's), or None
        self.k_cache: torch.Tensor | None = None  # (num_blocks, block_size, n_kv, hd)
        self.v_cache: torch.Tensor | None = None
        # server.cpu_kernel.CpuKernel: decode reads K/V in place (float32 CPU caches);
        # None: the torch path below (gather + SDPA), the oracle
        self.kernel = None
        # the same, for rotary and the K/V cache write in one call; None: apply_rope + index_copy_
        self.rope_kernel = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch,
                plan: "AttentionPlan") -> torch.Tensor:
        t = x.shape[0]
        if self.qkv is None:
            q, k, v = self.q_proj(x, batch.lora), self.k_proj(x, batch.lora), self.v_proj(x, batch.lora)
        else:
            nq, nk = self.q_proj.out_features, self.k_proj.out_features
            y = self.qkv(x)  # (T, nq + 2 nk), one matmul; LoRA added to each projection's columns
            q = self.q_proj.add_lora(x, y[:, :nq], batch.lora)
            k = self.k_proj.add_lora(x, y[:, nq:nq + nk], batch.lora)
            v = self.v_proj.add_lora(x, y[:, nq + nk:], batch.lora)
        assert self.k_cache is not None and self.v_cache is not None, "allocate_kv_cache first"
        if self.rope_kernel is not None:  # rotated q, k (T, H, hd), (T, Hkv, hd); k, v in the caches
            q, k = self.rope_kernel.rope_cache(q, k, v, cos, sin, batch.slot_mapping, self.k_cache, self.v_cache)
            v = v.view(t, self.num_kv_heads, self.head_dim)  # (T, Hkv, hd)
        else:
            q = apply_rope(q.view(t, self.num_heads, self.head_dim), cos, sin)  # (T, H, hd)
            k = apply_rope(k.view(t, self.num_kv_heads, self.head_dim), cos, sin)  # (T, Hkv, hd)
            v = v.view(t, self.num_kv_heads, self.head_dim)  # (T, Hkv, hd)
            self.k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, batch.slot_mapping, k)
            self.v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, batch.slot_mapping, v)
        if not plan.prefill_seqs:  # decode only: row b is sequence b
            return self.o_proj(self._decode(q, plan).reshape(t, -1), batch.lora)  # (T, hidden)
        out = torch.empty_like(q)  # (T, H, hd)
        if plan.decode_seqs:
            out[plan.decode_rows] = self._decode(q[plan.decode_rows], plan)
        for b in plan.prefill_seqs:
            lo, hi = plan.query_start_cpu[b], plan.query_start_cpu[b + 1]
            out[lo:hi] = self._prefill(q[lo:hi], k[lo:hi], v[lo:hi], batch, b)
        return self.o_proj(out.view(t, -1), batch.lora)  # (T, hidden)

    def _decode(self, q: torch.Tensor, plan: "AttentionPlan") -> torch.Tensor:
        """One query per sequence: in place on the CPU kernel; otherwise all sequences' paged
        K/V gathered at once, padded + masked."""
        if plan.decode_tables is None:  # the plan was built for the kernel
            return self.kernel.paged_decode_attention(q.contiguous(), self.k_cache, self.v_cache,
                                                      plan.decode_block_tables, plan.decode_lens, self.scale)
        tables = plan.decode_tables  # (Bd*nb,) flat block ids, -1 padding clamped to 0 and masked
        bd, length = plan.decode_mask.shape[0], plan.decode_mask.shape[-1]
        # index_select on the block axis: a plain gather, much cheaper than advanced indexing
        shape = (bd, length, self.num_kv_heads, self.head_dim)
        keys = self.k_cache.index_select(0, tables).view(shape)  # (Bd, L, Hkv, hd)
        vals = self.v_cache.index_select(0, tables).view(shape)  # (Bd, L, Hkv, hd)
        # GQA by folding each KV head's query group into the query axis: query head h reads
        # KV head h // group, so (Bd, H, hd) -> (Bd, Hkv, group, hd); no K/V repeat needed
        qg = q.view(bd, self.num_kv_heads, -1, self.head_dim)  # (Bd, Hkv, G, hd)
        o = _sdpa(qg, keys.transpose(1, 2), vals.transpose(1, 2), plan.decode_mask, self.scale)  # (Bd, Hkv, G, hd)
        return o.reshape(bd, self.num_heads, self.head_dim)  # (Bd, H, hd)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch,
                 b: int) -> torch.Tensor:
        """Several new tokens of sequence b, attending causally to its cached prefix and themselves."""
        q_len, ctx = q.shape[0], batch.context_lens_cpu[b]
        if ctx == q_len:  # nothing cached before: the fresh K/V are the whole context
            mask = None
        else:
            bs = self.k_cache.shape[1]
            nb = -(-ctx // bs)
            table = batch.block_tables[b, :nb]
            shape = (nb * bs, self.num_kv_heads, self.head_dim)
            k = self.k_cache.index_select(0, table).view(shape)[:ctx]  # (ctx, Hkv, hd)
            v = self.v_cache.index_select(0, table).view(shape)[:ctx]  # (ctx, Hkv, hd)
            qpos = torch.arange(ctx - q_len, ctx, device=q.device)
            mask = torch.arange(ctx, device=q.device)[None, :] <= qpos[:, None]  # (q_len, ctx)
        o = _sdpa(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                  mask, self.scale, causal=mask is None)  # (1, H, q_len, hd)
        return o[0].transpose(0, 1)  # (q_len, H, hd)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
          causal: bool = False) -> torch.Tensor:
    """Scaled dot-product attention: q (B, Hq, Q, hd), k/v (B, Hkv, L, hd) -> (B, Hq, Q, hd);
    Hq may be a multiple of Hkv (GQA: query head h reads KV head h // (Hq / Hkv)).

    CUDA's SDPA kernels accumulate low-precision inputs in float32 already; elsewhere
    low-precision inputs are upcast so softmax and accumulation run in float32.
    """
    dtype = q.dtype
    if dtype != torch.float32 and q.device.type != "cuda":
        q, k, v = q.float(), k.float(), v.float()
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                       enable_gqa=k.shape[1] != q.shape[1])
    return o.to(dtype)


@dataclass
class AttentionPlan:
    """How one ForwardBatch splits into decode and prefill sequences; built once per step,
    shared by every layer (host lists only, so layers never sync with the device)."""
    query_start_cpu: list[int]
    decode_seqs: list[int]
    decode_rows: torch.Tensor | None    # (Bd,) token rows of the decoding sequences
    decode_tables: torch.Tensor | None  # (Bd*nb,) block tables, flattened, clamped to >= 0
    decode_mask: torch.Tensor | None    # (Bd, 1, 1, nb*block_size) bool, True = attend
    prefill_seqs: list[int]
    decode_block_tables: torch.Tensor | None = None  # (Bd, nb) int64, for the in-place kernel
    decode_lens: torch.Tensor | None = None          # (Bd,) int64 context lengths, for the kernel

    @staticmethod
    def build(batch: ForwardBatch, block_size: int, in_place: bool = False) -> "AttentionPlan":
        """in_place: the layers decode on the CPU kernel (block tables + lengths, no mask)."""
        starts = [0]
        for q in batch.query_lens_cpu:
            starts.append(starts[-1] + q)
        decode = [b for b, q in enumerate(batch.query_lens_cpu) if q == 1]
        prefill = [b for b, q in enumerate(batch.query_lens_cpu) if q > 1]
        if not decode:
            return AttentionPlan(starts, [], None, None, None, prefill)
        device = batch.input_ids.device
        nb = -(-max(batch.context_lens_cpu[b] for b in decode) // block_size)
        idx = torch.tensor(decode, dtype=torch.int64, device=device)
        rows = torch.tensor([starts[b] for b in decode], dtype=torch.int64, device=device)
        lens = batch.context_lens[idx]  # (Bd,)
        if in_place:
            return AttentionPlan(starts, decode, rows, None, None, prefill,
                                 batch.block_tables[idx, :nb].contiguous(), lens)  # (Bd, nb), (Bd,)
        tables = batch.block_tables[idx, :nb].clamp(min=0).reshape(-1)  # (Bd*nb,)
        mask = torch.arange(nb * block_size, device=device)[None, :] < lens[:, None]  # (Bd, L)
        return AttentionPlan(starts, decode, rows, tables, mask[:, None, None, :], prefill)
