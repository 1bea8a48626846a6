"""Prefix caching on the default model (NF4): the cache changes no output, keys blocks by
adapter weights and salt, and keeps the pool's accounting exact under pressure."""
import json
import os
import time

import pytest

from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import FinishReason, Request, SamplingParams, Status
from server.lora.adapter import TARGETS, LoraArch, write_random_adapter
from server.structured.grammar import GrammarCompiler, new_matcher
from server.structured.spec import ConstraintSpec

SYSTEM = ("You are the support assistant of a lighthouse company. Answer briefly, politely and "
          "truthfully; when you do not know, say so. Our lighthouses stand on the northern coast, "
          "each with a keeper, a lamp, a fog horn and a logbook that records every ship. ")
ADAPTERS = ("ad0", "ad1", "ad2")


def _config(adapters: str, caching: bool, blocks: int = 20) -> EngineConfig:
    # 20 blocks x 16 tokens: each request fits alone, the mixed workload together does not
    return EngineConfig(block_size=16, num_kv_blocks=blocks, max_num_seqs=16, max_num_batched_tokens=512,
                        adapters_dir=adapters, max_loras=4, max_cpu_loras=8, lora_wait_steps=2,
                        enable_prefix_caching=caching)


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def engines(adapters_dir):
    on = Engine(_config(adapters_dir, True))
    arch = LoraArch.from_layers(on.model.lora_linears())
    for i, name in enumerate(ADAPTERS):
        write_random_adapter(os.path.join(adapters_dir, name), arch, r=8, alpha=16.0, targets=TARGETS,
                             seed=i, std=0.1)
    return on, Engine(_config(adapters_dir, False))


@pytest.fixture
def on(engines):
    eng = engines[0]
    yield eng
    assert_pool_consistent(eng)
    assert eng.pool.num_used == 0 and eng.pool.num_free == eng.pool.num_blocks, "blocks leaked"


@pytest.fixture(scope="module")
def big_engine(engines, adapters_dir):
    return Engine(_config(adapters_dir, True, blocks=160))   # room for 1,000-token prompts


@pytest.fixture
def big(big_engine):
    yield big_engine
    assert_pool_consistent(big_engine)
    assert big_engine.pool.num_used == 0 and big_engine.pool.num_free == big_engine.pool.num_blocks


def assert_pool_consistent(eng: Engine) -> None:
    """Every held block's refcount equals its holders; a block held twice is a cached one."""
    holders: dict[int, int] = {}
    for req in eng.scheduler.running:
        for b in req.block_ids:
            holders[b] = holders.get(b, 0) + 1
    for b, n in holders.items():
        assert eng.pool.refcount(b) == n, f"block {b}: refcount {eng.pool.refcount(b)}, held by {n}"
        if n > 1:
            assert b in eng.pool._hash_of, f"block {b} shared but not cached"
    assert eng.pool.num_used == len(holders)


def run(eng: Engine, reqs: list[Request], check_each_step: bool = False) -> dict[str, dict]:
    """Run to completion -> request id -> {tokens, text, cached, finish}."""
    out = {r.request_id: {"tokens": [], "text": "", "cached": None, "finish": None} for r in reqs}
    for r in reqs:
        eng.add_request(r)
    while eng.has_unfinished():
        outputs = eng.step()
        if eng.last_step_tokens == 0:
            time.sleep(0.005)     # an adapter loads on a worker thread: let it have the GIL
        for o in outputs:
            d = out[o.request_id]
            d["tokens"] += o.new_token_ids
            d["text"] += o.new_text
            d["cached"] = o.cached_tokens
            if o.finished:
                assert o.error is None, o.error
                d["finish"] = o.finish_reason
        if check_each_step:
            assert_pool_consistent(eng)
    return out


def greedy(eng: Engine, text: str, adapter: str | None = None, max_tokens: int = 8, salt: str = "",
           constraint=None) -> Request:
    return Request(eng.tokenizer.encode(text), SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                              ignore_eos=constraint is None),
                   adapter=adapter, constraint=constraint, cache_salt=salt)


