"""server/lora/ops.py: the torch reference against an fp64 loop, across adapter popularity patterns."""
import pytest
import torch

from server.lora import ops
from server.lora.mapping import LoraBatch
from tests.lora.helpers import PATTERNS, loop_reference, make_batch

S, R_MAX, D_IN, D_OUT = 6, 16, 40, 24
SLOT_RANKS = [4, 16, 8, 1, 12, 16]   # mixed ranks; columns past each rank hold garbage on purpose


def _stacks(seed: int):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(S, R_MAX, D_IN, generator=g)   # (S, r_max, d_in)
    b = torch.randn(S, D_OUT, R_MAX, generator=g)  # (S, d_out, r_max)
    return a, b


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("seq_lens", [[1] * 9, [5, 1, 7, 3, 1, 2]], ids=["decode", "prefill"])
def test_reference_matches_fp64_loop(pattern, seq_lens):
    a, b = _stacks(1)
    lora = make_batch(pattern, seq_lens, S, SLOT_RANKS, seed=len(seq_lens))
    T = lora.token_slots.shape[0]
    x = torch.randn(T, D_IN, dtype=torch.float32)
    y0 = torch.randn(T, D_OUT)
    h = ops.shrink(x, a, lora)
    assert h.shape == (T, R_MAX)
    y = ops.expand(h, b, lora, y0.clone())
    want = loop_reference(x, a, b, lora, y0)
    torch.testing.assert_close(y.double(), want, atol=1e-4, rtol=1e-4)
    fused = ops.apply(x, a, b, lora, y0.clone())
    torch.testing.assert_close(fused.double(), want, atol=1e-4, rtol=1e-4)
    base_rows = lora.token_slots < 0
    assert torch.equal(y[base_rows], y0[base_rows])   # rows without adapter skip the LoRA path
    assert torch.all(h[base_rows] == 0)


def test_rank_slicing_equals_padding_when_slots_are_zero_padded():
    a, b = _stacks(2)
    for s, r in enumerate(SLOT_RANKS):
        a[s, r:] = 0
        b[s, :, r:] = 0
    rows = [0, 0, 2, -1, 3, 5, 5, 1]
    ranks = [SLOT_RANKS[s] if s >= 0 else 0 for s in rows]
    sliced = LoraBatch.from_row_slots(rows, ranks, "cpu")
    padded = LoraBatch.from_row_slots(rows, [R_MAX if s >= 0 else 0 for s in rows], "cpu")
    x = torch.randn(len(rows), D_IN)
    y1 = ops.expand(ops.shrink(x, a, sliced), b, sliced, torch.zeros(len(rows), D_OUT))
    y2 = ops.expand(ops.shrink(x, a, padded), b, padded, torch.zeros(len(rows), D_OUT))
    torch.testing.assert_close(y1, y2)
    assert y1.abs().sum() > 0


def test_select_backend():
    assert ops.select_backend("cpu").name == "cpu-kernel"   # float32 on a CPU with the kernels (AVX-512 or AVX2)
    assert ops.select_backend("cpu", torch.bfloat16).name == "torch"
    assert ops.select_backend("cuda").name == "triton"


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("seq_lens", [[1] * 9, [1] * 33, [5, 1, 7, 3, 1, 2]], ids=["decode", "decode33", "prefill"])
def test_cpu_kernel_backend_matches_fp64_loop(pattern, seq_lens):
    """The CPU kernel backend (every row in C, decode and prefill rows alike) against the fp64
    loop, in the slots' own layout (B stored r-major)."""
    d_in, d_out = 48, 32   # the kernel takes multiples of 16
    g = torch.Generator().manual_seed(7)
    a = torch.randn(S, R_MAX, d_in, generator=g)                                 # (S, r_max, d_in)
    b = torch.randn(S, R_MAX, d_out, generator=g).transpose(1, 2)                # (S, d_out, r_max) view
    lora = make_batch(pattern, seq_lens, S, SLOT_RANKS, seed=len(seq_lens))
    T = lora.token_slots.shape[0]
    x = torch.randn(T, d_in, generator=g)
    y0 = torch.randn(T, d_out, generator=g)
    backend = ops.select_backend("cpu")
    assert backend.name == "cpu-kernel"
    got = backend.apply(x, a, b, lora, y0.clone())
    torch.testing.assert_close(got.double(), loop_reference(x, a, b, lora, y0), atol=1e-4, rtol=1e-4)
    # shapes the kernel cannot take go to the reference, with the same result
    torch.testing.assert_close(backend.apply(x[:, :40], a[:, :, :40].contiguous(), b, lora, y0.clone()).double(),
                               loop_reference(x[:, :40], a[:, :, :40], b, lora, y0), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pattern", PATTERNS + ("shared4",))
@pytest.mark.parametrize("seq_lens", [[1] * 32, [1] * 20 + [6, 1, 9, 2]], ids=["decode", "mixed"])
def test_plan_path_matches_fp64_loop_with_many_slots(pattern, seq_lens):
    """32 slots: padded blocks (bridged idle slots, widths > 1, several ranks) and big groups.
    Idle slots hold NaN, so any read of a slot no row uses would show."""
    n_slots, r_max, d_in, d_out = 32, 16, 24, 20
    g = torch.Generator().manual_seed(7)
    ranks = [(4, 16, 8)[s % 3] for s in range(n_slots)]
    if pattern == "shared4":   # every adapter used by exactly 4 rows (full blocks of width 4)
        seq_slots = [s // 4 for s in range(len(seq_lens))]
    else:
        seq_slots = None
    lora = make_batch(pattern, seq_lens, n_slots, ranks, seed=11) if seq_slots is None else \
        LoraBatch.from_row_slots([s for s, n in zip(seq_slots, seq_lens) for _ in range(n)],
                                 [ranks[s] for s, n in zip(seq_slots, seq_lens) for _ in range(n)], "cpu")
    a = torch.randn(n_slots, r_max, d_in, generator=g)
    b = torch.randn(n_slots, r_max, d_out, generator=g).transpose(1, 2)   # LayerSlots' layout
    used = set(lora.token_slots.tolist())
    for s in range(n_slots):
        if s not in used:
            a[s] = float("nan")
            b[s] = float("nan")
    T = lora.token_slots.shape[0]
    x = torch.randn(T, d_in, generator=g)
    y0 = torch.randn(T, d_out, generator=g)
    out = ops.apply(x, a, b, lora, y0.clone())
    torch.testing.assert_close(out.double(), loop_reference(x, a, b, lora, y0), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "cpu-kernel"])
def test_no_backend_sets_the_thread_count_per_call(backend, monkeypatch):
    """The thread policy is the process's, chosen at start-up: a LoRA call never switches
    torch's thread count (it used to, twice per linear, ~420 times a step)."""
    ops_ = ops.TORCH_OPS if backend == "torch" else ops.select_backend("cpu")
    assert ops_.name == backend
    d_in, d_out = 48, 32
    g = torch.Generator().manual_seed(3)
    a = torch.randn(S, R_MAX, d_in, generator=g)
    b = torch.randn(S, R_MAX, d_out, generator=g).transpose(1, 2)
    lora = make_batch(PATTERNS[-1], [5, 1, 7, 3, 1, 2], S, SLOT_RANKS, seed=2)
    x = torch.randn(lora.token_slots.shape[0], d_in, generator=g)

    def refuse(n):
        raise AssertionError(f"set_num_threads({n}) inside a LoRA call")
    monkeypatch.setattr(torch, "set_num_threads", refuse)
    y = ops_.apply(x, a, b, lora, torch.zeros(x.shape[0], d_out))
    assert y.abs().sum() > 0
