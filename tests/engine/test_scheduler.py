"""Scheduler: budgets, chunked prefill, preemption order, adapter limits, no starvation."""
from collections import Counter

import pytest

from server.config import EngineConfig
from server.engine.kv_cache import BlockPool
from server.engine.request import Request, SamplingParams, Status
from server.engine.scheduler import Scheduler
from server.errors import PromptTooLongError


class FakeStore:
    """AdapterStore's scheduling contract: residency after `load_steps` requests, pins counted."""

    def __init__(self, num_slots: int, load_steps: int = 0) -> None:
        self.num_slots = num_slots
        self.load_steps = load_steps
        self.resident: dict[str, int] = {}     # name -> requests seen (resident once > load_steps)
        self.pins: Counter = Counter()

    def request_resident(self, name: str) -> bool:
        self.resident[name] = self.resident.get(name, 0) + 1
        if self.resident[name] <= self.load_steps:
            return False
        in_slots = {n for n, c in self.pins.items() if c > 0} | {name}   # pinned ones + this one
        assert len(in_slots) <= self.num_slots
        return True

    def cache_key(self, name: str) -> str | None:
        return f"{name}@1"

    def pin(self, name: str) -> str | None:
        self.pins[name] += 1
        return self.cache_key(name)

    def unpin(self, name: str) -> None:
        assert self.pins[name] > 0, f"unpin of {name} without pin"
        self.pins[name] -= 1


def req(n_prompt: int, max_tokens: int = 4, adapter: str | None = None, rid: str | None = None) -> Request:
    r = Request(list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens, temperature=0.0),
                adapter=adapter)
    if rid:
        r.request_id = rid
    return r


def make(num_blocks=64, block_size=4, store=None, **cfg) -> Scheduler:
    """These tests send identical prompts to test budgets and order: the prefix cache is off
    unless a test turns it on (tests/engine/test_prefix_cache.py tests it)."""
    cfg.setdefault("enable_prefix_caching", False)
    config = EngineConfig(block_size=block_size, num_kv_blocks=num_blocks, **cfg)
    store = store if store is not None else FakeStore(config.max_loras)
    return Scheduler(config, BlockPool(num_blocks, block_size), store, max_model_len=256)


def step(s: Scheduler):
    """One schedule + the engine's bookkeeping: sampled rows get a token, finished ones leave."""
    out = s.schedule()
    for i, r in enumerate(out.requests):
        assert r.num_computed == out.starts[i] + out.num_new[i]
        if out.sampled[i]:
            r.output_ids.append(7)
            if len(r.output_ids) >= r.params.max_tokens:
                s.finish(r)
    return out


def test_token_budget_and_chunked_prefill():
    s = make(max_num_batched_tokens=10)
    a, b = req(6), req(9)
    s.add(a), s.add(b)
    out = step(s)
    assert [r.request_id for r in out.requests] == [a.request_id, b.request_id]
    assert out.num_new == [6, 4] and out.num_tokens == 10     # b's prefill is chunked
    assert not out.sampled[1] and b.output_ids == []
    out = step(s)
    assert out.num_new == [1, 5] and out.sampled[1]           # a decodes, b finishes its prefill
    assert len(b.output_ids) == 1 and b.num_computed == 9
    out = step(s)
    assert out.num_new == [1, 1]
    assert all(len(r.block_ids) * 4 >= r.num_computed for r in (a, b))


def test_max_num_seqs_and_fcfs():
    s = make(max_num_seqs=2)
    reqs = [req(3) for _ in range(4)]
    for r in reqs:
        s.add(r)
    out = step(s)
    assert out.requests == reqs[:2] and list(s.waiting) == reqs[2:]


def test_preempts_newest_by_recompute_and_frees_everything():
    s = make(num_blocks=6, block_size=4)
    a, b, c = req(4, max_tokens=12), req(4, max_tokens=12), req(4, max_tokens=12)
    for r in (a, b, c):
        s.add(r)
    out = step(s)                                  # 3 x 1 block, each sampled its first token
    assert len(out.requests) == 3 and s.pool.num_free == 3
    out = step(s)                                  # each needs a 2nd block: 3 free
    assert out.num_new == [1, 1, 1] and s.pool.num_free == 0
    for _ in range(3):
        out = step(s)
    out = step(s)                                  # a needs a 3rd block: c (newest) goes
    assert out.preempted == [c]
    assert c.status == Status.WAITING and c.num_computed == 0 and c.block_ids == []
    assert s.waiting[0] is c and len(c.output_ids) == 5     # output kept for re-prefill
    preempted = {c.request_id}
    readmitted = 0
    while s.has_unfinished():
        before = {r.request_id: r.num_tokens for r in s.waiting}
        out = step(s)
        preempted |= {r.request_id for r in out.preempted}
        for i, r in enumerate(out.requests):
            if r.request_id in before and before[r.request_id] > len(r.prompt_ids) and out.sampled[i]:
                assert out.starts[i] == 0 and out.num_new[i] == before[r.request_id]  # prompt + output
                readmitted += 1
        assert s.pool.num_used == sum(len(r.block_ids) for r in s.running)
    assert readmitted >= 1
    assert all(len(r.output_ids) == 12 for r in (a, b, c))
    assert s.pool.num_free == 6 and s.pool.num_used == 0
    assert preempted >= {c.request_id}