def workload(eng: Engine, compiled) -> list[Request]:
    """Base and 3 adapters; a shared system prompt and distinct ones; two choices of one
    prompt; a JSON-schema request."""
    reqs = []
    for a in (None, *ADAPTERS):
        for q in ("Where is the lamp kept?", "Who writes the logbook?"):
            reqs.append(greedy(eng, SYSTEM + q, a))
    reqs.append(greedy(eng, "Seven sailors sing songs about distant islands", "ad1"))
    reqs.append(greedy(eng, "Maps of the northern sea, drawn by hand", None))
    twice = eng.tokenizer.encode(SYSTEM + "How tall is the tower?")
    reqs += [Request(twice, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), adapter="ad2")
             for _ in range(2)]       # n = 2: the choices share one prompt list
    reqs.append(greedy(eng, SYSTEM + "Describe the lighthouse as JSON.", "ad0", max_tokens=40,
                       constraint=new_matcher(compiled)))
    return reqs


@pytest.mark.slow
def test_outputs_with_the_cache_equal_outputs_without(engines, on):
    off = engines[1]
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10}},
              "required": ["name"], "additionalProperties": False}
    compiled = GrammarCompiler(on.tokenizer.hf).compile(ConstraintSpec("json", json.dumps(schema)))
    base = run(off, workload(off, compiled))
    preempted = on.scheduler.num_preemptions
    first = run(on, workload(on, compiled), check_each_step=True)
    second = run(on, workload(on, compiled), check_each_step=True)     # now mostly from the cache
    assert on.scheduler.num_preemptions > preempted, "the small pool should force preemption"
    for want, got1, got2 in zip(base.values(), first.values(), second.values()):
        assert got1["tokens"] == want["tokens"] and got2["tokens"] == want["tokens"]
        assert got1["text"] == want["text"] == got2["text"]
        assert got1["finish"] == want["finish"] == got2["finish"]
        assert want["cached"] == 0                     # the cache off finds nothing
    cached = [d["cached"] for d in second.values()]
    assert sum(c > 0 for c in cached) >= 9, cached      # every system-prompt request hit
    assert all(c % 16 == 0 for c in cached)
    json.loads(list(second.values())[-1]["text"])
    twins = list(first.values())[-3:-1]
    assert max(t["cached"] for t in twins) > 0, "the second choice reuses the first one's prompt blocks"


def test_a_whole_cached_prompt_still_computes_its_last_token(on):
    text = SYSTEM[:160]
    a = run(on, [greedy(on, text)])
    ids = on.tokenizer.encode(text)
    b = run(on, [greedy(on, text)])
    (ra,), (rb,) = a.values(), b.values()
    assert rb["tokens"] == ra["tokens"]
    assert rb["cached"] == (len(ids) - 1) // 16 * 16 and rb["cached"] < len(ids)


def test_adapters_and_base_never_share_blocks(big):
    on = big
    long = SYSTEM * 17                                 # ~1,000 tokens
    ids = on.tokenizer.encode(long)
    assert 900 < len(ids) < 1100
    on.reset_prefix_cache()
    hits = dict(on.scheduler.cache_hits)
    outs = {}
    for a in (None, "ad0", "ad1"):
        (o,) = run(on, [greedy(on, long, a, max_tokens=4)]).values()
        assert o["cached"] == 0, f"{a or 'base'} hit blocks of another namespace"
        outs[a] = o["tokens"]
    assert len({tuple(t) for t in outs.values()}) == 3, "each adapter has its own output"
    assert all(on.scheduler.cache_hits.get(a, 0) == hits.get(a, 0) for a in ("", "ad0", "ad1"))
    (again,) = run(on, [greedy(on, long, "ad1", max_tokens=4)]).values()
    assert again["cached"] >= len(ids) - 16 and again["tokens"] == outs["ad1"]
    assert on.scheduler.cache_hits["ad1"] - hits.get("ad1", 0) == again["cached"]


