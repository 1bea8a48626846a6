"""LoraBatch: which adapter slot each token row of a step uses.

Built once per step by the runner, read by every LoRA linear of the model. Rows are
grouped into segments of consecutive tokens that share a slot (SGMV-style); decode
steps have one token per sequence (BGMV-style).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoraBatch:
    token_slots: torch.Tensor        # (T,) int64 device slot of each token row; -1 = base only
    seg_starts: list[int]            # segment s covers rows seg_starts[s]:seg_ends[s] ...
    seg_ends: list[int]
    seg_slots: list[int]             # ... with slot seg_slots[s] (>= 0; base-only segments omitted)
    seg_ranks: list[int]             # actual rank of the adapter in each segment (<= r_max)

    @property
    def any(self) -> bool:
        return bool(self.seg_slots)

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
