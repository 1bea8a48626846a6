"""server/lora/slots.py: copy_ into fixed buffers; zero padding; add_lora against an fp64 loop."""
import torch

from server.lora.mapping import LoraBatch
from server.lora.ops import TORCH_OPS
from server.lora.slots import LayerSlots
from tests.lora.helpers import loop_reference


def test_load_copies_into_fixed_buffers_with_zero_padding():
    s = LayerSlots(3, 8, 12, 10, "cpu", torch.float32, TORCH_OPS)
    pa, pb = s.a.data_ptr(), s.b.data_ptr()
    assert s.a.shape == (3, 8, 12) and s.b.shape == (3, 10, 8)
    a8, b8 = torch.randn(8, 12), torch.randn(10, 8)
    s.load(1, a8, b8)
    a4, b4 = torch.randn(4, 12), torch.randn(10, 4)
    s.load(1, a4, b4)                      # a lower rank over a full one: the tail is zeroed
    assert torch.equal(s.a[1, :4], a4) and torch.all(s.a[1, 4:] == 0)
    assert torch.equal(s.b[1, :, :4], b4) and torch.all(s.b[1, :, 4:] == 0)
    assert s.ranks == [0, 4, 0]
    s.load(2, a8, b8)
    s.load(2, None, None)                  # an adapter that does not target this module
    assert torch.all(s.a[2] == 0) and torch.all(s.b[2] == 0) and s.ranks[2] == 0
    assert torch.all(s.a[0] == 0)          # other slots untouched
    assert (s.a.data_ptr(), s.b.data_ptr()) == (pa, pb)
    assert s.nbytes == (3 * 8 * 12 + 3 * 10 * 8) * 4


def test_add_lora_matches_loop():
    torch.manual_seed(1)
    s = LayerSlots(4, 16, 20, 14, "cpu", torch.float32, TORCH_OPS)
    ranks = [16, 3, 8, 5]
    for slot, r in enumerate(ranks):
        s.load(slot, torch.randn(r, 20), torch.randn(14, r))
    rows = [3, 3, -1, 0, 1, 1, 1, 2, -1, 3]
    lora = LoraBatch.from_row_slots(rows, [ranks[x] if x >= 0 else 0 for x in rows], "cpu")
    x, y0 = torch.randn(len(rows), 20), torch.randn(len(rows), 14)
    y = s.add_lora(x, y0.clone(), lora)
    torch.testing.assert_close(y.double(), loop_reference(x, s.a, s.b, lora, y0), atol=1e-4, rtol=1e-4)
    assert torch.equal(y[2], y0[2]) and torch.equal(y[8], y0[8])
