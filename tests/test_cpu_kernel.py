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
AMX_CPU = AVX512_CPU + ["avx512_bf16", "amx_tile", "amx_bf16"]


@pytest.mark.parametrize("flags,env,expected", [
    (AVX512_CPU, "", "avx512"), (AVX2_CPU, "", "avx2"), (AVX512_CPU, "avx2", "avx2"),
    (AVX512_CPU + ["avx512_bf16"], "", "avx512"), (AMX_CPU, "", "amx"), (AMX_CPU, "avx512", "avx512")])
def test_the_widest_instruction_set_the_cpu_has_is_built_unless_one_is_asked_for(
        flags, env, expected, tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_kernel, "cpu_flags", lambda: flags)
    monkeypatch.setenv(cpu_kernel.ISA_ENV, env)
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))
    assert cpu_kernel.choose_isa() == expected
    compiler = cpu_kernel._compiler()
    assert cpu_kernel.library_path(compiler, expected).name.startswith(f"cpu_matmul-{expected}-")
    paths = {cpu_kernel.library_path(compiler, isa) for isa in cpu_kernel.ISAS}
    assert len(paths) == len(cpu_kernel.ISAS)


@pytest.mark.parametrize("flags,env,message", [
    (["sse2", "avx", "avx2"], "", "avx2 needs fma"),                      # AVX2 without FMA
    (AVX2_CPU, "avx512", "avx512 needs avx512f, avx512bw, avx512vl, avx512dq"),
    (AVX512_CPU, "amx", "amx needs avx512_bf16, amx_tile, amx_bf16"),
    (AVX512_CPU, "neon", "'neon' is not one of amx, avx512, avx2")])
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


def _nf4_case(seed: int, rows: int):
    import bitsandbytes.functional as F
    import torch
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(1536, 576, generator=g) * 0.05
    codes, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4",
                                quant_storage=torch.uint8)
    return torch.randn(rows, 576, generator=g), codes, qs


def test_callers_on_several_threads_each_get_their_own_result():
    """The kernels' thread pool (csrc/pool.h) takes one call at a time; callers on other
    threads wait their turn and every result equals the same call made alone."""
    import threading
    kernel = cpu_kernel.load()
    cases = [_nf4_case(seed, rows) for seed, rows in enumerate((1, 8, 33, 5))]
    alone = [kernel.nf4_matmul(x, c, qs.absmax, qs.code, 1536, None) for x, c, qs in cases]
    got: dict[int, list] = {}

    def call(i):
        x, c, qs = cases[i]
        got[i] = [kernel.nf4_matmul(x, c, qs.absmax, qs.code, 1536, None) for _ in range(20)]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    import torch
    assert all(not t.is_alive() for t in threads)
    for i, want in enumerate(alone):
        assert all(torch.equal(y, want) for y in got[i])


def test_a_forked_child_runs_the_kernels_without_the_parents_pool_threads():
    """A child forked after the pool's workers started has none of them; the caller takes
    every chunk itself (work is claimed, never assigned), so the call still completes."""
    import torch
    kernel = cpu_kernel.load()
    x, codes, qs = _nf4_case(7, 8)
    want = kernel.nf4_matmul(x, codes, qs.absmax, qs.code, 1536, None)  # the parent's pool is up
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one kernel call, its result's bytes down the pipe, exit
        try:
            y = kernel.nf4_matmul(x, codes, qs.absmax, qs.code, 1536, None)
            os.write(write, y.numpy().tobytes())
        finally:
            os._exit(0)
    os.close(write)
    import select
    got = b""
    with os.fdopen(read, "rb") as f:
        while len(got) < 8 * 1536 * 4:
            ready, _, _ = select.select([f], [], [], 120)
            if not ready:
                os.kill(pid, 9)
                raise AssertionError("the child's kernel call did not complete in 120 s")
            chunk = os.read(f.fileno(), 1 << 16)
            if not chunk:
                break
            got += chunk
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert torch.equal(torch.frombuffer(bytearray(got), dtype=torch.float32).view(8, 1536), want)
