"""Building the CPU kernels: into the cache, once per source and compiler, never half-written."""
from __future__ import annotations

import os

import pytest

from server import cpu_kernel


def test_build_writes_the_library_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))
    path = cpu_kernel.build()
    assert path.parent == tmp_path / "kernels" and path.name.startswith("cpu_matmul-") and path.suffix == ".so"
    mtime = path.stat().st_mtime_ns
    assert cpu_kernel.build() == path and path.stat().st_mtime_ns == mtime  # not rebuilt
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_a_failing_compiler_leaves_nothing_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo fake 1.0; exit 0; fi\n"
                    "echo 'error: no such instruction' >&2; exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with pytest.raises(cpu_kernel.KernelUnavailable, match="building the CPU kernels failed: error: no such"):
        cpu_kernel.build()
    assert os.listdir(tmp_path / "kernels") == []


def test_no_compiler_is_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_compiler", lambda: None)
    with pytest.raises(cpu_kernel.KernelUnavailable, match="need a C compiler"):
        cpu_kernel.build()


AVX512_CPU = ["sse2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"]
AVX2_CPU = ["sse2", "avx", "avx2", "fma"]


@pytest.mark.parametrize("flags,env,expected", [
    (AVX512_CPU, "", "avx512"), (AVX2_CPU, "", "avx2"), (AVX512_CPU, "avx2", "avx2"),
    (AVX512_CPU + ["avx512_bf16"], "avx512", "avx512")])
def test_the_widest_instruction_set_the_cpu_has_is_built_unless_one_is_asked_for(
        flags, env, expected, tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_kernel, "cpu_flags", lambda: flags)
    monkeypatch.setenv(cpu_kernel.ISA_ENV, env)
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))
    assert cpu_kernel.choose_isa() == expected
    compiler = cpu_kernel._compiler()
    assert cpu_kernel.library_path(compiler, expected).name.startswith(f"cpu_matmul-{expected}-")
    assert cpu_kernel.library_path(compiler, "avx2") != cpu_kernel.library_path(compiler, "avx512")


@pytest.mark.parametrize("flags,env,message", [
    (["sse2", "avx", "avx2"], "", "avx2 needs fma"),                      # AVX2 without FMA
    (AVX2_CPU, "avx512", "avx512 needs avx512f, avx512bw, avx512vl, avx512dq"),
    (AVX512_CPU, "neon", "'neon' is not one of avx512, avx2")])
def test_an_instruction_set_the_cpu_lacks_is_a_clear_message(flags, env, message, monkeypatch):
    monkeypatch.setattr(cpu_kernel, "cpu_flags", lambda: flags)
    monkeypatch.setenv(cpu_kernel.ISA_ENV, env)
    with pytest.raises(cpu_kernel.KernelUnavailable, match=message):
        cpu_kernel.choose_isa()


def test_this_cpu_runs_at_least_one_instruction_set_and_the_server_takes_the_widest():
    """The machines this project runs on (x86 with AVX2 or AVX-512) build a kernel; the
    default load is the first of supported_isas()."""
    isas = cpu_kernel.supported_isas()
    assert isas and set(isas) <= set(cpu_kernel.ISAS)
    assert cpu_kernel.load().isa == (os.environ.get(cpu_kernel.ISA_ENV) or isas[0])


@pytest.mark.parametrize("isa", cpu_kernel.supported_isas())
def test_lora_rows_equal_a_float64_loop(isa):
    """y[t] += (A[s, :r] x[t]) @ Bt[s, :r] per row, rows without a slot left alone, for each
    instruction set this CPU has."""
    import torch
    kernel = cpu_kernel.load(isa)
    g = torch.Generator().manual_seed(11)
    slots_n, r_max, k, n, t = 3, 16, 48, 80, 9
    a = torch.randn(slots_n, r_max, k, generator=g)
    bt = torch.randn(slots_n, r_max, n, generator=g)
    slots = torch.tensor([0, 2, -1, 1, 1, 0, -1, 2, 2], dtype=torch.int64)
    ranks = torch.tensor([16, 8, 0, 4, 4, 16, 0, 8, 8], dtype=torch.int64)
    x = torch.randn(t, k, generator=g)
    y0 = torch.randn(t, n, generator=g)
    y = kernel.lora_rows(x, a, bt, slots, ranks, y0.clone())
    for i in range(t):
        s, r = int(slots[i]), int(ranks[i])
        want = y0[i].double()
        if s >= 0:
            want = want + (a[s, :r].double() @ x[i].double()) @ bt[s, :r].double()
        torch.testing.assert_close(y[i].double(), want, atol=1e-4, rtol=1e-5)
