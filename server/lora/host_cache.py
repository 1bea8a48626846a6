"""HostCache: the host-memory tier of the adapter store, an LRU of adapter names.

Adapters read from disk are converted here to the serving dtype (and pinned for a CUDA
device, so copies into device slots are asynchronous). At most `capacity` stay; the least
recently used one that no step is waiting for is evicted first. AdapterStore calls it
under its own lock; it holds none.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container

import torch

from server.lora.adapter import LoraAdapter


class HostCache:
    def __init__(self, capacity: int, device: torch.device, dtype: torch.dtype) -> None:
        self.capacity = capacity
        self.pin = device.type == "cuda"
        self.dtype = dtype
        self._order: OrderedDict[str, None] = OrderedDict()

    def convert(self, adapter: LoraAdapter) -> LoraAdapter:
        """Weights in the serving dtype; in pinned memory for a CUDA device."""
        adapter.weights = {m: (a.to(self.dtype), b.to(self.dtype)) for m, (a, b) in adapter.weights.items()}
        if self.pin:
            adapter.weights = {m: (a.pin_memory(), b.pin_memory()) for m, (a, b) in adapter.weights.items()}
        return adapter

    def admit(self, name: str, keep: Container[str]) -> list[str]:
        """`name` is now in host memory (most recent); -> the names evicted to stay in capacity,
        never `name` itself nor one in `keep`."""
        self.touch(name)
        evicted = []
        while len(self._order) > self.capacity:
            victim = next((n for n in self._order if n not in keep and n != name), None)
            if victim is None:
                break
            del self._order[victim]
            evicted.append(victim)
        return evicted

    def touch(self, name: str) -> None:
        self._order[name] = None
        self._order.move_to_end(name)

    def discard(self, name: str) -> None:
        self._order.pop(name, None)
