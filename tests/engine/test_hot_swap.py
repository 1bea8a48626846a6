"""Adapters loaded, reloaded, evicted and unloaded while the engine serves: every finished
request's greedy tokens equal a fresh run of the same prompt alone with its adapter."""
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.offline import generate
from server.engine.request import FinishReason, Request, RequestOutput, SamplingParams
from server.errors import AdapterError
from server.lora.adapter import CONFIG_FILE, TARGETS, WEIGHTS_FILE, LoraArch, write_random_adapter

MAX_TOKENS = 10
STD = 0.08      # random A and B: every adapter moves the greedy output away from the base
PROMPTS = ("Story 1: the quick brown fox", "Tell me about the sea", "One two three four",
           "The capital of France is", "Seven sailors sing", "A lazy dog sleeps by the",
           "Maps of the northern", "Distant islands and", "Once upon a time", "My favourite colour is")


class Env:
    def __init__(self, engine: Engine, adapters_dir: str, outside: str) -> None:
        self.engine = engine
        self.store = engine.store
        self.adapters_dir = adapters_dir
        self.outside = outside      # folders that only an admin load(name, path) can register
        self.arch = LoraArch.from_layers(engine.model.lora_linears())
        self.prompts = [engine.tokenizer.encode(p) for p in PROMPTS]

    def write(self, folder: str, seed: int, r: int = 8, arch: LoraArch | None = None) -> str:
        return write_random_adapter(os.path.join(self.outside, folder), arch or self.arch, r=r, alpha=16.0,
                                    targets=TARGETS, seed=seed, std=STD)

    def alone(self, ids: list[int], adapter: str | None, max_tokens: int = MAX_TOKENS) -> list[int]:
        """The prompt's greedy tokens in a fresh single-request run."""
        assert not self.engine.has_unfinished()
        out = generate(self.engine, [ids], _params(max_tokens), [adapter])[0]
        assert out.finish_reason == FinishReason.LENGTH and out.error is None
        return out.token_ids


