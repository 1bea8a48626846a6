"""The CPU kernels' entry points against float64 loops and torch references, their threads,
and their behaviour in a forked child."""
from __future__ import annotations

import os

import pytest

from server import cpu_kernel


def test_this_cpu_runs_at_least_one_instruction_set_and_the_server_takes_the_widest():
    """The machines this project runs on (x86 with AVX2 or AVX-512) build a kernel; the
    default load is the first of supported_isas()."""
    isas = cpu_kernel.supported_isas()
    assert isas and set(isas) <= set(cpu_kernel.ISAS)
    assert cpu_kernel.load().isa == (os.environ.get(cpu_kernel.ISA_ENV) or isas[0])


@pytest.mark.parametrize("isa", cpu_kernel.supported_isas())
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_rows_equal_a_float64_loop(isa, dtype):
    """y[t] += (A[s, :r] x[t]) @ Bt[s, :r] per row, rows without a slot left alone, for each
    instruction set this CPU has; A and B in float32 or bfloat16 (widened exactly: the loop
    reads the same bf16 values)."""
    import torch
    kernel = cpu_kernel.load(isa)
    g = torch.Generator().manual_seed(11)
    slots_n, r_max, k, n, t = 3, 16, 48, 80, 9
    a = torch.randn(slots_n, r_max, k, generator=g).to(getattr(torch, dtype))
    bt = torch.randn(slots_n, r_max, n, generator=g).to(getattr(torch, dtype))
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
