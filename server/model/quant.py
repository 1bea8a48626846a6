"""Base weights of the decoder linears: NF4 in bitsandbytes' layout, or dense.

NF4 is exactly what transformers' `BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4")` produces: blocksize 64, bitsandbytes' NF4 code book, one
float32 absmax per block, no double quantization, uint8 storage (two codes per byte). An
adapter trained with QLoRA on this base therefore sees the same weights here.

The matmul is `bnb.nn.Linear4bit` in eval mode. On a CPU with AVX512-BF16 it repacks its
weight once, on the first forward, into a tiled layout and then runs a fused 4-bit GEMM.
`python bench/nf4.py` (576 -> 1536, float32 activations) on this shared 2-core CPU, in us per
call at batch 1 / 16: Linear4bit 80-240 / 410-1150, `quantize_4bit` + `matmul_4bit` on
the canonical layout (dequantizes the whole weight on every call) 420-1250 / 700-1980,
dense fp32 140-360 / 400-1020 (ranges over runs at different machine load); Linear4bit
is the fastest at batch 1 and on par with dense fp32 at batch 16, at a quarter of the bytes.

The fused CPU kernel computes in bfloat16 (activations and absmax rounded to bf16, output
cast back), so on CPU the NF4 path carries bf16 rounding on top of the 4-bit weights;
`set_fused_cpu(model, False)` selects the exact float32 dequantize + matmul path instead
(tests use it as the oracle). On CUDA bitsandbytes uses its gemv / dequantize kernels in
the compute dtype.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

NF4_BLOCKSIZE = 64
FUSED_CPU_TILE_N = 32  # the fused CPU kernel repacks out_features in tiles of 32 rows


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, quantization: str,
                device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A base linear y = x @ weight.T + bias from a checkpoint tensor (out, in).

    quantization "nf4" quantizes `weight` cast to `dtype` (as transformers does when it
    loads with `dtype=dtype`); "none" keeps it dense in `dtype`. Either way the module
    maps (T, in) -> (T, out) in `dtype`.
    """
    out_features, in_features = weight.shape
    if quantization == "none":
        lin = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
        lin.weight = nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)
        return lin
    assert quantization == "nf4", quantization
    import bitsandbytes as bnb

    lin = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=dtype,
                            compress_statistics=False, quant_type="nf4", quant_storage=torch.uint8,
                            device="meta")
    w = weight.to(dtype=dtype).contiguous()
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, blocksize=NF4_BLOCKSIZE,
                                   compress_statistics=False, quant_type="nf4",
                                   quant_storage=torch.uint8, module=lin)
    lin.weight = lin.weight.to(device)  # quantizes (a Params4bit quantizes on its first .to(device))
    if bias is not None:
        lin.bias = nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)
    if out_features % FUSED_CPU_TILE_N or in_features % 2:
        lin.support_avx512bf16_for_cpu = False  # the fused CPU kernel's tiles do not fit this shape
    lin.eval()
    return lin


def set_fused_cpu(model: nn.Module, enabled: bool) -> None:
    """Choose, before the first forward, bitsandbytes' fused bf16 CPU kernel (default) or the
    exact float32 dequantize + matmul for every NF4 linear in `model`."""
    for m in model.modules():
        if is_nf4(m):
            assert enabled or not is_repacked(m), "weights already repacked for the fused kernel"
            fits = m.out_features % FUSED_CPU_TILE_N == 0 and m.in_features % 2 == 0
            m.support_avx512bf16_for_cpu = enabled and fits and has_fused_cpu_kernel()


def has_fused_cpu_kernel() -> bool:
    from bitsandbytes.functional import has_avx512bf16
    return bool(has_avx512bf16())


def is_nf4(module: nn.Module) -> bool:
    # No import here: a Linear4bit exists only once bitsandbytes is loaded, and a dense
    # (quantization "none") model must not need bitsandbytes installed.
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def quant_state_bytes(module: nn.Module) -> int:
    """Bytes held by an NF4 linear's quantization statistics (absmax, code book); 0 if dense."""
    if not is_nf4(module) or module.weight.quant_state is None:
        return 0
    qs = module.weight.quant_state
    return sum(t.numel() * t.element_size() for t in (qs.absmax, qs.code) if t is not None)


def nf4_codes(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes, absmax) as the module holds them: canonical (out*in/2, 1) uint8 codes
    and (out*in/64,) float32 absmax until the fused CPU kernel's first forward, which
    repacks the codes into tiles and rounds absmax to bfloat16 (out of place, one-way)."""
    return module.weight.data, module.weight.quant_state.absmax


def is_repacked(module: nn.Module) -> bool:
    return bool(getattr(module.weight.quant_state, "packing_format_for_cpu", False))
