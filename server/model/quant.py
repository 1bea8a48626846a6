"""Base weights of the decoder linears: NF4 in bitsandbytes' layout, or dense.

NF4 is exactly what transformers' `BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4")` produces: blocksize 64, bitsandbytes' NF4 code book, one
float32 absmax per block, no double quantization, uint8 storage (two codes per byte). The
codes are made by bitsandbytes' own `quantize_4bit`, so an adapter trained with QLoRA on
this base sees the same weights here.

The matmul, chosen once when the model loads:
- CPU: `NF4Linear` with the project's kernel (server/cpu_kernel.py; AVX-512 or AVX2, AMX
  from 6 rows), which reads the canonical codes in place and computes in float32 (AMX: bf16x3
  products of the same float32 values, within 3 * 2^-16 each): it equals bitsandbytes'
  dequantize_4bit + a float32 matmul to float rounding. Where the kernel cannot run (neither
  AVX-512 nor AVX2, no compiler) or `set_nf4_kernel(model, False)` asks for it (the tests'
  oracle), the same module dequantizes with bitsandbytes and runs a float32 matmul: same maths,
  slower. bitsandbytes' own CPU path is not used: its fast kernel is a model-hub download,
  and its fallback computes in bf16 at ~1.6 GB/s.
- CUDA: `bnb.nn.Linear4bit` (its gemv / dequantize kernels in the compute dtype).
"""
from __future__ import annotations

import logging
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import guard_or_false

log = logging.getLogger(__name__)

NF4_BLOCKSIZE = 64
# From this many rows on (prefill), the kernel's dequantization into a dense float32 weight
# and torch's float32 matmul beat the fused kernel, whose x tiles then no longer stay in
# cache: measured on SmolLM2's shapes, 1.4x at 512 rows, 2.8x at 1,024; the fused kernel
# wins below ~256 (decode: 3-6x at 8-32 rows). Both are the same maths to float rounding.
DENSE_ROWS = 256


class NF4Linear(nn.Module):
    """y = x @ dequant(codes).T + bias on the CPU; x (T, in) -> (T, out) in x's dtype.

    `weight` holds the canonical packed codes, (out * in / 2, 1) uint8, as bitsandbytes
    stores them; `quant_state` is bitsandbytes' QuantState (absmax, code book, shape).
    `kernel` is the CPU kernel, or None for the exact dequantize + float32 matmul path.
    With the kernel, DENSE_ROWS rows or more take its dequantization and torch's matmul.
    """

    def __init__(self, codes: torch.Tensor, quant_state, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = quant_state.shape
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.quant_state = quant_state
        self.code_book = quant_state.code.to(torch.float32).contiguous()  # (16,)
        self.kernel = None  # server.cpu_kernel.CpuKernel, set by set_nf4_kernel

    def dequantize(self) -> torch.Tensor:
        """The dense (out, in) float32 weight, by bitsandbytes' own dequantize_4bit."""
        import bitsandbytes.functional as bnbf
        return bnbf.dequantize_4bit(self.weight.data, self.quant_state).to(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.float32)  # (T, in)
        if self.kernel is None:
            bias = None if self.bias is None else self.bias.float()
            y = F.linear(x2, self.dequantize(), bias)  # (T, out)
        elif guard_or_false(x2.shape[0] >= DENSE_ROWS):  # a plain bool, except in the compiled
            # decode step, whose row count is symbolic: there it is taken as False (the fused kernel)
            w = self.kernel.nf4_dequantize(self.weight, self.quant_state.absmax, self.code_book,
                                           self.out_features, self.in_features)  # (out, in) float32
            y = F.linear(x2, w, None if self.bias is None else self.bias.float())  # (T, out)
        else:
            bias = None if self.bias is None else self.bias.float().contiguous()
            y = self.kernel.nf4_matmul(x2.contiguous(), self.weight, self.quant_state.absmax, self.code_book,
                                   self.out_features, bias)  # (T, out)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, quantization: str,
                device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A base linear y = x @ weight.T + bias from a checkpoint tensor (out, in).

    quantization "nf4" quantizes `weight` cast to `dtype` (as transformers does when it
    loads with `dtype=dtype`); "none" keeps it dense in `dtype`. Either way the module
    maps (T, in) -> (T, out) in `dtype`. On the CPU an NF4 linear starts on the exact path;
    `set_nf4_kernel` (load_model calls it) moves it to the kernel.
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

    w = weight.to(dtype=dtype).contiguous()
    if torch.device(device).type == "cpu":
        codes, state = bnb.functional.quantize_4bit(w, blocksize=NF4_BLOCKSIZE, compress_statistics=False,
                                                    quant_type="nf4", quant_storage=torch.uint8)
        b = None if bias is None else bias.to(dtype=dtype)
        return NF4Linear(codes, state, b).eval()
    lin = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=dtype,
                            compress_statistics=False, quant_type="nf4", quant_storage=torch.uint8,
                            device="meta")
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, blocksize=NF4_BLOCKSIZE,
                                   compress_statistics=False, quant_type="nf4",
                                   quant_storage=torch.uint8, module=lin)
    lin.weight = lin.weight.to(device)  # quantizes (a Params4bit quantizes on its first .to(device))
    if bias is not None:
        lin.bias = nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)
    lin.eval()
    return lin


