"""How the CPU kernels (server/cpu_kernel.py) are built: the instruction sets they are
written for, the compiler flags, and the library in the model cache.

One set of sources (csrc/), three instruction sets (csrc/simd.h, csrc/amx.h): AVX-512 (16
lanes; the code book in one register), AVX2 with FMA (8 lanes; the book as byte planes), and
AMX (Sapphire Rapids' tile unit, on top of the AVX-512 build) for the NF4 matmul from 6 rows
of x and the bf16 head. The build takes the widest set the CPU has (`LORAPLEX_CPU_ISA=avx512`
or `avx2` asks for a narrower one). AVX-512 and AVX2 give bitsandbytes' dequantized values
exactly and float32 sums; AMX multiplies bf16x3 splits of the same float32 values
(csrc/amx.h), within 3 * 2^-16 of each product (MATMUL_REL_ERROR).

The library is built into the model cache (`cache_dir()/kernels/`) under a name that hashes
the sources, the instruction set, the flags and the compiler, written to a temporary path and
renamed, so a rebuild is never half-written and an edit never loads a stale build. `make`
builds it at set-up (`python -m server.cpu_kernel`); the first model load builds it if it is
missing. Where the CPU has neither AVX-512 nor AVX2 with FMA, or no compiler is found, the
build raises KernelUnavailable saying why.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from server.config import cache_dir

CSRC = Path(__file__).with_name("csrc")
# one library from these sources: the matmuls, attention, the LoRA rows, the point-wise ops,
# and the thread pool they share
SOURCES = tuple(CSRC / name for name in ("cpu_matmul.c", "attention.c", "lora_rows.c", "pointwise.c", "pool.c"))
HEADERS = tuple(CSRC / name for name in ("simd.h", "amx.h", "pool.h"))
# -ffp-contract=off: a multiply and an add written apart stay two roundings, as in torch's ops
COMMON_FLAGS = ("-O3", "-pthread", "-fPIC", "-shared", "-ffp-contract=off")
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
    source = b"".join(f.read_bytes() for f in (*SOURCES, *HEADERS))
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
        proc = subprocess.run([compiler, *cflags(isa), "-o", tmp, *map(str, SOURCES)], capture_output=True,
                              text=True, timeout=300)
        if proc.returncode != 0:
            raise KernelUnavailable(f"building the CPU kernels failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
