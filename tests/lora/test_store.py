"""server/lora/store.py: registry, disk -> host -> device tiers, LRU, pins, unload, reload identity."""
import os
import threading
import time

import pytest
import torch

from server.config import EngineConfig
from server.errors import AdapterError
from server.lora import store as store_mod
from server.lora.adapter import write_random_adapter
from server.lora.slots import allocate_slots
from server.lora.store import AdapterStore
from tests.lora.helpers import lora_layers, tiny_arch

TARGETS = ("q_proj", "v_proj", "down_proj")


def _make(tmp_path, n=5, max_loras=2, max_cpu_loras=3):
    root = tmp_path / "adapters"
    for i in range(n):
        write_random_adapter(str(root / f"a{i}"), tiny_arch(), r=2 + i, alpha=8, targets=TARGETS, seed=i)
    cfg = EngineConfig(adapters_dir=str(root), max_loras=max_loras, max_cpu_loras=max_cpu_loras, max_lora_rank=8)
    layers = lora_layers(tiny_arch())
    allocate_slots(layers, cfg.max_loras, cfg.max_lora_rank, "cpu", torch.float32)
    return AdapterStore(cfg, layers, "cpu", torch.float32), layers, root


def _resident(store, name, timeout=20.0):
    end = time.monotonic() + timeout
    while not store.request_resident(name):
        assert time.monotonic() < end, f"{name} never became resident"
        store.poll()
        time.sleep(0.005)


def _slot_holds(store, layers, name, path):
    from server.lora.adapter import read_adapter
    ad = read_adapter(name, path, store.arch, 8)
    slot, rank = store.slot_and_rank(name)
    assert rank == ad.rank
    for module, layer in layers.items():
        if module in ad.weights:
            a, b = ad.weights[module]
            assert torch.equal(layer.slots.a[slot, :a.shape[0]], a)
            assert torch.equal(layer.slots.b[slot, :, :a.shape[0]], b)
        else:
            assert torch.all(layer.slots.a[slot] == 0)
    return slot


def test_cold_load_runs_off_the_engine_thread(tmp_path, monkeypatch):
    store, layers, root = _make(tmp_path)
    threads = []
    real = store_mod.read_adapter

    def spy(*args):
        threads.append(threading.current_thread().name)
        return real(*args)
    monkeypatch.setattr(store_mod, "read_adapter", spy)
    ptrs = {n: (l.slots.a.data_ptr(), l.slots.b.data_ptr()) for n, l in layers.items()}
    assert store.exists("a0") and not store.exists("nope") and store.num_slots == 2
    assert store.request_resident("a0") is False
    _resident(store, "a0")
    assert threads and all(t.startswith("lora-load") for t in threads)
    _slot_holds(store, layers, "a0", str(root / "a0"))
    assert ptrs == {n: (l.slots.a.data_ptr(), l.slots.b.data_ptr()) for n, l in layers.items()}
    info = {i.name: i for i in store.list()}
    assert info["a0"].tier == "device" and info["a0"].rank == 2 and info["a0"].targets == TARGETS
    assert info["a1"].tier == "disk" and info["a1"].rank is None
    assert store.identity("a0") == info["a0"].identity
    assert store.identity("a1").startswith("a1@")   # hashed from disk without loading
    c = store.counters()
    assert c["loads"] == 1 and c["device_misses"] == 1 and c["host_misses"] == 1 and c["device_hits"] >= 1
    store.close()


def test_device_lru_and_pins(tmp_path):
    store, layers, root = _make(tmp_path)
    _resident(store, "a0")
    _resident(store, "a1")
    time.sleep(0.01)
    assert store.request_resident("a0")        # a0 is now more recent than a1
    _resident(store, "a2")                      # evicts the least recently used: a1
    assert not store.request_resident("a1")
    assert store.request_resident("a0") and store.request_resident("a2")
    store.poll()                                # a1 takes the LRU slot (a0's or a2's)
    store.pin("a1")
    # now pin whichever of a0/a2 still holds a slot; every slot is pinned
    holder = "a0" if store.request_resident("a0") else "a2"
    store.pin(holder)
    for _ in range(50):
        assert store.request_resident("a3") is False
        store.poll()
        time.sleep(0.002)
    store.unpin(holder)
    _resident(store, "a3")
    assert store.request_resident("a1")         # pinned: never evicted
    _slot_holds(store, layers, "a3", str(root / "a3"))
    served = {i.name: i.requests_served for i in store.list()}
    assert served["a1"] == 1 and served[holder] == 1
    store.unpin("a1")
    store.close()


def test_host_cache_is_lru_bounded(tmp_path):
    store, _, _ = _make(tmp_path, max_loras=2, max_cpu_loras=2)
    for n in ("a0", "a1", "a2", "a3"):
        _resident(store, n)
    tiers = {i.name: i.tier for i in store.list()}
    assert sum(t != "disk" for t in tiers.values()) <= 3
    assert tiers["a3"] == "device" and tiers["a4"] == "disk"
    assert tiers["a0"] == "disk"                # evicted from both tiers
    _resident(store, "a0")                      # and read back from disk
    store.close()