def row_slice(fused: nn.Module, lo: int, hi: int) -> nn.Module:
    """Rows lo:hi of a fused base linear as a module of its own, sharing its memory (views of
    the codes and absmax, or of the dense weight): what the projection's LinearWithLoRA holds
    when its model runs the fused module instead. NF4 needs in_features % 64 == 0, so that no
    block spans two rows: then these codes equal the projection's own, quantized alone."""
    bias = None if fused.bias is None else fused.bias.detach()[lo:hi]
    if isinstance(fused, NF4Linear):
        k = fused.in_features
        assert k % NF4_BLOCKSIZE == 0, k
        qs = fused.quant_state
        from bitsandbytes.functional import QuantState
        state = QuantState(absmax=qs.absmax[lo * k // NF4_BLOCKSIZE:hi * k // NF4_BLOCKSIZE], shape=torch.Size((hi - lo, k)),
                           code=qs.code, blocksize=qs.blocksize, quant_type=qs.quant_type, dtype=qs.dtype)
        part = NF4Linear(fused.weight.data[lo * k // 2:hi * k // 2], state, bias).eval()
        part.kernel = fused.kernel
        return part
    assert isinstance(fused, nn.Linear), type(fused)
    part = nn.Linear(fused.in_features, hi - lo, bias=bias is not None, device="meta")
    part.weight = nn.Parameter(fused.weight.detach()[lo:hi], requires_grad=False)
    if bias is not None:
        part.bias = nn.Parameter(bias, requires_grad=False)
    return part


def set_nf4_kernel(model: nn.Module, enabled: bool) -> str:
    """Put every CPU NF4 linear in `model` on the CPU kernel (enabled, where it can run)
    or on the exact dequantize + float32 matmul path; returns which, in words."""
    linears = [m for m in model.modules() if isinstance(m, NF4Linear)]
    kernel = None
    why = "exact dequantize + float32 matmul (asked for)"
    if enabled and linears:
        from server.cpu_kernel import KernelUnavailable, load
        try:
            kernel = load()
            why = f"{kernel.isa} kernel {kernel.path.name}"
        except KernelUnavailable as e:
            why = f"exact dequantize + float32 matmul, slower: {e}"
            log.warning("NF4 on CPU: %s", why)
    for m in linears:
        m.kernel = kernel if m.in_features % NF4_BLOCKSIZE == 0 else None
    return why


def is_nf4(module: nn.Module) -> bool:
    if isinstance(module, NF4Linear):
        return True
    # No import here: a Linear4bit exists only once bitsandbytes is loaded, and a dense
    # (quantization "none") model must not need bitsandbytes installed.
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def _state(module: nn.Module):
    return module.quant_state if isinstance(module, NF4Linear) else module.weight.quant_state


def quant_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The tensors of an NF4 linear's quantization statistics (absmax, code book; the CPU
    module's float32 code book copy); [] for anything else."""
    if not is_nf4(module) or _state(module) is None:
        return []
    qs = _state(module)
    extra = [module.code_book] if isinstance(module, NF4Linear) else []
    return [t for t in (qs.absmax, qs.code) if t is not None] + extra


def nf4_codes(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes, absmax) as the module holds them: canonical (out*in/2, 1) uint8 codes
    and (out*in/64,) float32 absmax."""
    return module.weight.data, _state(module).absmax
