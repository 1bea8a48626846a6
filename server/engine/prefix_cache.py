"""Prefix-cache keys: a request's namespace, and the hash chain of its full KV blocks.

Block i of a sequence is keyed by sha256(key of block i - 1, the block's token ids); block 0's
parent is the namespace. Two blocks share a key only when every token up to their end and
the namespace are the same, so a hit can only return K/V computed from the same tokens with
the same weights:

- namespace = (base model, adapter cache key or none, salt);
- the adapter cache key names the exact weights a request starts on: identity (name +
  content hash) and the store's serial of that install (server/lora/store.py `pin`), so a
  reload under the same name, or unload + load, makes every older block unreachable (they
  age out of the LRU; nothing is scanned), and base and adapters never meet;
- the salt separates tenants (their keys-file namespace) and, within one, requests that
  send a `cache_salt`.

The pool (server/engine/kv_cache.py) stores the blocks; the scheduler looks prefixes up at
admission and registers blocks once their K/V are computed (server/engine/scheduler.py).
"""
from __future__ import annotations

import hashlib
import json
from array import array


def namespace(base: str, adapter_key: str | None, salt: str) -> bytes:
    """The root of a request's hash chain."""
    return hashlib.sha256(json.dumps(["loraplex-prefix-v1", base, adapter_key, salt]).encode()).digest()


def extend_hashes(hashes: list[bytes], root: bytes, ids: list[int], block_size: int, num_blocks: int) -> None:
    """Append to `hashes` (the chain of blocks 0 .. len - 1 under `root`) until it holds the
    first `num_blocks` full blocks of `ids`."""
    parent = hashes[-1] if hashes else root
    for i in range(len(hashes), num_blocks):
        tokens = array("q", ids[i * block_size:(i + 1) * block_size])
        assert len(tokens) == block_size, "only full blocks are hashed"
        parent = hashlib.sha256(parent + tokens.tobytes()).digest()
        hashes.append(parent)


def tenant_salt(namespace_name: str, cache_salt: str | None) -> str:
    """The salt of a request: its tenant's cache namespace, and its own cache_salt if given."""
    return json.dumps([namespace_name, cache_salt])
