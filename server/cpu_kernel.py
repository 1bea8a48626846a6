"""The project's CPU kernels (csrc/cpu_matmul.c), built once per machine, loaded with ctypes:
the NF4 matmul of the decoder linears, the bf16-weight matmul of the LM head, paged decode
attention that reads K/V in place, and the LoRA rows of a decode step.

Why a small C library and not the alternatives:
- bitsandbytes' fast CPU GEMM is downloaded from a model hub at run time, which cannot be
  reached here; its built-in fallback (`gemv_4bit` in bf16) measured ~1.6 GB/s of codes.
- torch's own int4 weight-only CPU kernels take a uniform grid with per-group scales and
  zero points, not NF4's non-uniform code book; converting would change the weights the
  adapters were trained on.
- `torch.compile` of dequantize + matmul was not chosen: it brings the compiled-step
  machinery in for one op, and whether Inductor fuses the 16-entry lookup into its matmul
  (rather than writing the dense weight, 8x the bytes of the codes) is not something this
  library controls. The compiled decode step, when it comes, calls this kernel as an op.
- A torch C++ extension would work too, but it compiles against torch's headers, which
  takes far longer than this plain C file with intrinsics (about a second with gcc).

Threads: the kernels run on a small pool of their own (csrc/pool.h), not OpenMP. Under
OMP_WAIT_POLICY=PASSIVE every OpenMP region had to wake a sleeping thread, which here cost
about as much as the call (batch-8 step 40-44 ms; 23-25 ms on the pool); the pool's workers
spin at most 200 us after a call, then sleep, and the caller does any share a late worker
has not taken.

One source, three instruction sets (csrc/simd.h, csrc/amx.h): AVX-512 (16 lanes; the code
book in one register), AVX2 with FMA (8 lanes; the book as byte planes), and AMX (Sapphire
Rapids' tile unit, on top of the AVX-512 build) for the NF4 matmul from 6 rows of x and the
bf16 head. The build takes the widest set the CPU has (`LORAPLEX_CPU_ISA=avx512` or `avx2`
asks for a narrower one). AVX-512 and AVX2 give bitsandbytes' dequantized values exactly and
float32 sums; AMX multiplies bf16x3 splits of the same float32 values (csrc/amx.h), within
3 * 2^-16 of each product (MATMUL_REL_ERROR).

The library is built into the model cache (`cache_dir()/kernels/`) under a name that hashes
the source, the instruction set, the flags and the compiler, written to a temporary path and renamed, so a
rebuild is never half-written and an edit never loads a stale build. `make` builds it at
set-up (`python -m server.cpu_kernel`); the first model load builds it if it is missing.
Where the CPU has neither AVX-512 nor AVX2 with FMA, or no compiler is found, `load()` raises KernelUnavailable saying
why; the loader logs it, and NF4 linears use the exact dequantize + float32 matmul path, the
LM head stays float32 and attention takes the torch path (slower, same maths).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from server.config import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_matmul.c"
HEADERS = (SOURCE.with_name("simd.h"), SOURCE.with_name("amx.h"))
COMMON_FLAGS = ("-O3", "-pthread", "-fPIC", "-shared")
# The instruction sets the kernels are written for (csrc/simd.h), widest first: the CPU
# flags each needs and the compiler flags that select it.
ISAS = {
    "amx": (("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "avx512_bf16", "amx_tile", "amx_bf16"),
            ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mavx512bf16", "-mamx-tile",
             "-mamx-bf16", "-DLP_AVX512", "-DLP_AMX")),
    "avx512": (("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"),
               ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DLP_AVX512")),
    "avx2": (("avx2", "fma"), ("-mavx2", "-mfma")),
}
# What each set's matmuls may differ from float64 arithmetic on the same float32 inputs, as a
# fraction of sum |x| |w| per output: float32 rounding (AVX-512, AVX2), or AMX's bf16x3
# products (csrc/amx.h: at most 3 * 2^-16 per term) plus float32 rounding.
MATMUL_REL_ERROR = {"amx": 3 * 2.0 ** -16 + 1e-6, "avx512": 1e-6, "avx2": 1e-6}
ISA_ENV = "LORAPLEX_CPU_ISA"  # amx | avx512 | avx2: build for that set (the tests take the narrower ones too)


class KernelUnavailable(RuntimeError):
    """The CPU kernels cannot run here; the message says why."""


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
        r = ranks[t], in place: x (T, K), a (S, r_max, K) and bt (S, r_max, N) contiguous
        float32, slots / ranks (T,) int64, y (T, N) float32 with unit column stride. -> y"""
        if torch.compiler.is_compiling():
            torch.ops.loraplex.lora_rows(x, a, bt, slots, ranks, y)
            return y
        t, k = x.shape
        _, r_max, n = bt.shape
        assert a.is_contiguous() and bt.is_contiguous() and x.stride(1) == 1 and y.stride(1) == 1
        assert a.shape == (bt.shape[0], r_max, k) and y.shape == (t, n)
        rc = self.lib.lora_rows_f32(x.data_ptr(), t, k, x.stride(0), a.data_ptr(), r_max, bt.data_ptr(), n,
                                    slots.data_ptr(), ranks.data_ptr(), y.data_ptr(), y.stride(0),
                                    self.threads)
        if rc != 0:
            raise RuntimeError(f"lora_rows_f32 failed on x {tuple(x.shape)} -> {n}")
        return y

    def nf4_dequantize(self, codes: torch.Tensor, absmax: torch.Tensor, code_book: torch.Tensor,
                   out_features: int, in_features: int) -> torch.Tensor:
        """The dense (N, K) float32 weight, as this kernel reads the codes."""
        w = torch.empty(out_features, in_features, dtype=torch.float32)
        rc = self.lib.nf4_dequant_f32(codes.data_ptr(), absmax.data_ptr(), code_book.data_ptr(),
                                      out_features, in_features, w.data_ptr(), self.threads)
        if rc != 0:
            raise RuntimeError(f"nf4_dequant_f32 failed on ({out_features}, {in_features})")
        return w


