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
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from server.config import EngineConfig
from server.engine.kv_cache import BlockPool, blocks_for
from server.engine.request import Request, Status, check_fits
from server.errors import AdapterError, PromptTooLongError


class AdapterResidency(Protocol):
    """The part of server.lora.store.AdapterStore the scheduler uses."""

    def request_resident(self, name: str) -> bool: ...
    def pin(self, name: str) -> None: ...
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


class Scheduler:
    def __init__(self, config: EngineConfig, pool: BlockPool, store: AdapterResidency,
                 max_model_len: int) -> None:
        self.config = config
        self.pool = pool
        self.store = store
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._adapter_wait: dict[str, int] = {}   # request_id -> steps skipped for its adapter
        self.num_preemptions = 0                   # since start, for stats and metrics

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
        self.pool.free(req.block_ids)
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
            n = min(req.num_tokens - req.num_computed, budget)   # chunked when over the budget
            if not self.pool.can_allocate(blocks_for(n, self.pool.block_size)):
                break   # FCFS: later requests do not overtake one that waits for memory
            if not self._admit(req, n, out):
                continue
            if req.adapter is not None:
                active.add(req.adapter)
            budget -= n
        for req in skipped:
            self._adapter_wait[req.request_id] = self._adapter_wait.get(req.request_id, 0) + 1

    def _admit(self, req: Request, n: int, out: SchedulerOutput) -> bool:
        """Move req to running with blocks for its first n tokens; False if its adapter vanished."""
        self.waiting.remove(req)
        if req.adapter is not None:
            try:
                self.store.pin(req.adapter)
            except AdapterError as e:   # unloaded by an admin call since request_resident
                out.failed.append((req, e))
                return False
        self.pool.grow(req.block_ids, n)
        self.running.append(req)
        req.status = Status.RUNNING
        self._adapter_wait.pop(req.request_id, None)
        out.requests.append(req)
        out.starts.append(req.num_computed)
        out.num_new.append(n)
        return True

    def _adapter_admissible(self, name: str, active: set[str], starving: str | None) -> bool:
        full = len(active) >= self.config.max_loras
        if starving is not None and name != starving and (name not in active or full):
            return False
        if full and name not in active:
            return False
        # Even for an adapter already in the step: after a reload its running requests may still
        # be on the old slot, and a new request must wait until the new weights are resident.
        return self.store.request_resident(name)
