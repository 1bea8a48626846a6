"""server/lora/mapping.py: segments from per-row slots, slot groups and device tables."""
import pytest
import torch

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
    assert lora.row_ranks().tolist() == [8, 8, 0, 4, 8, 16, 16] and lora.row_ranks().dtype == torch.int64
    assert lora.row_ranks() is lora.row_ranks()    # built once per step
    assert t.max_seg_len == 2 and t.mean_seg_len == pytest.approx(6 / 4)
    empty = LoraBatch.from_row_slots([-1, -1], [0, 0], "cpu")
    assert not empty.any and empty.tables().seg_slots.numel() == 0


def test_plan_pads_small_groups_into_slot_blocks_and_keeps_big_groups_apart():
    from server.lora.mapping import PAD_MAX_ROWS
    #        row: 0  1  2  3  4  5  6   7  8  9 10 11 12 13
    rows_slots = [5, 0, 1, 3, 7, 7, -1, 9, 2, 2, 2, 2, 2, 2]
    rank_of = {0: 8, 1: 8, 3: 8, 7: 8, 9: 8, 5: 4, 2: 8}
    lora = LoraBatch.from_row_slots(rows_slots, [rank_of.get(s, 0) for s in rows_slots], "cpu")
    plan = lora.plan()
    assert plan is lora.plan()                     # built once per step
    assert rows_slots.count(2) > PAD_MAX_ROWS
    assert [(s, r) for s, r, _ in plan.groups] == [(2, 8)]    # six rows: its own matmuls
    assert plan.groups[0][2] == slice(8, 14)
    blocks = {(b.lo, b.hi, b.rank): b for b in plan.blocks}
    # rank 8: slots 0, 1, 3 bridge the idle slot 2 (gap 1); 7 and 9 are 4 away from 3, so a new block
    assert set(blocks) == {(0, 4, 8), (7, 10, 8), (5, 6, 4)}
    b = blocks[(0, 4, 8)]
    assert b.width == 1 and b.rows.tolist() == [1, 2, 3] and b.dest.tolist() == [0, 1, 3] and b.src is None
    b = blocks[(7, 10, 8)]   # slot 7 has two rows: width 2, slot 9's second position empty
    assert b.width == 2 and b.rows.tolist() == [4, 5, 7] and b.dest.tolist() == [0, 1, 4] and b.src is None
    b = blocks[(5, 6, 4)]
    assert b.width == 1 and b.rows.tolist() == [0] and b.dest.tolist() == [0] and b.src.tolist() == [0]


def test_plan_full_block_gathers_every_row():
    """Distinct adapters in contiguous slots, one row each, in any row order: one full block."""
    rows_slots = [3, 1, 0, 2]
    plan = LoraBatch.from_row_slots(rows_slots, [16] * 4, "cpu").plan()
    assert plan.groups == [] and len(plan.blocks) == 1
    b = plan.blocks[0]
    assert (b.lo, b.hi, b.width, b.rows) == (0, 4, 1, None)
    assert b.dest.tolist() == [3, 1, 0, 2] and b.src.tolist() == [2, 1, 3, 0]
