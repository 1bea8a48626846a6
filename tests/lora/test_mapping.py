"""server/lora/mapping.py: segments from per-row slots, slot groups and device tables."""
import pytest

from server.lora.mapping import LoraBatch


def test_segments_from_row_slots():
    lora = LoraBatch.from_row_slots([-1, 3, 3, 1, -1, -1, 3], [0, 8, 8, 4, 0, 0, 8], "cpu")
    assert lora.any and lora.token_slots.tolist() == [-1, 3, 3, 1, -1, -1, 3]
    assert (lora.seg_starts, lora.seg_ends, lora.seg_slots, lora.seg_ranks) == ([1, 3, 6], [3, 4, 7], [3, 1, 3], [8, 4, 8])


def test_slot_groups_and_tables():
    lora = LoraBatch.from_row_slots([2, 2, -1, 0, 2, 1, 1], [8, 8, 0, 4, 8, 16, 16], "cpu")
    groups = {slot: (rank, rows) for slot, rank, rows in lora.slot_groups()}
    assert set(groups) == {0, 1, 2}
    assert groups[0] == (4, slice(3, 4)) and groups[1] == (16, slice(5, 7))
    assert groups[2][0] == 8 and groups[2][1].tolist() == [0, 1, 4]
    t = lora.tables()
    assert t.seg_starts.tolist() == [0, 3, 4, 5] and t.seg_ends.tolist() == [2, 4, 5, 7]
    assert t.seg_slots.tolist() == [2, 0, 2, 1] and t.seg_ranks.tolist() == [8, 4, 8, 16]
    assert t.token_ranks.tolist() == [8, 8, 0, 4, 8, 16, 16]
    assert t.max_seg_len == 2 and t.mean_seg_len == pytest.approx(6 / 4)
    empty = LoraBatch.from_row_slots([-1, -1], [0, 0], "cpu")
    assert not empty.any and empty.tables().seg_slots.numel() == 0
