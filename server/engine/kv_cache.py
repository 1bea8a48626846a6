"""BlockPool: the paged KV cache's block allocator (bookkeeping only, no tensors).

The model owns the K/V tensors (`model.allocate_kv_cache(num_blocks, block_size)`); this
pool hands out block ids. A sequence holds a list of blocks; token t of it lives in block
block_ids[t // block_size] at offset t % block_size, i.e. flat slot
block_ids[t // block_size] * block_size + t % block_size.
"""
from __future__ import annotations

import logging
from collections import deque

from server.config import ConfigError, EngineConfig

log = logging.getLogger(__name__)


class KVCacheError(RuntimeError):
    """The allocator was asked for something inconsistent (double free, unknown block)."""


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def pool_size(config: EngineConfig, bytes_per_block: int, memory_budget: int | None) -> int:
    """Number of KV blocks: config.num_kv_blocks, or kv_cache_tokens // block_size, capped
    so the pool fits memory_budget bytes (None = no cap)."""
    wanted = config.num_kv_blocks or config.kv_cache_tokens // config.block_size
    if wanted < 1:
        raise ConfigError(
            f"kv_cache_tokens ({config.kv_cache_tokens}) is smaller than one block ({config.block_size})")
    if memory_budget is not None and bytes_per_block > 0:
        fits = memory_budget // bytes_per_block
        if fits < wanted:
            log.warning("KV pool capped from %d to %d blocks (%.0f MiB available)",
                        wanted, fits, memory_budget / 2**20)
            wanted = fits
        if wanted < 1:
            raise ConfigError(f"not enough memory for one KV block of {bytes_per_block} bytes")
    return wanted


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def blocks_needed(self, block_ids: list[int], num_tokens: int) -> int:
        """Extra blocks a sequence holding block_ids needs to hold num_tokens tokens."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(block_ids))

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise KVCacheError(f"asked for {n} KV blocks, {len(self._free)} free")
        out = [self._free.popleft() for _ in range(n)]
        self._used.update(out)
        return out

    def grow(self, block_ids: list[int], num_tokens: int) -> None:
        """Append blocks to block_ids (in place) until it holds num_tokens tokens."""
        block_ids.extend(self.allocate(self.blocks_needed(block_ids, num_tokens)))

    def free(self, block_ids: list[int]) -> None:
        """Return a sequence's blocks; the list is emptied. Freeing a block twice raises."""
        bad = [b for b in block_ids if b not in self._used]
        if bad or len(set(block_ids)) != len(block_ids):
            raise KVCacheError(f"KV blocks {bad or block_ids} freed twice or never allocated")
        self._used.difference_update(block_ids)
        self._free.extend(block_ids)
        block_ids.clear()

    def slot(self, block_ids: list[int], position: int) -> int:
        """Flat KV slot of token `position` of a sequence."""
        return block_ids[position // self.block_size] * self.block_size + position % self.block_size
