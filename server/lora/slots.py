"""LayerSlots: one linear's stacked adapter buffers, allocated once; loading is copy_ into a slot.

    a[max_loras, r_max, d_in]     A of the adapter in each slot, rows past its rank zero
    b[max_loras, d_out, r_max]    B' = scale·B, columns past its rank zero; stored r-major
                                  (a transposed view of (max_loras, r_max, d_out)), so the
                                  CPU expand streams B'ᵀ rows (3x faster than strided here)

A slot whose adapter does not target this module stays all zero, so the LoRA path adds
nothing for it. Addresses never change after allocation (CUDA graphs stay valid).

The stacks are kept in the model's dtype, or in bfloat16 under a float32 model on the CPU
kernels (EngineConfig.lora_dtype; half the bytes every adapter row reads per step): A and B'
are rounded to bfloat16 once, as they are copied in, and widened exactly where they are read.
"""
from __future__ import annotations

import torch

from server.lora.mapping import LoraBatch
from server.lora.ops import LoraOps, select_backend


class LayerSlots:
    def __init__(self, num_slots: int, r_max: int, d_in: int, d_out: int,
                 device: torch.device | str, dtype: torch.dtype, ops: LoraOps) -> None:
        self.num_slots = num_slots
        self.r_max = r_max
        self.ops = ops
        self.a = torch.zeros(num_slots, r_max, d_in, device=device, dtype=dtype)   # (S, r_max, d_in)
        self.b = torch.zeros(num_slots, r_max, d_out, device=device, dtype=dtype).transpose(1, 2)  # (S, d_out, r_max)
        self.ranks = [0] * num_slots   # this module's rank in each slot (0 = untargeted / empty)

    def load(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Copy one adapter's (A (r, d_in), B' (d_out, r)) into `slot`; None = not targeted here."""
        assert 0 <= slot < self.num_slots, slot
        if a is None or b is None:
            self.clear(slot)
            return
        r = a.shape[0]
        assert r <= self.r_max and b.shape[1] == r, (tuple(a.shape), tuple(b.shape), self.r_max)
        self.a[slot, :r].copy_(a, non_blocking=True)
        self.a[slot, r:].zero_()
        self.b[slot, :, :r].copy_(b, non_blocking=True)
        self.b[slot, :, r:].zero_()
        self.ranks[slot] = r

    def clear(self, slot: int) -> None:
        self.a[slot].zero_()
        self.b[slot].zero_()
        self.ranks[slot] = 0

    def add_lora(self, x: torch.Tensor, y: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
        """y += expand(shrink(x)) for the rows that have an adapter.  x: (T, d_in), y: (T, d_out)."""
        return self.ops.apply(x, self.a, self.b, lora, y)  # (T, d_out)

    @property
    def nbytes(self) -> int:
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()


def allocate_slots(layers: dict, num_slots: int, r_max: int, device: torch.device | str,
                   dtype: torch.dtype, storage: torch.dtype | None = None) -> LoraOps:
    """Give every LoRA linear of a model its LayerSlots, stacks in `storage` (None: `dtype`,
    the model's), all on one LoRA backend chosen here, once (server/lora/ops.py
    select_backend); -> that backend."""
    ops = select_backend(device, dtype)
    for layer in layers.values():
        layer.slots = LayerSlots(num_slots, r_max, layer.in_features, layer.out_features, device,
                                 storage or dtype, ops)
    return ops
