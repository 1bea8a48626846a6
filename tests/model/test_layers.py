"""layers.py piece by piece: RMSNorm and rotary against transformers, paged attention
against a float64 loop over tokens (the definition of causal attention over a cache)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from server.cpu_kernel import supported_isas
from server.model.layers import Attention, AttentionPlan, RMSNorm, RopeConfig, apply_rope, rope_cos_sin, rope_inv_freq
from tests.model.paged import PagedSequences


def test_rmsnorm_matches_transformers():
    torch.manual_seed(0)
    x = torch.randn(7, 48) * 3
    ref = LlamaRMSNorm(48, eps=1e-5)
    ours = RMSNorm(48, 1e-5, "cpu")
    w = 1 + torch.randn(48) * 0.3
    with torch.no_grad():
        ref.weight.copy_(w)
        ours.weight.copy_(w)
    assert torch.allclose(ours(x), ref(x), atol=1e-6)
    xb = x.to(torch.bfloat16)
    assert ours(xb).dtype == torch.float32  # weight (fp32) * normed (bf16) promotes, as in HF
    assert torch.equal(ours(xb), ref(xb))


@pytest.mark.parametrize("rope", [
    RopeConfig(theta=10000.0),
    RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=64),
    RopeConfig(theta=10000.0, rope_type="linear", factor=4.0),
])
def test_rope_frequencies_match_transformers(rope):
    params = {"rope_type": rope.rope_type, "rope_theta": rope.theta}
    if rope.rope_type != "default":
        params["factor"] = rope.factor
    if rope.rope_type == "llama3":
        params.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
                      original_max_position_embeddings=rope.original_max_position_embeddings)
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, rope_parameters=params)
    if rope.rope_type == "default":
        expected = 1.0 / (rope.theta ** (torch.arange(0, 64, 2).float() / 64))
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[rope.rope_type](cfg, "cpu")
    assert torch.allclose(rope_inv_freq(rope, 64), expected, rtol=1e-6, atol=0)


def test_apply_rope_matches_transformers():
    torch.manual_seed(1)
    inv_freq = rope_inv_freq(RopeConfig(theta=10000.0), 32)
    positions = torch.tensor([0, 1, 5, 17, 300])
    cos, sin = rope_cos_sin(inv_freq, positions, torch.float32)  # (T, hd)
    q = torch.randn(5, 4, 32)  # (T, H, hd)
    k = torch.randn(5, 2, 32)
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    assert torch.allclose(apply_rope(q, cos, sin), ref_q[0].transpose(0, 1), atol=1e-6)
    assert torch.allclose(apply_rope(k, cos, sin), ref_k[0].transpose(0, 1), atol=1e-6)
    assert not torch.allclose(apply_rope(q, cos, sin)[2:], q[2:], atol=1e-2)  # it rotates


def _attention(hidden: int, heads: int, kv_heads: int, hd: int, seed: int) -> Attention:
    g = torch.Generator().manual_seed(seed)
    attn = Attention(hidden, heads, kv_heads, hd, qkv_bias=True, o_bias=False)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        lin = getattr(attn, name)
        dense = nn.Linear(lin.in_features, lin.out_features, bias=name != "o_proj")
        with torch.no_grad():
            dense.weight.copy_(torch.randn(dense.weight.shape, generator=g) * 0.3)
            if dense.bias is not None:
                dense.bias.copy_(torch.randn(dense.bias.shape, generator=g))
        lin.base = dense
    return attn


def _reference(attn: Attention, xs: list[torch.Tensor], inv_freq: torch.Tensor) -> list[torch.Tensor]:
    """Causal GQA attention in float64, one query token at a time, per sequence."""
    outs = []
    group = attn.num_heads // attn.num_kv_heads
    for x in xs:  # (n, hidden)
        x = x.double()
        n = x.shape[0]
        lin = {k: getattr(attn, k).base for k in ("q_proj", "k_proj", "v_proj", "o_proj")}
        q = (x @ lin["q_proj"].weight.double().T + lin["q_proj"].bias.double()).view(n, attn.num_heads, -1)
        k = (x @ lin["k_proj"].weight.double().T + lin["k_proj"].bias.double()).view(n, attn.num_kv_heads, -1)
        v = (x @ lin["v_proj"].weight.double().T + lin["v_proj"].bias.double()).view(n, attn.num_kv_heads, -1)
        cos, sin = rope_cos_sin(inv_freq.double(), torch.arange(n), torch.float64)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = torch.zeros_like(q)
        for t in range(n):
            for h in range(attn.num_heads):
                s = (k[: t + 1, h // group] @ q[t, h]) * attn.scale  # (t+1,)
                o[t, h] = torch.softmax(s, 0) @ v[: t + 1, h // group]
        outs.append(o.reshape(n, -1) @ lin["o_proj"].weight.double().T)
    return outs


def test_paged_attention_matches_float64_loop():
    """Prefill, a continuation chunk next to decodes, then decode-only steps."""
    torch.manual_seed(2)
    attn = _attention(hidden=24, heads=6, kv_heads=2, hd=8, seed=3)
    inv_freq = rope_inv_freq(RopeConfig(theta=10000.0), 8)
    block_size = 4
    attn.k_cache = torch.zeros(40, block_size, 2, 8)
    attn.v_cache = torch.zeros(40, block_size, 2, 8)
    lengths = [9, 14, 3]
    xs = [torch.randn(n + 5, 24) for n in lengths]  # every sequence gets 5 more tokens later
    pages = PagedSequences(40, block_size, seed=4)
    schedule = [
        {0: (0, 9), 1: (0, 6), 2: (0, 3)},      # prefill; sequence 1 only partly
        {0: (9, 10), 1: (6, 14), 2: (3, 4)},    # decode + continuation chunk of sequence 1
        {0: (10, 11), 1: (14, 15), 2: (4, 5)},  # decode only
        {2: (5, 6), 0: (11, 12)},               # decode only, sequence order changed, 1 idle
    ]
    for step in schedule:
        batch = pages.step({i: list(range(a, b)) for i, (a, b) in step.items()})
        x = torch.cat([xs[i][a:b] for i, (a, b) in step.items()])  # (T, hidden)
        cos, sin = rope_cos_sin(inv_freq, batch.positions, torch.float32)
        plan = AttentionPlan.build(batch, block_size)
        with torch.inference_mode():
            out = attn(x, cos, sin, batch, plan)  # (T, hidden)
        row = 0
        for i, (a, b) in step.items():
            ref = _reference(attn, [xs[i][:b]], inv_freq)[0][a:b]
            assert (out[row: row + b - a].double() - ref).abs().max().item() < 1e-4, (step, i)
            row += b - a


@pytest.mark.parametrize("isa", supported_isas())
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(9, 3, 64, 16), (4, 4, 16, 4), (32, 8, 128, 16), (8, 1, 32, 8)])
def test_paged_decode_kernel_matches_float64_loop(heads, kv_heads, head_dim, block_size, isa):
    """The CPU kernel's in-place decode attention against a float64 loop over each sequence's
    blocks (shuffled, so not contiguous), for lengths from 1 to past several blocks, GQA groups
    of 1 to 8 and the padding of block tables (-1) never read: float32 rounding only (for
    every instruction set this CPU has)."""
    from server.cpu_kernel import load
    kernel = load(isa)
    g = torch.Generator().manual_seed(heads + kv_heads + head_dim)
    lens = [1, block_size + 1, 5 * block_size, 3, 2 * block_size - 1]
    width = max(-(-n // block_size) for n in lens)
    blocks = sum(-(-n // block_size) for n in lens) + 3
    kc = torch.randn(blocks, block_size, kv_heads, head_dim, generator=g)
    vc = torch.randn(blocks, block_size, kv_heads, head_dim, generator=g)
    order = torch.randperm(blocks, generator=g).tolist()
    tables = torch.full((len(lens), width), -1, dtype=torch.int64)
    for b, n in enumerate(lens):
        nb = -(-n // block_size)
        tables[b, :nb] = torch.tensor([order.pop() for _ in range(nb)])
    q = torch.randn(len(lens), heads, head_dim, generator=g)
    scale = head_dim ** -0.5
    out = kernel.paged_decode_attention(q, kc, vc, tables, torch.tensor(lens), scale)  # (B, H, hd)
    for b, n in enumerate(lens):
        pos = torch.arange(n)
        blk = tables[b][pos // block_size]
        k, v = kc[blk, pos % block_size].double(), vc[blk, pos % block_size].double()  # (n, Hkv, hd)
        for h in range(heads):
            kv = h // (heads // kv_heads)
            p = torch.softmax((k[:, kv] @ q[b, h].double()) * scale, 0)  # (n,)
            torch.testing.assert_close(out[b, h].double(), p @ v[:, kv], atol=2e-6, rtol=1e-5)
