"""Fixtures shared by the GPU scripts and the test suite: a paged-KV driver for the model
without an engine, random prompts, and non-trivial norms and biases for a fresh HF model.

PagedSequences is a minimal stand-in for the engine's runner: sequences in a paged KV cache
-> ForwardBatch. Blocks are handed out in a shuffled order so that a sequence's blocks are
not contiguous, as they are not in a real server.
"""
from __future__ import annotations

import random

import torch

from server.model.batch import ForwardBatch


class PagedSequences:
    def __init__(self, num_blocks: int, block_size: int, seed: int = 0) -> None:
        self.block_size = block_size
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.blocks: dict[int, list[int]] = {}   # sequence id -> block ids
        self.lengths: dict[int, int] = {}        # sequence id -> tokens cached

    def step(self, new_tokens: dict[int, list[int]], device: torch.device | str = "cpu") -> ForwardBatch:
        """A ForwardBatch appending new_tokens[seq] to each sequence (in dict order)."""
        ids, positions, slots, tables, qlens, clens = [], [], [], [], [], []
        for seq, toks in new_tokens.items():
            start = self.lengths.get(seq, 0)
            blocks = self.blocks.setdefault(seq, [])
            end = start + len(toks)
            while len(blocks) * self.block_size < end:
                blocks.append(self.free.pop())
            for pos in range(start, end):
                slots.append(blocks[pos // self.block_size] * self.block_size + pos % self.block_size)
            ids.extend(toks)
            positions.extend(range(start, end))
            tables.append(list(blocks))
            qlens.append(len(toks))
            clens.append(end)
            self.lengths[seq] = end
        width = max(len(t) for t in tables)
        padded = [t + [-1] * (width - len(t)) for t in tables]
        starts = [0]
        for q in qlens:
            starts.append(starts[-1] + q)

        def tensor(x: list) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.int64, device=device)

        return ForwardBatch(
            input_ids=tensor(ids), positions=tensor(positions), slot_mapping=tensor(slots),
            block_tables=tensor(padded), query_start=tensor(starts), context_lens=tensor(clens),
            logits_rows=tensor([s - 1 for s in starts[1:]]), query_lens_cpu=qlens, context_lens_cpu=clens,
        )


def random_prompts(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Give a freshly initialised transformers model non-trivial norms and biases (init
    leaves them at one and zero, which would hide a missing norm or bias)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "norm" in name:
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.2)