def cpu_flags() -> list[str]:
    """The CPU's feature flags from /proc/cpuinfo, or [] where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []


def choose_isa(wanted: str | None = None) -> str:
    """`wanted` (else the set LORAPLEX_CPU_ISA names, else the widest in ISAS) if this CPU has
    it; raises KernelUnavailable saying what is missing."""
    wanted = wanted or os.environ.get(ISA_ENV, "")
    if wanted and wanted not in ISAS:
        raise KernelUnavailable(f"{ISA_ENV}={wanted!r} is not one of {', '.join(ISAS)}")
    flags = cpu_flags()
    if not flags:
        cap = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
        flags = list(ISAS["avx512"][0]) if cap.startswith("AVX512") else list(ISAS["avx2"][0]) if cap == "AVX2" else []
    missing = {}
    for isa in ([wanted] if wanted else ISAS):
        missing[isa] = [f for f in ISAS[isa][0] if f not in flags]
        if not missing[isa]:
            return isa
    lacks = "; ".join(f"{isa} needs {', '.join(m)}" for isa, m in missing.items())
    raise KernelUnavailable(f"the CPU kernels need AVX-512 or AVX2 with FMA: this CPU lacks them ({lacks})")


def supported_isas() -> list[str]:
    """Every instruction set in ISAS this CPU has, widest first."""
    found = []
    for isa in ISAS:
        try:
            found.append(choose_isa(isa))
        except KernelUnavailable:
            pass
    return found


def cflags(isa: str) -> tuple[str, ...]:
    return (*COMMON_FLAGS, *ISAS[isa][1])


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def library_path(compiler: str, isa: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    source = SOURCE.read_bytes() + b"".join(h.read_bytes() for h in HEADERS)
    key = hashlib.sha256(source + " ".join(cflags(isa)).encode() + version.encode()).hexdigest()[:16]
    return Path(cache_dir()) / "kernels" / f"cpu_matmul-{isa}-{key}.so"


def build(isa: str | None = None) -> Path:
    """Compile the kernels for `isa` (None: choose_isa()) unless this exact build exists;
    returns the library's path."""
    isa = choose_isa(isa)
    compiler = _compiler()
    if compiler is None:
        raise KernelUnavailable("the CPU kernels need a C compiler (cc or gcc; set CC)")
    path = library_path(compiler, isa)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *cflags(isa), "-o", tmp, str(SOURCE)], capture_output=True,
                              text=True, timeout=300)
        if proc.returncode != 0:
            raise KernelUnavailable(f"building the CPU kernels failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


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
    for fn in (lib.nf4_matmul_f32, lib.nf4_dequant_f32, lib.bf16_matmul_f32, lib.paged_decode_attention_f32,
               lib.lora_rows_f32):
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
