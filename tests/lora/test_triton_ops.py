"""server/lora/triton_ops.py under TRITON_INTERPRET=1 against the torch reference (and fp64)."""
import pytest
import torch

from server.lora import ops, triton_ops
from tests.lora.helpers import PATTERNS, loop_reference, make_batch

S, R_MAX, D_IN, D_OUT = 5, 16, 72, 40
SLOT_RANKS = [16, 4, 8, 12, 1]


LAYOUTS = ("r_major", "n_major")   # how B (S, d_out, r_max) is stored: LayerSlots' way, and plain


def _b_stack(g, layout):
    """B as (S, d_out, r_max); "r_major" is a transposed view of (S, r_max, d_out), as in LayerSlots."""
    if layout == "r_major":
        return torch.randn(S, R_MAX, D_OUT, generator=g).transpose(1, 2)
    return torch.randn(S, D_OUT, R_MAX, generator=g)


def _setup(pattern, seq_lens, seed, layout="n_major"):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(S, R_MAX, D_IN, generator=g)   # (S, r_max, d_in)
    b = _b_stack(g, layout)                        # (S, d_out, r_max)
    lora = make_batch(pattern, seq_lens, S, SLOT_RANKS, seed=seed)
    T = lora.token_slots.shape[0]
    x = torch.randn(T, D_IN, generator=g)
    y0 = torch.randn(T, D_OUT, generator=g)
    return a, b, lora, x, y0


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_bgmv_matches_reference(pattern, layout):
    a, b, lora, x, y0 = _setup(pattern, [1] * 7, seed=3, layout=layout)
    t = lora.tables()
    h = triton_ops.bgmv_shrink(x, a, lora.token_slots, t.token_ranks)
    torch.testing.assert_close(h, ops.shrink(x, a, lora), atol=1e-4, rtol=1e-4)
    y = triton_ops.bgmv_expand(h, b, lora.token_slots, t.token_ranks, y0.clone())
    torch.testing.assert_close(y, ops.expand(h, b, lora, y0.clone()), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y.double(), loop_reference(x, a, b, lora, y0), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_sgmv_matches_reference(pattern, layout):
    a, b, lora, x, y0 = _setup(pattern, [20, 3, 9, 1, 17], seed=4, layout=layout)
    t = lora.tables()
    h = triton_ops.sgmv_shrink(x, a, t)
    torch.testing.assert_close(h, ops.shrink(x, a, lora), atol=1e-4, rtol=1e-4)
    y = triton_ops.sgmv_expand(h, b, t, y0.clone())
    torch.testing.assert_close(y, ops.expand(h, b, lora, y0.clone()), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y.double(), loop_reference(x, a, b, lora, y0), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("seq_lens", [[1] * 6, [12, 8]], ids=["bgmv", "sgmv"])
def test_dispatch_and_split_k(seq_lens, monkeypatch):
    """shrink/expand pick SGMV or BGMV by mean segment length; a large d_in forces split-K atomics."""
    monkeypatch.setattr(triton_ops, "_TARGET_PROGRAMS", 64)
    g = torch.Generator().manual_seed(5)
    d_in = 1024
    a = torch.randn(S, R_MAX, d_in, generator=g)
    b = torch.randn(S, D_OUT, R_MAX, generator=g)
    lora = make_batch("uniform", seq_lens, S, SLOT_RANKS, seed=6)
    x = torch.randn(lora.token_slots.shape[0], d_in, generator=g)
    y0 = torch.randn(x.shape[0], D_OUT, generator=g)
    h = triton_ops.shrink(x, a, lora)
    y = triton_ops.expand(h, b, lora, y0.clone())
    torch.testing.assert_close(y.double(), loop_reference(x, a, b, lora, y0), atol=1e-3, rtol=1e-4)


def test_small_rank_stack_and_no_adapter_rows():
    """r_max below the tl.dot minimum (16) and a batch where most rows are base only."""
    g = torch.Generator().manual_seed(7)
    a = torch.randn(3, 4, 32, generator=g)
    b = torch.randn(3, 48, 4, generator=g)
    lora = make_batch("uniform", [6, 1, 9, 5], 3, [4, 2, 3], seed=8)
    x = torch.randn(lora.token_slots.shape[0], 32, generator=g)
    y0 = torch.randn(x.shape[0], 48, generator=g)
    for h in (triton_ops.sgmv_shrink(x, a, lora.tables()),
              triton_ops.bgmv_shrink(x, a, lora.token_slots, lora.tables().token_ranks)):
        y = triton_ops.sgmv_expand(h, b, lora.tables(), y0.clone())
        torch.testing.assert_close(y.double(), loop_reference(x, a, b, lora, y0), atol=1e-3, rtol=1e-4)