def _params(max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


class Driver:
    """Steps the engine by hand (the engine thread) and collects each request's tokens."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.tokens: dict[str, list[int]] = {}
        self.done: dict[str, RequestOutput] = {}
        self.reqs: list[Request] = []
        self.adapters_seen: set[str] = set()     # adapters that ran in some step

    def add(self, ids: list[int], adapter: str | None, max_tokens: int = MAX_TOKENS) -> Request:
        req = Request(list(ids), _params(max_tokens), adapter=adapter)
        self.engine.add_request(req)
        self.tokens[req.request_id] = []
        self.reqs.append(req)
        return req

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            if not self.engine.has_unfinished():
                time.sleep(0.002)
            running = {r.adapter for r in self.engine.scheduler.running if r.adapter is not None}
            assert len(running) <= self.engine.config.max_loras, running
            self.adapters_seen |= running
            for out in self.engine.step():
                self.tokens[out.request_id] += out.new_token_ids
                if out.finished:
                    self.done[out.request_id] = out

    def until(self, cond, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < end, "the engine made no progress"
            self.step()

    def finish(self) -> None:
        self.until(lambda: not self.engine.has_unfinished())

    def live_with(self, adapter: str) -> bool:
        return any(r.adapter == adapter and r.request_id not in self.done for r in self.reqs)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    root = tmp_path_factory.mktemp("hot_swap")
    adapters = root / "adapters"
    config = EngineConfig(quantization="none", max_loras=2, max_lora_rank=16, adapters_dir=str(adapters),
                          kv_cache_tokens=512, max_num_seqs=8, max_num_batched_tokens=256)
    e = Env(Engine(config), str(adapters), str(root / "outside"))
    for i, name in enumerate(("d0", "d1")):
        write_random_adapter(str(adapters / name), e.arch, r=8, alpha=16.0, targets=TARGETS, seed=100 + i, std=STD)
    yield e
    e.store.close()


@pytest.mark.slow
def test_hot_swap_under_load(env):
    eng, store, p = env.engine, env.store, env.prompts
    evictions = store.counters()["evictions"]
    paths = {n: env.write(n, seed=200 + i) for i, n in enumerate(("n0", "n1", "n2"))}
    drv = Driver(eng)
    admin = ThreadPoolExecutor(1, thread_name_prefix="admin")
    drv.add(p[0], "d0", max_tokens=12)
    drv.add(p[1], "d1", max_tokens=12)
    drv.add(p[2], None, max_tokens=12)
    drv.until(lambda: all(drv.tokens[r.request_id] for r in drv.reqs))   # d0, d1 cold-load from disk
    assert not drv.done, "wave 1 should be streaming"
    loading = admin.submit(store.load, "n0", paths["n0"])   # read + validated on the admin thread
    drv.until(loading.done)                                  # ... while the engine keeps stepping
    assert loading.result().name == "n0"
    drv.add(p[3], "n0")
    drv.add(p[4], "d0")
    drv.step(2)
    assert eng.has_unfinished()
    store.load("n1", paths["n1"])
    drv.add(p[5], "n1")
    drv.step(2)
    assert eng.has_unfinished()
    store.load("n2", paths["n2"])
    drv.add(p[6], "n2")
    drv.add(p[7], None)
    drv.until(lambda: not drv.live_with("d1"))
    admin.submit(store.unload, "d1").result()               # d1 is idle: nothing of it is in flight
    assert not store.exists("d1") and "d1" not in [a.name for a in store.list()]
    with pytest.raises(AdapterError, match="unknown adapter 'd1'"):
        drv.add(p[8], "d1")
    drv.add(p[8], "n0")
    drv.add(p[9], "d0")
    drv.finish()
    admin.shutdown()
    # 5 adapters went through 2 slots; one slot may have been freed by the unload, not evicted.
    assert drv.adapters_seen == {"d0", "d1", "n0", "n1", "n2"}
    assert store.counters()["evictions"] - evictions >= 2, "5 adapters through 2 slots must evict"
    assert eng.pool.num_used == 0
    store.load("d1", os.path.join(env.adapters_dir, "d1"))   # same files again, for its alone run
    differ = set()
    for req in drv.reqs:
        out = drv.done[req.request_id]
        assert out.finish_reason == FinishReason.LENGTH and out.error is None, out.error
        n = req.params.max_tokens
        ref = env.alone(req.prompt_ids, req.adapter, n)
        assert drv.tokens[req.request_id] == ref, f"{req.adapter}: batched run differs from its alone run"
        if req.adapter not in (None, *differ) and env.alone(req.prompt_ids, None, n) != ref:
            differ.add(req.adapter)
    assert len(differ) >= 2, f"only {differ} change the output: LoRA would go unnoticed"


def test_reload_under_the_same_name(env):
    eng, store, ids = env.engine, env.store, env.prompts[3]
    w1, w2 = env.write("x_w1", seed=301), env.write("x_w2", seed=302)
    store.load("x_ref1", w1)
    store.load("x_ref2", w2)
    ref1, ref2 = env.alone(ids, "x_ref1"), env.alone(ids, "x_ref2")
    assert ref1 != ref2
    store.load("x", w1)
    assert env.alone(ids, "x") == ref1
    old = store.identity("x")
    assert store.load("x", w2).identity != old
    assert env.alone(ids, "x") == ref2                       # the next request sees W2 only

    # A W1 request still in flight when the reload happens: new requests never see W1.
    store.load("y", w1)
    drv = Driver(eng)
    other = drv.add(env.prompts[0], "d0", max_tokens=12)   # pinned in the other slot, the LRU one
    drv.until(lambda: drv.tokens[other.request_id])
    first = drv.add(ids, "y", max_tokens=12)
    drv.step(3)
    before = list(drv.tokens[first.request_id])
    assert before and first.request_id not in drv.done
    assert before == ref1[:len(before)]                     # W1 so far
    store.load("y", w2)
    second = drv.add(ids, "y")
    drv.step(2)
    third = drv.add(ids, "y")
    drv.finish()
    assert drv.tokens[second.request_id] == ref2, "a request added after the reload ran on the old weights"
    assert drv.tokens[third.request_id] == ref2
    assert len(drv.tokens[first.request_id]) == 12 and drv.done[first.request_id].error is None
    assert drv.tokens[other.request_id] == env.alone(env.prompts[0], "d0", 12)
    assert env.alone(ids, "y") == ref2 and eng.pool.num_used == 0


def _bad_cases(env) -> dict[str, tuple[str, str]]:
    """case -> (folder, a phrase of the expected error)."""
    cases = {"missing": (os.path.join(env.outside, "no_such_adapter"), "not a folder")}
    dora = env.write("bad_dora", seed=401)
    cfg_path = os.path.join(dora, CONFIG_FILE)
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["use_dora"] = True
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    cases["dora"] = (dora, "use_dora is not supported")
    cases["rank"] = (env.write("bad_rank", seed=402, r=32), "LoRA rank 32 is greater than max_lora_rank 16")
    binonly = env.write("bad_bin", seed=403)
    os.rename(os.path.join(binonly, WEIGHTS_FILE), os.path.join(binonly, "adapter_model.bin"))
    cases["bin"] = (binonly, "found adapter_model.bin, which is a pickle and is never read")
    wide = LoraArch({m: (d_in + 8, d_out) for m, (d_in, d_out) in env.arch.modules.items()})
    cases["shapes"] = (env.write("bad_shapes", seed=404, arch=wide), "do not fit the base")
    return cases


def test_bad_adapters_at_run_time(env):
    eng, store, p = env.engine, env.store, env.prompts
    ref_base, ref_d0 = env.alone(p[1], None), env.alone(p[2], "d0")
    d0_identity = store.identity("d0")
    for case, (folder, problem) in _bad_cases(env).items():
        for name in (f"bad_{case}", "d0"):               # a new name, and a reload of a served one
            with pytest.raises(AdapterError) as err:
                store.load(name, folder)
            msg = str(err.value)
            assert os.path.realpath(folder) in msg or folder in msg, msg
            assert problem in msg, msg
        assert not store.exists(f"bad_{case}")
    assert store.identity("d0") == d0_identity                # a failed reload keeps the old weights
    # A bad folder found in adapters_dir fails its own request only (read on the load worker).
    write_random_adapter(os.path.join(env.adapters_dir, "lazy_bad"), env.arch, r=32, alpha=16.0,
                         targets=TARGETS, seed=405, std=STD)
    drv = Driver(eng)
    bad = drv.add(p[0], "lazy_bad")
    base, ad = drv.add(p[1], None), drv.add(p[2], "d0")
    drv.finish()
    assert drv.done[bad.request_id].finish_reason == FinishReason.ABORT
    assert "greater than max_lora_rank" in drv.done[bad.request_id].error
    assert drv.tokens[base.request_id] == ref_base and drv.tokens[ad.request_id] == ref_d0
    assert env.alone(p[1], None) == ref_base and env.alone(p[2], "d0") == ref_d0
    assert ref_d0 != env.alone(p[2], None) and eng.pool.num_used == 0


def test_reload_under_steady_traffic_frees_the_old_slot(env):
    """Requests for a reloaded name keep arriving; once its new weights are resident the old slot
    must go back to the pool, or another adapter would wait for as long as that traffic lasts."""
    eng, store, ids = env.engine, env.store, env.prompts[6]
    w1, w2 = env.write("s_w1", seed=501), env.write("s_w2", seed=502)
    store.load("s_ref2", w2)
    store.load("t", env.write("t", seed=503))
    ref2, ref_t = env.alone(ids, "s_ref2", 4), env.alone(env.prompts[7], "t", 4)
    store.load("s", w1)
    assert env.alone(ids, "s", 4) != ref2
    drv = Driver(eng)
    first = drv.add(ids, "s", max_tokens=12)
    drv.until(lambda: drv.tokens[first.request_id])
    store.load("s", w2)
    fed, other = [], None
    for i in range(40):
        if i % 2 == 0:
            fed.append(drv.add(ids, "s", max_tokens=4))      # "s" is never idle from here on
        if i == 4:
            other = drv.add(env.prompts[7], "t", max_tokens=4)
        drv.step()
        if other is not None and other.request_id in drv.done:
            break
    assert other is not None and other.request_id in drv.done, "adapter t waited behind the old slot of s"
    drv.finish()
    assert drv.tokens[other.request_id] == ref_t
    assert all(drv.tokens[r.request_id] == ref2 for r in fed)
    assert eng.pool.num_used == 0
