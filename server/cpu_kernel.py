"""The project's CPU kernels (csrc/), built once per machine (server/cpu_build.py), loaded
with ctypes: the NF4 matmul of the decoder linears and the bf16-weight matmul of the LM head
(csrc/cpu_matmul.c), paged decode attention that reads K/V in place (attention.c), the LoRA
rows of a step (lora_rows.c), and the point-wise ops between the matmuls: RMSNorm, rotary
with the K/V cache write, SiLU(gate) * up, the greedy argmax (pointwise.c).

Why a small C library and not the alternatives:
- bitsandbytes' fast CPU GEMM is downloaded from a model hub at run time, which cannot be
  reached here; its built-in fallback (`gemv_4bit` in bf16) measured ~1.6 GB/s of codes.
- torch's own int4 weight-only CPU kernels take a uniform grid with per-group scales and
  zero points, not NF4's non-uniform code book; converting would change the weights the
  adapters were trained on.
- `torch.compile` of dequantize + matmul was not chosen: it brings the compiled-step
  machinery in for one op, and whether Inductor fuses the 16-entry lookup into its matmul
  (rather than writing the dense weight, 8x the bytes of the codes) is not something this
  library controls. The compiled decode step calls these kernels as ops (server/cpu_ops.py).
- A torch C++ extension would work too, but it compiles against torch's headers, which
  takes far longer than these plain C files with intrinsics (a few seconds with gcc).

The point-wise ops exist because, once the matmuls ran near their arithmetic, the chains of
small torch ops between them were a fifth of the step: RMSNorm is eight ops, rotary and the
cache write fourteen per layer, each a dispatch of a few microseconds at decode sizes.

Threads: the kernels run on a small pool of their own (csrc/pool.h), not OpenMP. Under
OMP_WAIT_POLICY=PASSIVE every OpenMP region had to wake a sleeping thread, which here cost
about as much as the call (batch-8 step 40-44 ms; 23-25 ms on the pool); the pool's workers
spin at most 200 us after a call, then sleep, and the caller does any share a late worker
has not taken.

Where the kernels cannot be built (server/cpu_build.py says why), `load()` raises
KernelUnavailable; the loader logs it, and NF4 linears use the exact dequantize + float32
matmul path, the LM head stays float32, and attention and the point-wise ops take the torch
path (slower, same maths).
"""
from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

# the build's names, for callers that know the kernels by this module
from server.cpu_build import (ISA_ENV, ISAS, MATMUL_REL_ERROR, KernelUnavailable, build,  # noqa: F401
                              choose_isa, supported_isas)