def test_abort_and_finish_free_blocks_and_unpin():
    store = FakeStore(4)
    s = make(store=store)
    a, b = req(5, adapter="x"), req(5, adapter="y")
    s.add(a), s.add(b)
    step(s)
    assert store.pins == Counter(x=1, y=1) and s.pool.num_used == 4
    s.finish(a)
    assert store.pins["x"] == 0 and s.pool.num_used == 2 and a.status == Status.FINISHED
    w = req(3, adapter="x")
    s.add(w)
    s.finish(w)                                    # aborted while waiting: nothing to free
    assert store.pins["x"] == 0 and not s.waiting
    s.finish(b)
    assert s.pool.num_free == 64 and sum(store.pins.values()) == 0 and not s.has_unfinished()


def test_prompt_too_long():
    s = make(num_blocks=64, block_size=4)
    with pytest.raises(PromptTooLongError, match="300 tokens; this model's context is 256"):
        s.add(req(300))
    s = make(num_blocks=8, block_size=4)            # 32 tokens of KV in all
    with pytest.raises(PromptTooLongError):
        s.add(req(32))
    s.add(req(31))


def test_at_most_max_loras_adapters_per_step():
    store = FakeStore(2)
    s = make(store=store, max_loras=2, max_cpu_loras=4)
    reqs = [req(3, max_tokens=3, adapter=n) for n in ("a", "b", "c", "a", None, "c")]
    for r in reqs:
        s.add(r)
    out = step(s)
    assert {r.adapter for r in out.requests} == {"a", "b", None}
    assert [r for r in reqs if r.status == Status.WAITING] == [reqs[2], reqs[5]]
    seen_c = False
    while s.has_unfinished():
        out = step(s)
        names = {r.adapter for r in out.requests} - {None}
        assert len(names) <= 2
        seen_c |= "c" in names
    assert seen_c and sum(store.pins.values()) == 0


def test_loading_adapter_does_not_block_others():
    store = FakeStore(4, load_steps=3)
    s = make(store=store)
    slow, base = req(3, adapter="slow"), req(3)
    s.add(slow), s.add(base)
    out = step(s)
    assert out.requests == [base] and slow.status == Status.WAITING
    for _ in range(3):
        out = step(s)
    assert slow in out.requests


def test_no_adapter_starves():
    """Adapters a and b get a steady stream of requests; c must still get in within bounded steps."""
    store = FakeStore(2)
    s = make(store=store, max_loras=2, max_cpu_loras=4, lora_wait_steps=3, num_blocks=256)
    c = req(3, max_tokens=2, adapter="c", rid="c")
    for i in range(4):
        s.add(req(3, max_tokens=6, adapter="ab"[i % 2]))
    s.add(c)
    for t in range(40):
        for name in "ab":
            s.add(req(3, max_tokens=6, adapter=name))
        step(s)
        if c.status != Status.WAITING:
            break
    assert c.status != Status.WAITING, "adapter c starved"
    assert t <= 3 + 6 + 2        # lora_wait_steps, then the running a/b requests drain


def test_adapter_that_fails_to_load_fails_its_request_only():
    from server.errors import AdapterError

    class Failing(FakeStore):
        def request_resident(self, name):
            if name == "bad":
                raise AdapterError("adapter 'bad': lora_A shape mismatch")
            return super().request_resident(name)

    store = Failing(4)
    s = make(store=store)
    bad, good = req(3, adapter="bad"), req(3, adapter="ok")
    s.add(bad), s.add(good)
    out = step(s)
    assert [(r, str(e)) for r, e in out.failed] == [(bad, "adapter 'bad': lora_A shape mismatch")]
    assert out.requests == [good] and bad not in s.waiting and store.pins == Counter(ok=1)
    s.finish(bad)
    assert bad.status == Status.FINISHED and s.pool.num_used == 1


def test_base_requests_do_not_take_an_adapter_place():
    store = FakeStore(1)
    s = make(store=store, max_loras=1)
    base, a, b = req(3), req(3, adapter="a"), req(3, adapter="b")
    for r in (base, a, b):
        s.add(r)
    out = step(s)
    assert out.requests == [base, a] and list(s.waiting) == [b]
