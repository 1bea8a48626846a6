"""ForwardBatch: the flat tensors one model step consumes.

The runner builds it from the scheduled requests; the model reads it and nothing else
(no module-global context). Sequences are concatenated along the token axis:

    T = total new tokens this step (prefill chunks + one per decoding sequence)
    B = number of sequences in the step
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from server.lora.mapping import LoraBatch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor      # (T,) int64
    positions: torch.Tensor      # (T,) int64, position of each token in its sequence
    slot_mapping: torch.Tensor   # (T,) int64, flat KV slot (block * block_size + offset) to write
    block_tables: torch.Tensor   # (B, max_blocks) int64, -1 padded
    query_start: torch.Tensor    # (B+1,) int64, sequence b owns rows query_start[b]:query_start[b+1]
    context_lens: torch.Tensor   # (B,) int64, tokens in the cache after this step (old + new)
    logits_rows: torch.Tensor    # (B,) int64, the row of each sequence's last new token
    query_lens_cpu: list[int]    # host copies, so attention can loop without device syncs
    context_lens_cpu: list[int]
    lora: LoraBatch | None = None  # per-token adapter slots; None = no adapter in this batch

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens_cpu)
