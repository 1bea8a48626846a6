"""Runner: the scheduled requests of one step -> a ForwardBatch -> model.forward -> logits.

All index tensors are built on the host as one int64 buffer and moved to the device in a
single copy; the model reads nothing but the ForwardBatch.
"""
from __future__ import annotations

from typing import Protocol

import torch

from server.engine.kv_cache import BlockPool
from server.engine.scheduler import SchedulerOutput
from server.lora.mapping import LoraBatch
from server.model.batch import ForwardBatch


class AdapterSlots(Protocol):
    """The part of server.lora.store.AdapterStore the runner uses."""

    def slot_and_rank(self, name: str) -> tuple[int, int]: ...


class Runner:
    def __init__(self, model: torch.nn.Module, pool: BlockPool, store: AdapterSlots,
                 device: torch.device | str) -> None:
        self.model = model
        self.pool = pool
        self.store = store
        self.device = torch.device(device)

    def run(self, sched: SchedulerOutput) -> torch.Tensor:
        """Logits (B, V) float32, one row per scheduled request (its last new token)."""
        return self.model.forward(self.build(sched))  # (B, V)

    def build(self, sched: SchedulerOutput) -> ForwardBatch:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        context_lens: list[int] = []
        row_slots: list[int] = []
        row_ranks: list[int] = []
        for req, start, n in zip(sched.requests, sched.starts, sched.num_new):
            all_ids = req.all_ids
            ids.extend(all_ids[start:start + n])
            positions.extend(range(start, start + n))
            slots.extend(self.pool.slot(req.block_ids, p) for p in range(start, start + n))
            query_start.append(query_start[-1] + n)
            context_lens.append(start + n)
            slot, rank = self._adapter_slot(req.adapter)
            row_slots.extend([slot] * n)
            row_ranks.extend([rank] * n)
        b, t = len(context_lens), len(ids)
        width = max(len(r.block_ids) for r in sched.requests)
        tables = [r.block_ids + [-1] * (width - len(r.block_ids)) for r in sched.requests]
        logits_rows = [q - 1 for q in query_start[1:]]
        flat = torch.tensor(ids + positions + slots + query_start + context_lens + logits_rows
                            + [x for row in tables for x in row], dtype=torch.int64)
        flat = flat.to(self.device, non_blocking=True)  # (3T + 3B + 1 + B*width,) the one copy
        parts = torch.split(flat, [t, t, t, b + 1, b, b, b * width])
        lora = None
        if any(s >= 0 for s in row_slots):
            lora = LoraBatch.from_row_slots(row_slots, row_ranks, self.device)
        return ForwardBatch(
            input_ids=parts[0], positions=parts[1], slot_mapping=parts[2],
            block_tables=parts[6].view(b, width),  # (B, max_blocks)
            query_start=parts[3], context_lens=parts[4], logits_rows=parts[5],
            query_lens_cpu=list(sched.num_new), context_lens_cpu=context_lens, lora=lora)

    def _adapter_slot(self, name: str | None) -> tuple[int, int]:
        if name is None:
            return -1, 0
        return self.store.slot_and_rank(name)
