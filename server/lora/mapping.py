"""LoraBatch: which adapter slot each token row of a step uses.

Built once per step by the runner, read by every LoRA linear of the model. Rows are
grouped into segments of consecutive tokens that share a slot (SGMV-style); decode
steps have one token per sequence (BGMV-style).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LoraBatch:
    token_slots: torch.Tensor        # (T,) int64 device slot of each token row; -1 = base only
    seg_starts: list[int]            # segment s covers rows seg_starts[s]:seg_ends[s] ...
    seg_ends: list[int]
    seg_slots: list[int]             # ... with slot seg_slots[s] (>= 0; base-only segments omitted)
    seg_ranks: list[int]             # actual rank of the adapter in each segment (<= r_max)
    # derived once per step on first use, then shared by every LoRA linear of the model
    _groups: list | None = field(default=None, init=False, repr=False, compare=False)
    _tables: "SegmentTables | None" = field(default=None, init=False, repr=False, compare=False)
    _plan: "LoraPlan | None" = field(default=None, init=False, repr=False, compare=False)
    _row_ranks: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    # a bool, not the list: a compiled step guards on what it reads (server/model/compiled.py)
    any: bool = field(default=False, init=False, compare=False)

    def __post_init__(self) -> None:
        self.any = bool(self.seg_slots)

    def slot_groups(self) -> list[tuple[int, int, slice | torch.Tensor]]:
        """Rows grouped by slot: [(slot, rank, rows)], rows a slice (one segment) or an index tensor."""
        if self._groups is None:
            by_slot: dict[int, list[int]] = {}
            for s, slot in enumerate(self.seg_slots):
                by_slot.setdefault(slot, []).append(s)
            groups = []
            for slot, segs in by_slot.items():
                rank = max(self.seg_ranks[s] for s in segs)
                if len(segs) == 1:
                    rows = slice(self.seg_starts[segs[0]], self.seg_ends[segs[0]])
                else:
                    idx = [i for s in segs for i in range(self.seg_starts[s], self.seg_ends[s])]
                    rows = torch.tensor(idx, dtype=torch.int64, device=self.token_slots.device)
                groups.append((slot, rank, rows))
            self._groups = groups
        return self._groups

    def plan(self) -> "LoraPlan":
        """How the torch path computes this step: padded slot blocks for the small groups, per-slot
        matmuls for the big ones (see LoraPlan). Built once per step, shared by every linear."""
        if self._plan is None:
            self._plan = LoraPlan.build(self.seg_starts, self.seg_ends, self.seg_slots, self.seg_ranks,
                                        self.token_slots.shape[0], self.token_slots.device)
        return self._plan

    def row_ranks(self) -> torch.Tensor:
        """The rank of each row's adapter, 0 for base-only rows: (T,) int64 on the rows' device,
        as the CPU kernel takes it beside token_slots. Built once per step."""
        if self._row_ranks is None:
            ranks = [0] * self.token_slots.shape[0]
            for st, en, rk in zip(self.seg_starts, self.seg_ends, self.seg_ranks):
                ranks[st:en] = [rk] * (en - st)
            self._row_ranks = torch.tensor(ranks, dtype=torch.int64, device=self.token_slots.device)
        return self._row_ranks

    def tables(self) -> "SegmentTables":
        """The segment lists and per-row ranks as device tensors (one host->device copy per step)."""
        if self._tables is None:
            flat = torch.tensor([self.seg_starts, self.seg_ends, self.seg_slots, self.seg_ranks],
                                dtype=torch.int32).reshape(4, len(self.seg_slots))  # (4, S)
            dev = self.token_slots.device
            flat = flat.to(dev)
            lens = [e - s for s, e in zip(self.seg_starts, self.seg_ends)]
            self._tables = SegmentTables(
                seg_starts=flat[0], seg_ends=flat[1], seg_slots=flat[2], seg_ranks=flat[3],
                token_ranks=self.row_ranks().to(torch.int32),
                max_seg_len=max(lens, default=0), mean_seg_len=sum(lens) / max(len(lens), 1))
        return self._tables

    @staticmethod
    def from_row_slots(row_slots: list[int], row_ranks: list[int], device: torch.device | str) -> "LoraBatch":
        """Segments from per-token slots (host lists, one entry per token row)."""
        starts: list[int] = []
        ends: list[int] = []
        slots: list[int] = []
        ranks: list[int] = []
        i = 0
        n = len(row_slots)
        while i < n:
            j = i
            while j < n and row_slots[j] == row_slots[i]:
                j += 1
            if row_slots[i] >= 0:
                starts.append(i)
                ends.append(j)
                slots.append(row_slots[i])
                ranks.append(row_ranks[i])
            i = j
        token_slots = torch.tensor(row_slots, dtype=torch.int64, device=device)
        return LoraBatch(token_slots, starts, ends, slots, ranks)


@dataclass(frozen=True)
class SegmentTables:
    seg_starts: torch.Tensor         # (S,) int32
    seg_ends: torch.Tensor           # (S,) int32
    seg_slots: torch.Tensor          # (S,) int32
    seg_ranks: torch.Tensor          # (S,) int32
    token_ranks: torch.Tensor        # (T,) int32, rank of each row's adapter (0 = base only)
    max_seg_len: int                 # host ints, for launch grids
    mean_seg_len: float


# A slot whose group has at most this many rows goes into a padded block (decode rows, short
# chunks); bigger groups (prefill) get their own matmuls, which padding would only waste.
PAD_MAX_ROWS = 4
# Inactive slots bridged inside one padded block rather than starting another (their x rows
# are zero, so they cost bandwidth only).
PAD_MAX_GAP = 2


@dataclass(frozen=True)
class PaddedBlock:
    """Slots lo..hi-1, all of adapter rank `rank`, as one bmm pair over a[lo:hi] / b[lo:hi].

    Row rows[k] of x goes to position dest[k] of a ((hi - lo) * width, d_in) zero buffer viewed
    as (hi - lo, width, d_in): slot lo + dest[k] // width, its (dest[k] % width)-th row. When
    every position holds a row (no bridged slot, no short group), `src` lists the row of each
    position, so the buffer is one gather and the result one scatter-add (decode with distinct
    or equally shared adapters).
    """
    lo: int
    hi: int
    rank: int
    width: int
    rows: torch.Tensor | None   # (n,) int64 rows of x in this block; None = every row, in order
    dest: torch.Tensor          # (n,) int64 positions in the padded buffer
    src: torch.Tensor | None    # ((hi - lo) * width,) int64 row of each position, when all are filled


@dataclass(frozen=True)
class LoraPlan:
    """The torch path of one step. On CPU each op costs microseconds of dispatch whatever its
    size, so a decode step with 32 distinct adapters runs one bmm pair per block instead of
    32 pairs of tiny matmuls (SmolLM2-135M, batch 32, 32 adapters, r=16, one thread:
    183 -> 63 ms of LoRA per step)."""
    blocks: list[PaddedBlock]
    groups: list[tuple[int, int, slice | torch.Tensor]]   # (slot, rank, rows) of the big groups

    @staticmethod
    def build(starts: list[int], ends: list[int], slots: list[int], ranks: list[int],
              num_rows: int, device: torch.device | str) -> "LoraPlan":
        rows_of: dict[int, list[int]] = {}
        rank_of: dict[int, int] = {}
        for st, en, slot, rank in zip(starts, ends, slots, ranks):
            rows_of.setdefault(slot, []).extend(range(st, en))
            rank_of[slot] = max(rank_of.get(slot, 0), rank)
        groups = []
        small: dict[int, list[int]] = {}   # rank -> slots, for padded blocks
        for slot, rows in rows_of.items():
            if len(rows) <= PAD_MAX_ROWS:
                small.setdefault(rank_of[slot], []).append(slot)
                continue
            contiguous = rows[-1] - rows[0] + 1 == len(rows)
            groups.append((slot, rank_of[slot], slice(rows[0], rows[-1] + 1) if contiguous
                           else torch.tensor(rows, dtype=torch.int64, device=device)))
        blocks = []
        for rank, rank_slots in small.items():
            rank_slots.sort()
            runs = [[rank_slots[0]]]
            for slot in rank_slots[1:]:
                if slot - runs[-1][-1] <= PAD_MAX_GAP + 1:
                    runs[-1].append(slot)
                else:
                    runs.append([slot])
            blocks.extend(_block(run, rank, rows_of, num_rows, device) for run in runs)
        return LoraPlan(blocks, groups)


def _block(run: list[int], rank: int, rows_of: dict[int, list[int]], num_rows: int,
           device: torch.device | str) -> PaddedBlock:
    lo, width = run[0], max(len(rows_of[s]) for s in run)
    hi = run[-1] + 1
    pairs = sorted((r, (s - lo) * width + k) for s in run for k, r in enumerate(rows_of[s]))
    full = len(pairs) == (hi - lo) * width
    src = [r for _, r in sorted((d, r) for r, d in pairs)] if full else []
    idx = torch.tensor([r for r, _ in pairs] + [d for _, d in pairs] + src, dtype=torch.int64).to(device)
    n = len(pairs)
    every_row = n == num_rows
    return PaddedBlock(lo, hi, rank, width, None if every_row else idx[:n], idx[n:2 * n],
                       idx[2 * n:] if full else None)
