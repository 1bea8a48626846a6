"""The CPU kernels (server/cpu_kernel.py) as torch ops, for the compiled decode step.

torch.compile cannot trace into a ctypes call, so each kernel is declared to torch as an
op in the `loraplex` namespace: a schema, a CPU implementation (the kernel's own eager
entry point, so there is one implementation), and a fake implementation that gives the
output's shape, which is all the compiler needs to plan around it. `CpuKernel` calls these
ops only while it is being traced; eager calls skip the dispatcher (about 14 µs a call
through torch.library.custom_op here, against ~1 µs for ctypes).

Registered when this module is first imported: server/model/compiled.py imports it, and
only a compiled step reaches these ops.
"""
from __future__ import annotations

import torch

from server.cpu_kernel import load

_LIB = torch.library.Library("loraplex", "DEF")
_LIB.define("nf4_matmul(Tensor x, Tensor codes, Tensor absmax, Tensor code_book, int out_features, "
            "Tensor? bias) -> Tensor")
_LIB.define("bf16_matmul(Tensor x, Tensor weight) -> Tensor")
_LIB.define("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
            "Tensor context_lens, float scale) -> Tensor")
_LIB.define("lora_rows(Tensor x, Tensor a, Tensor bt, Tensor slots, Tensor ranks, Tensor(a!) y) -> ()")
_LIB.define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor")
_LIB.define("rope_cache(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor slots, Tensor(a!) k_cache, "
            "Tensor(b!) v_cache) -> (Tensor, Tensor)")
_LIB.define("silu_mul(Tensor gate, Tensor up) -> Tensor")


@torch.library.impl(_LIB, "nf4_matmul", "CPU")
def _nf4_matmul(x, codes, absmax, code_book, out_features, bias):
    return load().nf4_matmul(x.contiguous(), codes, absmax, code_book, out_features, bias)  # (T, N)


@torch.library.impl(_LIB, "bf16_matmul", "CPU")
def _bf16_matmul(x, weight):
    return load().bf16_matmul(x.contiguous(), weight)  # (T, N)


@torch.library.impl(_LIB, "paged_decode_attention", "CPU")
def _paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale):
    return load().paged_decode_attention(q.contiguous(), k_cache, v_cache, block_tables.contiguous(),
                                         context_lens, scale)  # (B, H, hd)


@torch.library.impl(_LIB, "lora_rows", "CPU")
def _lora_rows(x, a, bt, slots, ranks, y):
    load().lora_rows(x, a, bt, slots, ranks, y)  # y (T, N) in place


def _rows(t):
    """t with unit column stride (a compiled graph may hand an op any strides)."""
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.impl(_LIB, "rms_norm", "CPU")
def _rms_norm(x, weight, eps):
    return load().rms_norm(_rows(x), weight.contiguous(), eps)  # (T, H)


@torch.library.impl(_LIB, "rope_cache", "CPU")
def _rope_cache(q, k, v, cos, sin, slots, k_cache, v_cache):
    return load().rope_cache(_rows(q), _rows(k), _rows(v), cos.contiguous(), sin.contiguous(), slots.contiguous(),
                             k_cache, v_cache)


@torch.library.impl(_LIB, "silu_mul", "CPU")
def _silu_mul(gate, up):
    return load().silu_mul(_rows(gate), _rows(up))  # (T, I)


@torch.library.register_fake("loraplex::nf4_matmul", lib=_LIB)
def _nf4_matmul_fake(x, codes, absmax, code_book, out_features, bias):
    return x.new_empty(x.shape[0], out_features)


@torch.library.register_fake("loraplex::bf16_matmul", lib=_LIB)
def _bf16_matmul_fake(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.register_fake("loraplex::paged_decode_attention", lib=_LIB)
def _paged_decode_attention_fake(q, k_cache, v_cache, block_tables, context_lens, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("loraplex::lora_rows", lib=_LIB)
def _lora_rows_fake(x, a, bt, slots, ranks, y):
    return None


@torch.library.register_fake("loraplex::rms_norm", lib=_LIB)
def _rms_norm_fake(x, weight, eps):
    return x.new_empty(x.shape)


@torch.library.register_fake("loraplex::rope_cache", lib=_LIB)
def _rope_cache_fake(q, k, v, cos, sin, slots, k_cache, v_cache):
    hd = k_cache.shape[3]
    return q.new_empty(q.shape[0], q.shape[1] // hd, hd), k.new_empty(k.shape[0], k_cache.shape[2], hd)


@torch.library.register_fake("loraplex::silu_mul", lib=_LIB)
def _silu_mul_fake(gate, up):
    return gate.new_empty(gate.shape)
