"""Building the CPU kernels: into the cache, once per source and compiler, never half-written."""
from __future__ import annotations

import os

import pytest

from server import cpu_build


def test_build_writes_the_library_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))
    path = cpu_build.build()
    assert path.parent == tmp_path / "kernels" and path.name.startswith("cpu_matmul-") and path.suffix == ".so"
    mtime = path.stat().st_mtime_ns
    assert cpu_build.build() == path and path.stat().st_mtime_ns == mtime  # not rebuilt
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_a_failing_compiler_leaves_nothing_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo fake 1.0; exit 0; fi\n"
                    "echo 'error: no such instruction' >&2; exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with pytest.raises(cpu_build.KernelUnavailable, match="building the CPU kernels failed: error: no such"):
        cpu_build.build()
    assert os.listdir(tmp_path / "kernels") == []


def test_no_compiler_is_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_build, "_compiler", lambda: None)
    with pytest.raises(cpu_build.KernelUnavailable, match="need a C compiler"):
        cpu_build.build()


AVX512_CPU = ["sse2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"]
AVX2_CPU = ["sse2", "avx", "avx2", "fma"]
AMX_CPU = AVX512_CPU + ["avx512_bf16", "amx_tile", "amx_bf16"]


@pytest.mark.parametrize("flags,env,expected", [
    (AVX512_CPU, "", "avx512"), (AVX2_CPU, "", "avx2"), (AVX512_CPU, "avx2", "avx2"),
    (AVX512_CPU + ["avx512_bf16"], "", "avx512"), (AMX_CPU, "", "amx"), (AMX_CPU, "avx512", "avx512")])
def test_the_widest_instruction_set_the_cpu_has_is_built_unless_one_is_asked_for(
        flags, env, expected, tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_build, "cpu_flags", lambda: flags)
    monkeypatch.setenv(cpu_build.ISA_ENV, env)
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))
    assert cpu_build.choose_isa() == expected
    compiler = cpu_build._compiler()
    assert cpu_build.library_path(compiler, expected).name.startswith(f"cpu_matmul-{expected}-")
    paths = {cpu_build.library_path(compiler, isa) for isa in cpu_build.ISAS}
    assert len(paths) == len(cpu_build.ISAS)


@pytest.mark.parametrize("flags,env,message", [
    (["sse2", "avx", "avx2"], "", "avx2 needs fma"),                      # AVX2 without FMA
    (AVX2_CPU, "avx512", "avx512 needs avx512f, avx512bw, avx512vl, avx512dq"),
    (AVX512_CPU, "amx", "amx needs avx512_bf16, amx_tile, amx_bf16"),
    (AVX512_CPU, "neon", "'neon' is not one of amx, avx512, avx2")])
def test_an_instruction_set_the_cpu_lacks_is_a_clear_message(flags, env, message, monkeypatch):
    monkeypatch.setattr(cpu_build, "cpu_flags", lambda: flags)
    monkeypatch.setenv(cpu_build.ISA_ENV, env)
    with pytest.raises(cpu_build.KernelUnavailable, match=message):
        cpu_build.choose_isa()
