"""BlockPool accounting and pool sizing."""
import pytest

from server.config import ConfigError, EngineConfig
from server.engine.kv_cache import BlockPool, KVCacheError, blocks_for, pool_size


def test_allocate_grow_free_accounting():
    pool = BlockPool(10, 4)
    a: list[int] = []
    pool.grow(a, 5)                   # 5 tokens -> 2 blocks
    assert len(a) == 2 and pool.num_used == 2 and pool.num_free == 8
    pool.grow(a, 8)                   # still 2 blocks
    assert len(a) == 2
    pool.grow(a, 9)
    assert len(a) == 3 and pool.num_free == 7
    b = pool.allocate(7)
    assert pool.num_free == 0 and not pool.can_allocate(1)
    assert not set(a) & set(b)        # no block handed out twice
    with pytest.raises(KVCacheError, match="asked for 1 KV blocks, 0 free"):
        pool.allocate(1)
    pool.free(a)
    assert a == [] and pool.num_free == 3 and pool.num_used == 7
    pool.free(b)
    assert pool.num_free == 10 and pool.num_used == 0


def test_double_free_raises_and_changes_nothing():
    pool = BlockPool(4, 2)
    a = pool.allocate(2)
    copy = list(a)
    pool.free(a)
    with pytest.raises(KVCacheError, match="freed twice"):
        pool.free(copy)
    assert pool.num_free == 4
    c = pool.allocate(1)
    with pytest.raises(KVCacheError):
        pool.free(c + c)              # the same block twice in one list
    assert pool.num_used == 1


def test_slot_and_blocks_for():
    pool = BlockPool(8, 4)
    ids = [5, 2, 7]
    assert [pool.slot(ids, t) for t in (0, 3, 4, 9)] == [20, 23, 8, 29]
    assert [blocks_for(n, 4) for n in (0, 1, 4, 5)] == [0, 1, 1, 2]
    assert pool.blocks_needed(ids, 13) == 1 and pool.blocks_needed(ids, 12) == 0


def test_pool_size_from_config_and_memory_cap():
    assert pool_size(EngineConfig(kv_cache_tokens=1000, block_size=16), 100, None) == 62
    assert pool_size(EngineConfig(num_kv_blocks=7), 100, None) == 7
    assert pool_size(EngineConfig(num_kv_blocks=70), 100, 3000) == 30   # capped by memory
    with pytest.raises(ConfigError, match="smaller than one block"):
        pool_size(EngineConfig(kv_cache_tokens=8, block_size=16), 100, None)
    with pytest.raises(ConfigError, match="not enough memory"):
        pool_size(EngineConfig(num_kv_blocks=4), 100, 50)


def test_cached_blocks_are_shared_by_refcount_and_evicted_least_recent_first():
    pool = BlockPool(4, 2)
    a = pool.allocate(3)
    for i, b in enumerate(a):
        assert pool.register(b, bytes([i]))
    assert not pool.register(a[0], b"other")          # a block is cached under one hash
    spare = pool.allocate(1)
    s0 = spare[0]
    assert not pool.register(s0, bytes([0]))          # a hash names one block
    assert pool.cached_prefix([bytes([0]), bytes([1]), b"x", bytes([2])]) == a[:2]
    pool.hold(a[:2])                                  # a second request reuses the prefix
    assert pool.refcount(a[0]) == 2 and pool.num_used == 4
    pool.free(list(a))                                # the first request ends
    assert pool.refcount(a[0]) == 1 and pool.num_used == 3   # a[:2] and spare
    assert pool.num_free == 1 and pool.num_cached == 3   # a[2] is cached and idle
    pool.free(spare)
    assert pool.num_free == 2
    took = pool.allocate(2)                           # the never-cached block first, then a[2]
    assert took == [s0, a[2]] and pool.evictions == 1
    assert pool.cached_prefix([bytes([2])]) == [] and pool.num_cached == 2
    with pytest.raises(KVCacheError, match="asked for 1 KV blocks, 0 free"):
        pool.allocate(1)                              # held cached blocks are never evicted
    pool.free(took)
    held = a[:2]
    pool.free(list(held))
    assert pool.num_used == 0 and pool.num_free == 4 and pool.num_cached == 2
    # freeing puts the last block first in line for eviction, so prefixes outlive their tails
    assert sorted(pool.allocate(2)) == sorted([s0, a[2]])    # plain free blocks go first
    assert pool.allocate(1) == [a[1]]                         # then the tail, before its prefix
    assert pool.cached_prefix([bytes([0]), bytes([1])]) == [a[0]]


def test_cap_on_idle_cached_blocks_and_reset():
    pool = BlockPool(6, 2, max_cached=2)
    a = pool.allocate(4)
    for i, b in enumerate(a):
        pool.register(b, bytes([i]))
    pool.free(list(a))
    assert pool.num_cached == 2 and pool.num_free == 6    # the two beyond the cap went free
    assert pool.cached_prefix([bytes([0]), bytes([1])]) == a[:2]   # the prefix survived
    pool.hold(a[:1])
    assert pool.reset_cache() == 2
    assert pool.num_cached == 0 and pool.cached_prefix([bytes([0])]) == []
    pool.free([a[0]])                                     # a held block leaves as a plain one
    assert pool.num_free == 6 and pool.num_used == 0
