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

    @property
    def any(self) -> bool:
        return bool(self.seg_slots)

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

    def tables(self) -> "SegmentTables":
        """The segment lists and per-row ranks as device tensors (one host->device copy per step)."""
        if self._tables is None:
            n = self.token_slots.shape[0]
            row_ranks = [0] * n
            for st, en, rk in zip(self.seg_starts, self.seg_ends, self.seg_ranks):
                row_ranks[st:en] = [rk] * (en - st)
            flat = torch.tensor([self.seg_starts, self.seg_ends, self.seg_slots, self.seg_ranks],
                                dtype=torch.int32).reshape(4, len(self.seg_slots))  # (4, S)
            dev = self.token_slots.device
            flat = flat.to(dev)
            lens = [e - s for s, e in zip(self.seg_starts, self.seg_ends)]
            self._tables = SegmentTables(
                seg_starts=flat[0], seg_ends=flat[1], seg_slots=flat[2], seg_ranks=flat[3],
                token_ranks=torch.tensor(row_ranks, dtype=torch.int32, device=dev),
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