def test_salts_separate_and_equal_salts_share(on):
    text = SYSTEM + "Salted question."
    for salt in ("tenant-a", "tenant-b"):
        (o,) = run(on, [greedy(on, text, salt=salt)]).values()
        assert o["cached"] == 0
    (o,) = run(on, [greedy(on, text, salt="tenant-a")]).values()
    assert o["cached"] > 0


def _reload_case(on: Engine, reload) -> None:
    text = SYSTEM + "Reloaded question."
    (old,) = run(on, [greedy(on, text, "swap")]).values()
    (hit,) = run(on, [greedy(on, text, "swap")]).values()
    assert hit["cached"] > 0 and hit["tokens"] == old["tokens"]
    reload()
    (new,) = run(on, [greedy(on, text, "swap")]).values()
    assert new["cached"] == 0, "blocks of the old weights were reused"
    on.reset_prefix_cache()
    (fresh,) = run(on, [greedy(on, text, "swap")]).values()
    assert new["tokens"] == fresh["tokens"] != old["tokens"]


def test_reload_under_the_same_name_never_serves_old_blocks(on, adapters_dir, tmp_path):
    arch = LoraArch.from_layers(on.model.lora_linears())
    first = write_random_adapter(str(tmp_path / "w1"), arch, r=8, alpha=16.0, targets=TARGETS, seed=21, std=0.1)
    second = write_random_adapter(str(tmp_path / "w2"), arch, r=8, alpha=16.0, targets=TARGETS, seed=22, std=0.1)
    on.store.load("swap", first)
    _reload_case(on, lambda: on.store.load("swap", second))
    # back to the first weights: a new install, so the blocks computed before stay unreachable
    on.store.load("swap", first)
    (back,) = run(on, [greedy(on, SYSTEM + "Reloaded question.", "swap")]).values()
    assert back["cached"] == 0


def test_unload_then_load_other_weights_never_serves_old_blocks(on, adapters_dir, tmp_path):
    arch = LoraArch.from_layers(on.model.lora_linears())
    first = write_random_adapter(str(tmp_path / "u1"), arch, r=8, alpha=16.0, targets=TARGETS, seed=31, std=0.1)
    second = write_random_adapter(str(tmp_path / "u2"), arch, r=8, alpha=16.0, targets=TARGETS, seed=32, std=0.1)
    on.store.load("swap", first)

    def unload_load():
        on.store.unload("swap")
        on.store.poll()
        on.store.load("swap", second)
    _reload_case(on, unload_load)


def test_eviction_under_pressure_spares_held_blocks(adapters_dir):
    eng = Engine(_config(adapters_dir, True, blocks=12))
    texts = [f"Story {i}: " + SYSTEM[: 60 + 25 * i] for i in range(8)]
    want = {t: run(eng, [greedy(eng, t)]) for t in texts}         # fills the cache, one at a time
    assert eng.pool.num_cached > 0
    reqs = [greedy(eng, t, max_tokens=8) for t in texts for _ in range(2)]
    got = run(eng, reqs, check_each_step=True)
    assert eng.pool.evictions > 0, "the pool should have evicted cached blocks"
    for i, r in enumerate(reqs):
        (w,) = want[texts[i // 2]].values()
        assert got[r.request_id]["tokens"] == w["tokens"], f"prompt {i // 2} changed under eviction"
    assert eng.pool.num_used == 0 and eng.pool.num_free == eng.pool.num_blocks
    assert all(r.status == Status.FINISHED for r in reqs)


def test_reset_and_the_off_switch(engines, on):
    off = engines[1]
    text = SYSTEM + "Reset question."
    run(on, [greedy(on, text)])
    assert on.pool.num_cached > 0
    dropped = on.reset_prefix_cache()
    assert dropped > 0 and on.pool.num_cached == 0
    (o,) = run(on, [greedy(on, text)]).values()
    assert o["cached"] == 0 and o["finish"] == FinishReason.LENGTH
    run(off, [greedy(off, text)])
    (o,) = run(off, [greedy(off, text)]).values()
    assert o["cached"] == 0 and off.pool.num_cached == 0
