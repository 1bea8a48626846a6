"""Scheduler: continuous batching with adapter-aware admission and preemption by recompute.

Each step, running requests go first (oldest first): one decode token each, or the next
chunk of an unfinished prefill. When the KV pool runs out for one of them, the newest
running request is preempted: its blocks are freed, it goes back to the front of the
waiting queue with num_computed = 0, and its output so far is re-prefilled later.
Then waiting requests are admitted first come, first served while the token budget,
max_num_seqs and free blocks allow; a prefill longer than the remaining budget is chunked.

Adapters: a step holds at most config.max_loras distinct adapters, all resident in device
slots and pinned while their requests run. A request whose adapter is not resident (or
does not fit the step) is skipped without blocking the queue behind it. No adapter
starves: once a request has waited more than config.lora_wait_steps steps for its adapter,
no other adapter may enter the step until it has (and while the step's adapter set is full,
running adapters take no new requests either, so a slot drains).

Prefix cache (config.enable_prefix_caching): a request admitted with nothing computed takes
the cached blocks of its longest cached prefix (server/engine/prefix_cache.py keys them) and
starts computing after them; at least its last token is always computed, for its logits.
`commit` registers the full blocks a step computed. A request whose next uncached block is
being computed by a running one (the n choices of one prompt, or the same system prompt
sent twice at once) waits for it rather than computing it twice.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from server.config import EngineConfig
from server.engine.kv_cache import BlockPool, blocks_for
from server.engine.prefix_cache import extend_hashes, namespace
from server.engine.request import Request, Status, check_fits
from server.errors import AdapterError, PromptTooLongError


class AdapterResidency(Protocol):
    """The part of server.lora.store.AdapterStore the scheduler uses."""

    def request_resident(self, name: str) -> bool: ...
    def cache_key(self, name: str) -> str | None: ...    # the weights new requests get, if resident
    def pin(self, name: str) -> str | None: ...          # -> the cache key of the weights it starts on
    def unpin(self, name: str) -> None: ...


@dataclass
class SchedulerOutput:
    requests: list[Request] = field(default_factory=list)   # batch order
    starts: list[int] = field(default_factory=list)         # num_computed before this step
    num_new: list[int] = field(default_factory=list)        # tokens computed this step
    sampled: list[bool] = field(default_factory=list)       # reaches its last token: gets a new one
    preempted: list[Request] = field(default_factory=list)
    failed: list[tuple[Request, AdapterError]] = field(default_factory=list)  # adapter could not load

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)


@dataclass
class _Hit:
    """What admitting a waiting request would reuse from the prefix cache."""
    root: bytes | None = None     # None: the request does not use the cache
    adapter_key: str | None = None
    blocks: list[int] = field(default_factory=list)
    idle: int = 0                 # of those, blocks no request holds (taking them uses free space)


class Scheduler:
    def __init__(self, config: EngineConfig, pool: BlockPool, store: AdapterResidency,
                 max_model_len: int, base_key: str = "") -> None:
        """base_key: the served base model's fingerprint, part of every prefix-cache key."""
        self.config = config
        self.base_key = base_key
        self.pool = pool
        self.store = store
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._adapter_wait: dict[str, int] = {}   # request_id -> steps skipped for its adapter
        self.num_preemptions = 0                   # since start, for stats and metrics
        self._pending: dict[bytes, str] = {}       # block hash -> id of the running request computing it
        # prefix-cache lookups by adapter ("" = base): prompt tokens looked up and tokens found
        self.cache_queries: dict[str, int] = {}
        self.cache_hits: dict[str, int] = {}

    # -- queue ----------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        n = len(req.prompt_ids)
        check_fits(n, self.max_model_len)
        capacity = self.pool.num_blocks * self.pool.block_size
        if blocks_for(n + 1, self.pool.block_size) > self.pool.num_blocks:
            raise PromptTooLongError(n, capacity - 1)
        req.status = Status.WAITING
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: Request) -> None:
        """Drop a request (finished or aborted): free its blocks and unpin its adapter."""
        if req.status == Status.RUNNING:
            self.running.remove(req)
            self._release(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._adapter_wait.pop(req.request_id, None)
        req.status = Status.FINISHED

    def _release(self, req: Request) -> None:
        for h in req.block_hashes[req.num_registered:]:
            if self._pending.get(h) == req.request_id:
                del self._pending[h]
        self.pool.free(req.block_ids)
        req.num_registered = 0
        if req.adapter is not None:
            self.store.unpin(req.adapter)

    def _preempt(self, req: Request) -> None:
        self.num_preemptions += 1
        self.running.remove(req)
        self._release(req)
        req.num_computed = 0
        req.status = Status.WAITING
        self.waiting.appendleft(req)

    # -- one step -------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        for req, start, n in zip(out.requests, out.starts, out.num_new):
            req.num_computed = start + n
            out.sampled.append(req.num_computed == req.num_tokens)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed, budget)
            assert n > 0, f"running request {req.request_id} has nothing to compute"
            need = self.pool.blocks_needed(req.block_ids, req.num_computed + n)
            while not self.pool.can_allocate(need) and self.running[-1] is not req:
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
            if not self.pool.can_allocate(need):
                self._preempt(req)          # it is the newest itself: nothing left to take from
                out.preempted.append(req)
                break
            self.pool.grow(req.block_ids, req.num_computed + n)
            out.requests.append(req)
            out.starts.append(req.num_computed)
            out.num_new.append(n)
            budget -= n
            i += 1
        return budget

    def _active_adapters(self) -> set[str]:
        return {r.adapter for r in self.running if r.adapter is not None}

    def _starving_adapter(self) -> str | None:
        for req in self.waiting:
            if req.adapter is not None and self._adapter_wait.get(req.request_id, 0) > self.config.lora_wait_steps:
                return req.adapter
        return None

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        active = self._active_adapters()
        starving = self._starving_adapter()
        skipped: list[Request] = []
        for req in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            try:
                admissible = req.adapter is None or self._adapter_admissible(req.adapter, active, starving)
            except AdapterError as e:     # unloaded since it was queued, or its files are bad
                self.waiting.remove(req)
                out.failed.append((req, e))
                continue
            if not admissible:
                skipped.append(req)
                continue
            hit = self._lookup(req)
            if hit is None:
                continue    # its next block is being computed by a running request: reuse it next step
            cached = len(hit.blocks) * self.pool.block_size
            n = min(req.num_tokens - cached, budget)   # chunked when over the budget
            need = blocks_for(cached + n, self.pool.block_size) - len(hit.blocks)
            if not self.pool.can_allocate(need + hit.idle):
                break   # FCFS: later requests do not overtake one that waits for memory
            if not self._admit(req, hit, n, out):
                continue
            if req.adapter is not None:
                active.add(req.adapter)
            budget -= out.num_new[-1]
        for req in skipped:
            self._adapter_wait[req.request_id] = self._adapter_wait.get(req.request_id, 0) + 1

    def _lookup(self, req: Request) -> _Hit | None:
        """The cached prefix admitting req would reuse; None when it should wait a step."""
        if not self.config.enable_prefix_caching:
            return _Hit()
        key = None if req.adapter is None else self.store.cache_key(req.adapter)
        if req.adapter is not None and key is None:
            return _Hit()
        root = namespace(self.base_key, key, req.cache_salt)
        if root != req.cache_root:
            req.cache_root, req.block_hashes = root, []
        usable = (req.num_tokens - 1) // self.pool.block_size   # the last token is always computed
        extend_hashes(req.block_hashes, root, req.all_ids, self.pool.block_size, usable)
        blocks = self.pool.cached_prefix(req.block_hashes[:usable])
        if len(blocks) < usable and req.block_hashes[len(blocks)] in self._pending:
            return None
        return _Hit(root, key, blocks, sum(self.pool.refcount(b) == 0 for b in blocks))

    def _admit(self, req: Request, hit: _Hit, n: int, out: SchedulerOutput) -> bool:
        """Move req to running with its cached blocks and blocks for n more tokens; False if
        its adapter vanished, or got other weights since the lookup (it waits a step)."""
        self.waiting.remove(req)
        if req.adapter is not None:
            try:
                key = self.store.pin(req.adapter)
            except AdapterError as e:   # unloaded by an admin call since request_resident
                out.failed.append((req, e))
                return False
            if key != hit.adapter_key and hit.root is not None:   # reloaded since the lookup:
                self.store.unpin(req.adapter)                     # look it up again next step
                self.waiting.appendleft(req)
                return False
        if hit.root is not None:
            label = req.adapter or ""
            self.cache_queries[label] = self.cache_queries.get(label, 0) + req.num_tokens
            self.cache_hits[label] = self.cache_hits.get(label, 0) + len(hit.blocks) * self.pool.block_size
        self.pool.hold(hit.blocks)
        req.block_ids = list(hit.blocks)
        req.num_registered = len(hit.blocks)
        req.num_computed = len(hit.blocks) * self.pool.block_size
        if hit.root is None:
            req.cache_root, req.block_hashes = None, []
        else:
            for h in req.block_hashes[len(hit.blocks):]:
                self._pending.setdefault(h, req.request_id)
        if req.cached_tokens is None:
            req.cached_tokens = req.num_computed
        self.pool.grow(req.block_ids, req.num_computed + n)
        self.running.append(req)
        req.status = Status.RUNNING
        self._adapter_wait.pop(req.request_id, None)
        out.requests.append(req)
        out.starts.append(req.num_computed)
        out.num_new.append(n)
        return True

    def commit(self, requests: list[Request]) -> None:
        """After a forward that computed these requests' scheduled tokens: cache their full blocks."""
        bs = self.pool.block_size
        for req in requests:
            if req.cache_root is None or req.status != Status.RUNNING:
                continue
            full = req.num_computed // bs
            if full <= req.num_registered:
                continue
            extend_hashes(req.block_hashes, req.cache_root, req.all_ids, bs, full)
            for i in range(req.num_registered, full):
                h = req.block_hashes[i]
                self.pool.register(req.block_ids[i], h)
                if self._pending.get(h) == req.request_id:
                    del self._pending[h]
            req.num_registered = full

    def reset_cache(self) -> int:
        """Empty the prefix cache (blocks in use stay with their requests); blocks dropped."""
        n = self.pool.reset_cache()
        for req in self.running:
            req.cache_root, req.block_hashes, req.num_registered = None, [], 0
        self._pending.clear()
        return n

    def _adapter_admissible(self, name: str, active: set[str], starving: str | None) -> bool:
        full = len(active) >= self.config.max_loras
        if starving is not None and name != starving and (name not in active or full):
            return False
        if full and name not in active:
            return False
        # Even for an adapter already in the step: after a reload its running requests may still
        # be on the old slot, and a new request must wait until the new weights are resident.
        return self.store.request_resident(name)
