"""The point-wise CPU kernels (csrc/pointwise.c) against the torch ops they replace, for every
instruction set this CPU has: rotary + the K/V cache write bit for bit, RMSNorm and SiLU * up
within float32 rounding, the argmax index for index (ties, NaN, -inf)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server import cpu_kernel
from server.model.layers import RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq, RopeConfig

ISAS = cpu_kernel.supported_isas()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("hidden", [576, 100, 7])
def test_rms_norm_equals_the_torch_module_to_float_rounding(isa, hidden):
    """Only the sum of squares is added in another order: within 2 ulps of the module's output.
    Strided rows (a view of a wider tensor) and lengths with a scalar tail included."""
    kernel = cpu_kernel.load(isa)
    g = torch.Generator().manual_seed(hidden)
    norm = RMSNorm(hidden, 1e-5, "cpu")
    norm.weight.data.copy_(torch.randn(hidden, generator=g))
    wide = torch.randn(9, hidden + 5, generator=g) * 3
    x = wide[:, 2:2 + hidden]  # (9, hidden), row stride hidden + 5
    want = norm(x)
    got = kernel.rms_norm(x, norm.weight, norm.eps)
    torch.testing.assert_close(got, want, rtol=2.5e-7, atol=1e-30)
    assert not torch.equal(got, torch.zeros_like(got))


def _rope_case(hd: int, heads: int, kv_heads: int, t: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    nq, nk = heads * hd, kv_heads * hd
    y = torch.randn(t, nq + 2 * nk, generator=g)  # a fused q/k/v output: strided views
    q, k, v = y[:, :nq], y[:, nq:nq + nk], y[:, nq + nk:]
    positions = torch.randint(0, 4000, (t,), generator=g)
    cos, sin = rope_cos_sin(rope_inv_freq(RopeConfig(theta=100000.0), hd), positions, torch.float32)
    shape = (6, 4, kv_heads, hd)  # 24 cache rows
    k_cache, v_cache = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    slots = torch.randperm(24, generator=g)[:t].to(torch.int64)
    return q, k, v, cos, sin, slots, k_cache, v_cache


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("hd,heads,kv_heads,t", [(64, 9, 3, 8), (128, 4, 2, 3), (6, 2, 1, 5)])
def test_rope_and_cache_write_equal_apply_rope_and_index_copy_bit_for_bit(isa, hd, heads, kv_heads, t):
    kernel = cpu_kernel.load(isa)
    q, k, v, cos, sin, slots, k_cache, v_cache = _rope_case(hd, heads, kv_heads, t, seed=hd + t)
    want_q = apply_rope(q.reshape(t, heads, hd), cos, sin)
    want_k = apply_rope(k.reshape(t, kv_heads, hd), cos, sin)
    want_kc, want_vc = k_cache.clone(), v_cache.clone()
    want_kc.view(-1, kv_heads, hd).index_copy_(0, slots, want_k)
    want_vc.view(-1, kv_heads, hd).index_copy_(0, slots, v.reshape(t, kv_heads, hd))
    got_q, got_k = kernel.rope_cache(q, k, v, cos, sin, slots, k_cache, v_cache)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    assert torch.equal(k_cache, want_kc) and torch.equal(v_cache, want_vc)  # other rows untouched


def test_a_slot_outside_the_cache_is_refused_before_anything_is_written():
    kernel = cpu_kernel.load()
    q, k, v, cos, sin, slots, k_cache, v_cache = _rope_case(64, 9, 3, 4, seed=1)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    slots[2] = 24  # one past the last row
    with pytest.raises(RuntimeError, match="slot outside the cache"):
        kernel.rope_cache(q, k, v, cos, sin, slots, k_cache, v_cache)
    assert torch.equal(k_cache, before_k) and torch.equal(v_cache, before_v)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("inter", [1536, 37])
def test_silu_mul_equals_torch_to_float_rounding(isa, inter):
    """exp differs (simd.h's against torch's, each within about an ulp): within 4 ulps; and
    below 1e-30 where gate < -88.4, whose exp(-gate) simd.h's vexp saturates near 2^128 where
    torch's overflows to inf (-100 * e^-100 is -3.7e-42: both round it to about zero)."""
    kernel = cpu_kernel.load(isa)
    g = torch.Generator().manual_seed(inter)
    y = torch.randn(10, 2 * inter, generator=g) * 4
    y[0, :3] = torch.tensor([-100.0, 0.0, 100.0])  # exp's ends: under- and overflow
    gate, up = y[:, :inter], y[:, inter:]
    want = F.silu(gate) * up
    got = kernel.silu_mul(gate, up)
    torch.testing.assert_close(got, want, rtol=5e-7, atol=1e-30)


@pytest.mark.parametrize("isa", ISAS)
def test_argmax_equals_torch_max_indices(isa):
    """The first maximum of each row; a NaN is the maximum (the first NaN); a row of -inf
    gives 0; rows whose lengths leave a scalar tail."""
    kernel = cpu_kernel.load(isa)
    g = torch.Generator().manual_seed(5)
    for vocab in (49152, 1000, 17, 3):
        x = torch.randn(7, vocab, generator=g)
        x[1, vocab // 2] = x[1, vocab - 1] = 50.0  # a tie: the first wins
        x[2, -1] = float("nan")  # NaN in the tail
        x[3, vocab // 3] = float("nan")
        x[3, vocab - 1] = float("nan")
        x[4] = float("-inf")
        x[5, 0] = 1e30
        x[6, -1] = float("inf")
        got = kernel.argmax(x)
        assert got.tolist() == x.max(dim=-1).indices.tolist(), vocab
    strided = torch.randn(4, 300, generator=g)[:, 10:290]
    assert kernel.argmax(strided).tolist() == strided.max(dim=-1).indices.tolist()