def test_reload_with_new_weights_never_serves_old(tmp_path):
    store, layers, root = _make(tmp_path)
    _resident(store, "a0")
    old_id = store.identity("a0")
    store.pin("a0")                             # a request is running on the old weights
    old_slot, _ = store.slot_and_rank("a0")
    new = write_random_adapter(str(tmp_path / "elsewhere" / "v2"), tiny_arch(), r=4, alpha=16,
                               targets=("k_proj",), seed=99)
    info = store.load("a0", new)
    assert info.identity != old_id and store.identity("a0") == info.identity
    assert store.request_resident("a0") is False          # the old slot is not valid for new requests
    assert store.slot_and_rank("a0")[0] == old_slot       # ... but the running request keeps it
    _resident(store, "a0")
    new_slot = _slot_holds(store, layers, "a0", new)
    assert new_slot != old_slot
    store.unpin("a0")                           # the old slot is freed for others
    _resident(store, "a1")
    assert store.slot_and_rank("a1")[0] == old_slot
    same = store.load("a0", new)                # same bytes: same identity, still resident
    assert same.identity == info.identity and store.request_resident("a0")
    store.close()


def test_unload_lets_running_requests_finish(tmp_path):
    store, _, root = _make(tmp_path)
    _resident(store, "a0")
    store.pin("a0")
    store.unload("a0")
    assert not store.exists("a0") and "a0" not in [i.name for i in store.list()]
    with pytest.raises(AdapterError, match="unknown adapter 'a0'"):
        store.request_resident("a0")
    slot, _ = store.slot_and_rank("a0")       # the running request still has its slot
    store.unpin("a0")
    with pytest.raises(AdapterError):
        store.slot_and_rank("a0")
    assert not store.exists("a0")               # not rediscovered from adapters_dir ...
    assert store.load("a0", str(root / "a0")).name == "a0"   # ... until loaded again
    assert store.exists("a0")
    store.close()


def test_names_paths_and_load_errors(tmp_path):
    store, _, root = _make(tmp_path, n=1)
    for bad in ("", ".", "..", "a/b", "x" * 129):
        assert not store.exists(bad)
        with pytest.raises(AdapterError, match="invalid adapter name"):
            store.load(bad, str(root / "a0"))
    outside = tmp_path / "outside"
    write_random_adapter(str(outside), tiny_arch(), 2, 8, ("q_proj",), seed=5)
    os.symlink(outside, root / "escape")
    assert not store.exists("escape")           # a symlink out of the adapters root is refused
    assert store.load("ext", str(outside)).rank == 2   # explicit admin path: anywhere
    assert store.exists("ext")
    with pytest.raises(AdapterError, match="not a folder"):
        store.load("x", str(tmp_path / "missing"))
    bad = root / "broken"
    write_random_adapter(str(bad), tiny_arch(), 16, 8, ("q_proj",), seed=6)   # rank 16 > max 8
    assert store.request_resident("broken") is False
    end = time.monotonic() + 20
    with pytest.raises(AdapterError, match="LoRA rank 16 is greater than max_lora_rank 8"):
        while time.monotonic() < end:
            store.request_resident("broken")
            time.sleep(0.005)
    store.close()


def test_warns_when_an_adapter_was_trained_on_another_base(tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    from server.fingerprint import BASE_SHA256, model_content_hash

    base = tmp_path / "base"
    base.mkdir()
    save_file({"w": torch.arange(6.0)}, str(base / "model.safetensors"))
    served = model_content_hash(base)
    root = tmp_path / "adapters"
    for name, recorded in (("same", served), ("other", "0" * 64), ("unrecorded", None)):
        path = write_random_adapter(str(root / name), tiny_arch(), r=2, alpha=4, targets=TARGETS, seed=1)
        weights = os.path.join(path, "adapter_model.safetensors")
        tensors = load_file(weights)
        save_file(tensors, weights, metadata={"format": "pt", **({BASE_SHA256: recorded} if recorded else {})})
    cfg = EngineConfig(model=str(base), adapters_dir=str(root), max_loras=3, max_cpu_loras=3, max_lora_rank=8)
    layers = lora_layers(tiny_arch())
    allocate_slots(layers, cfg.max_loras, cfg.max_lora_rank, "cpu", torch.float32)
    store = AdapterStore(cfg, layers, "cpu", torch.float32, base)
    with caplog.at_level("WARNING", logger="server.fingerprint"):
        for name in ("same", "other", "unrecorded"):
            _resident(store, name)
    warned = [r.getMessage() for r in caplog.records if "different base model" in r.getMessage()]
    assert len(warned) == 1 and "'other'" in warned[0] and served[:12] in warned[0]
    store.close()
