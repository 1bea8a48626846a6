"""Fault injection in the engine: an exception forced into one request's own work, in a batch
of 8, fails that request alone; the other 7 finish with the tokens of a clean run. A failure
no request caused (out of memory) stops the engine instead, and AsyncEngine reports it."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch

from server.config import EngineConfig
from server.engine.async_engine import AsyncEngine
from server.engine.engine import Engine
from server.engine.isolation import EngineFatalError, batched, is_device_failure
from server.engine.request import (SEED_MAX, SEED_MIN, ErrorKind, FinishReason, Request, SamplingParams,
                                   SamplingParamsError, choice_seed)
from server.lora.adapter import TARGETS, LoraArch, write_random_adapter
from server.structured.grammar import GrammarCompiler, Matcher, new_matcher
from server.structured.spec import ConstraintSpec

ADAPTERS = ("iso-a", "iso-b", "iso-c")
CULPRIT = 3            # the request each fault is forced into
PARAMS = SamplingParams(max_tokens=10, temperature=0.0)
SEEDED = SamplingParams(max_tokens=10, temperature=0.8, seed=7)
SCHEMA = '{"type":"object","properties":{"name":{"type":"string"}},"required":["name"]}'


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    eng = Engine(EngineConfig(quantization="none", kv_cache_tokens=4096, adapters_dir=str(root), max_loras=4))
    arch = LoraArch.from_layers(eng.model.lora_linears())
    for i, name in enumerate(ADAPTERS):
        write_random_adapter(str(root / name), arch, r=8, alpha=16.0, targets=TARGETS, seed=40 + i, std=0.1)
    compiler = GrammarCompiler(eng.tokenizer.hf)
    grammar = compiler.compile(ConstraintSpec("json", SCHEMA))
    yield eng, grammar
    compiler.close()


def batch(eng: Engine, grammar, culprit_matcher=Matcher) -> list[Request]:
    """8 requests: base and three adapters, two of them JSON-constrained (one the culprit, whose
    matcher is of type culprit_matcher), one seeded random."""
    out = []
    for i in range(8):
        ids = eng.tokenizer.encode_chat([{"role": "user", "content": f"Tell me fact number {i} about the sea."}])
        constraint = None
        if i in (2, CULPRIT):
            m = new_matcher(grammar)
            constraint = (culprit_matcher if i == CULPRIT else Matcher)(m.llmatcher, m.vocab_size, m.eos_token_id)
        params = SEEDED if i == 5 else PARAMS
        out.append(Request(ids, params, adapter=(None, *ADAPTERS)[i % 4], constraint=constraint))
    return out


def run(eng: Engine, reqs: list[Request], before_steps=None) -> dict[int, tuple[list[int], FinishReason, str]]:
    for r in reqs:
        eng.add_request(r)
    if before_steps:
        before_steps()
    index = {r.request_id: i for i, r in enumerate(reqs)}
    done: dict[int, tuple] = {}
    tokens: dict[int, list[int]] = {i: [] for i in range(len(reqs))}
    for _ in range(500):
        for out in eng.step():
            i = index[out.request_id]
            tokens[i] += out.new_token_ids
            if out.finished:
                done[i] = (tokens[i], out.finish_reason, out.error, out.error_kind)
        if len(done) == len(reqs):
            break
    assert len(done) == len(reqs), "requests did not finish"
    assert not eng.has_unfinished() and eng.pool.num_used == 0
    return done


@pytest.fixture(scope="module")
def clean(env):
    eng, grammar = env
    return run(eng, batch(eng, grammar))


def check_isolated(clean, faulty, kind=ErrorKind.INTERNAL, where: str | None = None):
    tokens, reason, error, error_kind = faulty[CULPRIT]
    assert reason == FinishReason.ABORT and error and error_kind == kind, faulty[CULPRIT]
    if where:
        assert where in error, error
    for i in range(8):
        if i != CULPRIT:
            assert faulty[i] == clean[i], f"request {i} changed: {faulty[i]} vs {clean[i]}"
            assert faulty[i][2] is None


def test_clean_run_is_complete(clean):
    assert all(e is None and len(t) > 0 for t, _, e, _ in clean.values())
    assert clean[2][1] == FinishReason.STOP or len(clean[2][0]) == PARAMS.max_tokens


def test_sampling_fault_fails_one_request(env, clean, monkeypatch):
    eng, grammar = env
    reqs = batch(eng, grammar)
    real = eng.sampler.sample

    def sample(logits, params, keys, history=None):
        if reqs[CULPRIT].request_id in keys:
            raise ValueError("Overflow when unpacking long long")
        return real(logits, params, keys, history)
    monkeypatch.setattr(eng.sampler, "sample", sample)
    check_isolated(clean, run(eng, reqs), where="sampling")


class FailingMask(Matcher):
    @property
    def llmatcher(self):
        raise RuntimeError("injected mask failure")


class FailingAdvance(Matcher):
    def consume(self, token_id: int) -> None:
        if self.num_consumed >= 2:
            raise RuntimeError("injected grammar failure")
        super().consume(token_id)


@pytest.mark.parametrize("matcher_type, where", [(FailingMask, "grammar mask"), (FailingAdvance, "postprocess")])
@pytest.mark.parametrize("overlap", [True, False])
def test_grammar_fault_fails_one_request(env, clean, matcher_type, where, overlap):
    eng, grammar = env
    eng.constraints.overlap = overlap
    try:
        check_isolated(clean, run(eng, batch(eng, grammar, matcher_type)), where=where)
    finally:
        eng.constraints.overlap = True


def test_detokenizing_fault_fails_one_request(env, clean):
    eng, grammar = env
    reqs = batch(eng, grammar)

    def break_detok():
        def push(ids):
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        eng._live[reqs[CULPRIT].request_id].detok.push = push
    check_isolated(clean, run(eng, reqs, break_detok), where="postprocess")


def test_adapter_load_fault_fails_one_request(env, clean, monkeypatch):
    """Any exception while reading an adapter from disk (here an OSError for iso-bad, which only
    the culprit uses) fails the requests for it and stalls nothing; the next read succeeds."""
    eng, grammar = env
    import server.lora.store as store_module
    real = store_module.read_adapter
    arch = LoraArch.from_layers(eng.model.lora_linears())
    write_random_adapter(eng.store._reg.root + "/iso-bad", arch, r=8, alpha=16.0, targets=TARGETS, seed=49, std=0.1)

    def read(name, *args):
        if name == "iso-bad":
            raise OSError("injected: the disk went away")
        return real(name, *args)
    monkeypatch.setattr(store_module, "read_adapter", read)
    reqs = batch(eng, grammar)
    reqs[CULPRIT].adapter = "iso-bad"
    faulty = run(eng, reqs)
    check_isolated(clean, faulty, ErrorKind.ADAPTER, "could not be loaded")
    assert "injected" not in faulty[CULPRIT][2]         # the client sees the adapter, not our internals
    monkeypatch.setattr(store_module, "read_adapter", real)
    reqs = batch(eng, grammar)
    reqs[CULPRIT].adapter = "iso-bad"
    again = run(eng, reqs)                              # the next request for it loads it fine
    assert again[CULPRIT][2] is None and len(again[CULPRIT][0]) > 0


def test_forward_fault_is_found_by_splitting_the_batch(env, clean, monkeypatch):
    eng, grammar = env
    reqs = batch(eng, grammar)
    real = eng.runner.run
    calls = []

    def forward(sched):
        calls.append(len(sched.requests))
        if reqs[CULPRIT] in sched.requests:
            raise IndexError("injected: index out of range in the forward")
        return real(sched)
    monkeypatch.setattr(eng.runner, "run", forward)
    check_isolated(clean, run(eng, reqs), where="forward")
    assert calls[:7] == [8, 4, 2, 2, 1, 1, 4]             # halves down to the culprit, once
    assert max(calls[7:]) <= 7                            # then the batch runs without it


def test_device_failure_stops_the_engine(env, monkeypatch):
    eng, grammar = env
    reqs = batch(eng, grammar)[:2]
    for r in reqs:
        eng.add_request(r)

    def oom(sched):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
    monkeypatch.setattr(eng.runner, "run", oom)
    with pytest.raises(EngineFatalError, match="out of memory"):
        eng.step()
    monkeypatch.undo()
    for r in reqs:
        eng.abort(r.request_id)
    assert eng.pool.num_used == 0


def test_a_fatal_step_ends_the_async_loop_with_errors(tmp_path):
    eng = Engine(EngineConfig(quantization="none", kv_cache_tokens=1024, adapters_dir=str(tmp_path)))
    ae = AsyncEngine(eng)
    ids = eng.tokenizer.encode("Once upon a time")

    async def main():
        await ae.run_on_loop(lambda: setattr(eng.runner, "run", _raise_memory))
        return [o async for o in ae.generate(Request(list(ids), PARAMS))]

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].error_kind == ErrorKind.INTERNAL and "engine stopped" in outs[-1].error
    ae._thread.join(5)
    assert not ae.is_alive and "EngineFatalError" in ae.death and "MemoryError" in ae.death
    ae.shutdown()


def _raise_memory(sched):
    raise MemoryError("injected")


def test_device_failures_are_told_from_request_failures():
    assert is_device_failure(torch.OutOfMemoryError("x")) and is_device_failure(MemoryError())
    assert is_device_failure(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_device_failure(ValueError("Overflow when unpacking long long"))
    assert not is_device_failure(RuntimeError("shape mismatch"))


def test_batched_finds_every_failing_item():
    calls = []

    def fn(items):
        calls.append(list(items))
        if any(x in (2, 5) for x in items):
            raise ValueError(f"bad item in {items}")
        return [x * 10 for x in items]

    results, failures = batched(fn, list(range(8)), "test")
    assert results == [0, 10, None, 30, 40, None, 60, 70] and set(failures) == {2, 5}
    calls.clear()
    assert batched(fn, [0, 1, 3], "test") == ([0, 10, 30], {}) and calls == [[0, 1, 3]]   # one call when all is well


def test_a_request_past_its_deadline_ends_alone(env, clean):
    eng, grammar = env
    reqs = batch(eng, grammar)
    reqs[CULPRIT].deadline = time.monotonic() + 0.05     # expires after a step or two
    check_isolated(clean, run(eng, reqs), ErrorKind.TIMEOUT, "deadline")


def test_seeds_out_of_range_are_refused_at_the_boundary(env):
    eng, _ = env
    with pytest.raises(SamplingParamsError, match="seed"):
        SamplingParams(seed=2**63)
    with pytest.raises(SamplingParamsError, match="seed"):
        choice_seed(2**80, 0)
    assert choice_seed(SEED_MAX, 1) == SEED_MIN and choice_seed(-5, 2) == -3
    eng.add_request(Request([1, 2, 3], SamplingParams(max_tokens=1, seed=SEED_MIN, temperature=1.0)))
    while eng.has_unfinished():
        eng.step()
