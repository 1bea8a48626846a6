"""LinearWithLoRA: y = base(x) + expand(shrink(x, A, slots), B, slots).

Every LoRA-capable decoder linear (q, k, v, o, gate, up, down) is one of these. `base` is
the quantized (NF4) or dense linear from server/model/quant.py; `slots` is attached by the
adapter store when LoRA is enabled and holds this layer's stacked A/B buffers.
"""
from __future__ import annotations

import torch
from torch import nn

from server.lora.mapping import LoraBatch


class LinearWithLoRA(nn.Module):
    def __init__(self, base: nn.Module, in_features: int, out_features: int) -> None:
        super().__init__()
        self.base = base
        self.in_features = in_features
        self.out_features = out_features
        self.slots = None  # server.lora.slots.LayerSlots, attached at start-up when LoRA is on

    def forward(self, x: torch.Tensor, lora: LoraBatch | None = None) -> torch.Tensor:
        return self.add_lora(x, self.base(x), lora)  # (T, out)

    def add_lora(self, x: torch.Tensor, y: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
        """y (T, out), this linear's base output (or a view of a fused base's output), plus the
        LoRA of each row's adapter, in place; -> y."""
        if lora is None or self.slots is None or not lora.any:
            return y
        return self.slots.add_lora(x, y, lora)  # (T, out)