@dataclass(frozen=True)
class CpuKernel:
    """The kernels' entry points. Called eagerly, each runs its C function directly; inside a
    torch.compile trace (server/model/compiled.py), each becomes its torch op
    (server/cpu_ops.py), whose implementation is the same eager call."""
    lib: ctypes.CDLL
    path: Path
    isa: str  # a key of ISAS
    threads: int  # the kernels' threads (pool.h): torch's intra-op thread count when loaded

    def nf4_matmul(self, x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, code_book: torch.Tensor,
               out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
        """x (T, K) float32 contiguous rows -> (T, N) float32 = x @ dequant(codes).T + bias."""
        if torch.compiler.is_compiling():
            return torch.ops.loraplex.nf4_matmul(x, codes, absmax, code_book, out_features, bias)
        t, k = x.shape
        y = torch.empty(t, out_features, dtype=torch.float32)  # (T, N)
        rc = self.lib.nf4_matmul_f32(
            x.data_ptr(), t, k, x.stride(0), codes.data_ptr(), absmax.data_ptr(), code_book.data_ptr(),
            out_features, 0 if bias is None else bias.data_ptr(), y.data_ptr(), y.stride(0),
            self.threads)
        if rc != 0:
            raise RuntimeError(f"nf4_matmul_f32 failed on x {tuple(x.shape)} -> {out_features}")
        return y

    def bf16_matmul(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x (T, K) float32 rows, weight (N, K) bfloat16 contiguous -> (T, N) float32, with
        float32 products and sums."""
        if torch.compiler.is_compiling():
            return torch.ops.loraplex.bf16_matmul(x, weight)
        t, k = x.shape
        n = weight.shape[0]
        assert weight.dtype == torch.bfloat16 and weight.is_contiguous() and weight.shape[1] == k
        y = torch.empty(t, n, dtype=torch.float32)  # (T, N)
        rc = self.lib.bf16_matmul_f32(x.data_ptr(), t, k, x.stride(0), weight.data_ptr(), n, y.data_ptr(),
                                      y.stride(0), self.threads)
        if rc != 0:
            raise RuntimeError(f"bf16_matmul_f32 failed on x {tuple(x.shape)} -> {n}")
        return y

    def paged_decode_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor,
                               scale: float) -> torch.Tensor:
        """One query per sequence over its paged K/V, read in place: q (B, H, hd) float32,
        caches (num_blocks, block_size, Hkv, hd) float32, block_tables (B, width) int64 (entries
        past a sequence's blocks are never read), context_lens (B,) int64 -> (B, H, hd)."""
        if torch.compiler.is_compiling():
            return torch.ops.loraplex.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
        b, h, hd = q.shape
        _, block_size, hkv, _ = k_cache.shape
        assert q.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()
        assert block_tables.dtype == context_lens.dtype == torch.int64 and block_tables.stride(1) == 1
        lens = context_lens.contiguous()  # held: the kernel reads it through a raw pointer
        out = torch.empty_like(q)  # (B, H, hd)
        rc = self.lib.paged_decode_attention_f32(
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), block_tables.stride(0),
            lens.data_ptr(), b, h, hkv, hd, block_size, scale, out.data_ptr(),
            self.threads)
        if rc != 0:
            raise RuntimeError(f"paged_decode_attention_f32 failed on q {tuple(q.shape)}")
        return out

    def lora_rows(self, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, slots: torch.Tensor,
                  ranks: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y[t] += (A[s, :r] @ x[t]) @ Bt[s, :r] for each row t with s = slots[t] >= 0 and
        r = ranks[t], in place: x (T, K) float32, a (S, r_max, K) and bt (S, r_max, N) contiguous,
        both float32 or both bfloat16 (widened exactly; products and sums float32), slots /
        ranks (T,) int64, y (T, N) float32 with unit column stride. -> y"""
        if torch.compiler.is_compiling():
            torch.ops.loraplex.lora_rows(x, a, bt, slots, ranks, y)
            return y
        t, k = x.shape
        _, r_max, n = bt.shape
        assert a.is_contiguous() and bt.is_contiguous() and x.stride(1) == 1 and y.stride(1) == 1
        assert a.shape == (bt.shape[0], r_max, k) and y.shape == (t, n) and a.dtype == bt.dtype
        fn = self.lib.lora_rows_bf16 if a.dtype == torch.bfloat16 else self.lib.lora_rows_f32
        assert a.dtype in (torch.float32, torch.bfloat16) and x.dtype == y.dtype == torch.float32
        rc = fn(x.data_ptr(), t, k, x.stride(0), a.data_ptr(), r_max, bt.data_ptr(), n, slots.data_ptr(),
                ranks.data_ptr(), y.data_ptr(), y.stride(0), self.threads)
        if rc != 0:
            raise RuntimeError(f"lora_rows failed on x {tuple(x.shape)} -> {n}")
        return y

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """transformers' RMSNorm in float32: x (T, H) with unit column stride, weight (H,) -> (T, H)."""
        if torch.compiler.is_compiling():
            return torch.ops.loraplex.rms_norm(x, weight, eps)
        t, h = x.shape
        assert x.stride(1) == 1 and weight.is_contiguous() and weight.shape == (h,)
        out = torch.empty(t, h, dtype=torch.float32)  # (T, H)
        rc = self.lib.rms_norm_f32(x.data_ptr(), t, h, x.stride(0), weight.data_ptr(), eps, out.data_ptr(),
                                   self.threads)
        if rc != 0:
            raise RuntimeError(f"rms_norm_f32 failed on x {tuple(x.shape)}")
        return out

    def rope_cache(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary on q (T, H*hd) and k (T, Hkv*hd) (rows with unit column stride; cos, sin (T, hd)
        contiguous); the rotated k and v (T, Hkv*hd) written to the caches (num_blocks,
        block_size, Hkv, hd) at rows slots (T,) int64. -> rotated (q (T, H, hd), k (T, Hkv, hd))."""
        if torch.compiler.is_compiling():
            return torch.ops.loraplex.rope_cache(q, k, v, cos, sin, slots, k_cache, v_cache)
        t = q.shape[0]
        hkv, hd = k_cache.shape[2], k_cache.shape[3]
        h = q.shape[1] // hd
        assert q.stride(1) == k.stride(1) == v.stride(1) == 1 and cos.is_contiguous() and sin.is_contiguous()
        assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape == v_cache.shape
        assert slots.dtype == torch.int64 and slots.is_contiguous() and k.shape[1] == v.shape[1] == hkv * hd
        q_out = torch.empty(t, h, hd, dtype=torch.float32)  # (T, H, hd)
        k_out = torch.empty(t, hkv, hd, dtype=torch.float32)  # (T, Hkv, hd)
        rc = self.lib.rope_cache_f32(
            q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), t, h, hkv, hd,
            cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
            k_cache.shape[0] * k_cache.shape[1], q_out.data_ptr(), k_out.data_ptr(), self.threads)
        if rc != 0:
            raise RuntimeError(f"rope_cache_f32 failed on q {tuple(q.shape)} (a slot outside the cache?)")
        return q_out, k_out

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up: gate, up (T, I) with unit column stride -> (T, I) float32."""
        if torch.compiler.is_compiling():
            return torch.ops.loraplex.silu_mul(gate, up)
        t, i = gate.shape
        assert gate.stride(1) == up.stride(1) == 1 and up.shape == (t, i)
        out = torch.empty(t, i, dtype=torch.float32)  # (T, I)
        rc = self.lib.silu_mul_f32(gate.data_ptr(), gate.stride(0), up.data_ptr(), up.stride(0), t, i,
                                   out.data_ptr(), self.threads)
        if rc != 0:
            raise RuntimeError(f"silu_mul_f32 failed on {tuple(gate.shape)}")
        return out

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """Each row's first maximum, as torch's x.max(dim=-1).indices (a NaN is the maximum):
        x (T, V) float32 with unit column stride -> (T,) int64. One thread: ~10x torch's here."""
        t, v = x.shape
        assert x.dtype == torch.float32 and x.stride(1) == 1
        out = torch.empty(t, dtype=torch.int64)  # (T,)
        if self.lib.argmax_rows_f32(x.data_ptr(), t, v, x.stride(0), out.data_ptr()) != 0:
            raise RuntimeError(f"argmax_rows_f32 failed on {tuple(x.shape)}")
        return out

    def nf4_dequantize(self, codes: torch.Tensor, absmax: torch.Tensor, code_book: torch.Tensor,
                   out_features: int, in_features: int) -> torch.Tensor:
        """The dense (N, K) float32 weight, as this kernel reads the codes."""
        w = torch.empty(out_features, in_features, dtype=torch.float32)
        rc = self.lib.nf4_dequant_f32(codes.data_ptr(), absmax.data_ptr(), code_book.data_ptr(),
                                      out_features, in_features, w.data_ptr(), self.threads)
        if rc != 0:
            raise RuntimeError(f"nf4_dequant_f32 failed on ({out_features}, {in_features})")
        return w


_loaded: dict[str | None, CpuKernel | KernelUnavailable] = {}


def load(isa: str | None = None) -> CpuKernel:
    """The kernels for `isa` (None: choose_isa(), what the server uses), built if needed,
    loaded once per process; raises KernelUnavailable."""
    if isa not in _loaded:
        _loaded[isa] = _load(isa)
    found = _loaded[isa]
    if isinstance(found, KernelUnavailable):
        raise found
    return found


def _load(isa: str | None) -> CpuKernel | KernelUnavailable:
    try:
        isa = choose_isa(isa)
        path = build(isa)
        lib = ctypes.CDLL(str(path))
    except KernelUnavailable as e:
        return e
    except OSError as e:
        return KernelUnavailable(f"loading the CPU kernels failed: {e}")
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.nf4_matmul_f32.argtypes = [p, i64, i64, i64, p, p, p, i64, p, p, i64, ctypes.c_int]
    lib.nf4_dequant_f32.argtypes = [p, p, p, i64, i64, p, ctypes.c_int]
    lib.bf16_matmul_f32.argtypes = [p, i64, i64, i64, p, i64, p, i64, ctypes.c_int]
    lib.paged_decode_attention_f32.argtypes = [p, p, p, p, i64, p, i64, i64, i64, i64, i64,
                                               ctypes.c_float, p, ctypes.c_int]
    lib.lora_rows_f32.argtypes = [p, i64, i64, i64, p, i64, p, i64, p, p, p, i64, ctypes.c_int]
    lib.lora_rows_bf16.argtypes = lib.lora_rows_f32.argtypes
    lib.rms_norm_f32.argtypes = [p, i64, i64, i64, p, ctypes.c_float, p, ctypes.c_int]
    lib.rope_cache_f32.argtypes = [p, i64, p, i64, p, i64, i64, i64, i64, i64, p, p, p, p, p, i64, p, p,
                                   ctypes.c_int]
    lib.silu_mul_f32.argtypes = [p, i64, p, i64, i64, i64, p, ctypes.c_int]
    lib.argmax_rows_f32.argtypes = [p, i64, i64, i64, p]
    for fn in (lib.nf4_matmul_f32, lib.nf4_dequant_f32, lib.bf16_matmul_f32, lib.paged_decode_attention_f32,
               lib.lora_rows_f32, lib.lora_rows_bf16, lib.rms_norm_f32, lib.rope_cache_f32, lib.silu_mul_f32,
               lib.argmax_rows_f32):
        fn.restype = ctypes.c_int
    return CpuKernel(lib, path, isa, torch.get_num_threads())


def main() -> int:
    """`python -m server.cpu_kernel`: build the kernels now (the Makefile's set-up step)."""
    try:
        kernel = load()
        print(f"CPU kernels ({kernel.isa}): {kernel.path}")
    except KernelUnavailable as e:
        print(f"CPU kernels not built ({e}); NF4 models will use the exact, slower path")
    return 0


if __name__ == "__main__":
    sys.exit(main())
