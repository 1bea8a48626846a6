"""BlockPool: the paged KV cache's block allocator and its prefix cache (bookkeeping only).

The model owns the K/V tensors (`model.allocate_kv_cache(num_blocks, block_size)`); this
pool hands out block ids. A sequence holds a list of blocks; token t of it lives in block
block_ids[t // block_size] at offset t % block_size, i.e. flat slot
block_ids[t // block_size] * block_size + t % block_size.

Prefix cache: a full, computed block may be registered under its hash (a chain over the
tokens before it and the request's namespace: server/engine/prefix_cache.py). Blocks are
reference-counted; a block nobody holds any more stays cached, and evictable, in LRU order,
until a new allocation needs it (or the cache's cap, `max_cached`, is passed). A cached
block is read-only: a request that finds it writes only into blocks after it.
"""
from __future__ import annotations

import logging
from collections import OrderedDict, deque

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
    def __init__(self, num_blocks: int, block_size: int, max_cached: int = 0) -> None:
        """max_cached: most blocks kept cached while no request holds them (0 = no cap)."""
        assert num_blocks > 0 and block_size > 0 and max_cached >= 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_cached = max_cached
        self._free: deque[int] = deque(range(num_blocks))   # neither held nor cached
        self._refs: dict[int, int] = {}                      # held blocks -> holders
        self._hash_of: dict[int, bytes] = {}                 # cached blocks -> their hash
        self._block_of: dict[bytes, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()   # cached, held by nobody: LRU first
        self.evictions = 0                                   # cached blocks reused, since start

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: free ones and cached ones nobody holds."""
        return len(self._free) + len(self._idle)

    @property
    def num_used(self) -> int:
        """Blocks held by at least one request."""
        return len(self._refs)

    @property
    def num_cached(self) -> int:
        """Blocks registered in the prefix cache (held or not)."""
        return len(self._hash_of)

    def refcount(self, block: int) -> int:
        return self._refs.get(block, 0)

    def blocks_needed(self, block_ids: list[int], num_tokens: int) -> int:
        """Extra blocks a sequence holding block_ids needs to hold num_tokens tokens."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(block_ids))

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        """n blocks, each held once: free ones first, then the least recently used cached ones."""
        if n > self.num_free:
            raise KVCacheError(f"asked for {n} KV blocks, {self.num_free} free")
        out = [self._free.popleft() if self._free else self._evict() for _ in range(n)]
        for b in out:
            self._refs[b] = 1
        return out

    def grow(self, block_ids: list[int], num_tokens: int) -> None:
        """Append blocks to block_ids (in place) until it holds num_tokens tokens."""
        block_ids.extend(self.allocate(self.blocks_needed(block_ids, num_tokens)))

    def free(self, block_ids: list[int]) -> None:
        """Drop a sequence's hold on its blocks; the list is emptied. A block nobody holds goes
        back to the free list, or, when cached, to the LRU end of the cached ones (the last
        block first, so a prefix outlives its tails). Freeing a block twice raises."""
        bad = [b for b in block_ids if b not in self._refs]
        if bad or len(set(block_ids)) != len(block_ids):
            raise KVCacheError(f"KV blocks {bad or block_ids} freed twice or never allocated")
        for b in reversed(block_ids):
            self._refs[b] -= 1
            if self._refs[b]:
                continue
            del self._refs[b]
            if b in self._hash_of:
                self._idle[b] = None
            else:
                self._free.append(b)
        while self.max_cached and len(self._idle) > self.max_cached:
            self._free.append(self._evict())
        block_ids.clear()

    def slot(self, block_ids: list[int], position: int) -> int:
        """Flat KV slot of token `position` of a sequence."""
        return block_ids[position // self.block_size] * self.block_size + position % self.block_size

    # -- prefix cache -----------------------------------------------------------------------
    def cached_prefix(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest run of `hashes` from the first (not yet held)."""
        out: list[int] = []
        for h in hashes:
            b = self._block_of.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def hold(self, blocks: list[int]) -> None:
        """Take one more hold on cached blocks (a request reuses them)."""
        for b in blocks:
            assert b in self._hash_of, f"block {b} is not cached"
            self._refs[b] = self._refs.get(b, 0) + 1
            self._idle.pop(b, None)

    def register(self, block: int, block_hash: bytes) -> bool:
        """Cache a held, full, computed block under its hash. False (nothing changes) when
        that hash is cached already (another request computed the same block) or the block is."""
        assert block in self._refs, f"block {block} is not held"
        if block_hash in self._block_of or block in self._hash_of:
            return False
        self._block_of[block_hash] = block
        self._hash_of[block] = block_hash
        return True

    def reset_cache(self) -> int:
        """Forget every cached block (held ones stay held, and are freed as usual); the number
        of blocks that were cached."""
        n = len(self._hash_of)
        self._free.extend(self._idle)
        self._idle.clear()
        self._hash_of.clear()
        self._block_of.clear()
        return n

    def _evict(self) -> int:
        b, _ = self._idle.popitem(last=False)
        del self._block_of[self._hash_of.pop(b)]
        self.evictions += 1
        return b
