"""AdapterStore: the adapter registry and its three tiers, disk -> host (LRU) -> device slots (LRU).

Threads: the engine thread calls request_resident / poll / pin / unpin / slot_and_rank;
admin threads call load / unload / list / identity. Metadata sits behind one lock; the
slot tensors are only touched by the engine thread (poll), and disk reads + validation run
in a worker thread, so a cold load never blocks an engine step.

Identity = name + content hash. A slot remembers the identity it holds; when a name is
reloaded with other weights the old slot no longer matches, so new requests never see the
old weights (requests already running on the old slot keep it, pinned, until they finish).

Unload: new requests get unknown-adapter at once, running ones finish on their slot, and the
name is not rediscovered in adapters_dir until `load` registers it again.
Reload: `slot_and_rank` serves a running request from its old slot only until the new
weights are resident; from then on every row of that name uses the new weights and the old
slot is free.

Paths: names in adapters_dir are confined to it (server/lora/registry.py: a symlink whose
real path escapes the root is refused). `load(name, path)` is an admin operation and may
name any folder (the HTTP API only passes folders inside adapters_dir); the path is resolved
once and remembered.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import torch

from server.config import EngineConfig
from server.errors import AdapterError
from server.lora.adapter import WEIGHTS_FILE, LoraAdapter, LoraArch, content_hash, read_adapter
from server.lora.host_cache import HostCache
from server.lora.linear import LinearWithLoRA
from server.lora.registry import AdapterInfo, AdapterRegistry, Entry, check_name
from server.fingerprint import BaseCheck

log = logging.getLogger(__name__)


class AdapterStore:
    def __init__(self, config: EngineConfig, layers: dict[str, LinearWithLoRA],
                 device: torch.device | str, dtype: torch.dtype, base_dir: str | os.PathLike | None = None) -> None:
        """base_dir: the served base model's folder, to check the base adapters record (None: no check)."""
        self.config = config
        self.arch = LoraArch.from_layers(layers)
        self.device = torch.device(device)
        self.dtype = dtype
        self.layers = layers
        assert all(layer.slots is not None and layer.slots.num_slots == config.max_loras for layer in layers.values()), \
            "the model allocates its LoRA slots (server/lora/slots.py allocate_slots) before the store uses them"
        self._lock = threading.Lock()
        self._reg = AdapterRegistry(config.adapters_dir)
        self._entries = self._reg.entries
        self._host = HostCache(config.max_cpu_loras, self.device, dtype)
        self._wanted: OrderedDict[str, None] = OrderedDict()    # requested, waiting for a slot
        self._slot_owner: list[tuple[str, str] | None] = [None] * config.max_loras  # (name, identity)
        self._slot_used: list[float] = [0.0] * config.max_loras
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-load")
        self._base = BaseCheck(base_dir)
        self._installs = 0      # serial of weight installs: a new one whenever a name gets other weights
        # Cumulative, for /metrics: reads from disk and their seconds, slot evictions, host-cache
        # evictions, residency checks that found a slot (device hit), adapters that had to be
        # brought to a slot (device miss) from the host cache (host hit) or from disk (host miss).
        self._counters: dict[str, float] = dict.fromkeys(
            ("loads", "load_seconds", "evictions", "host_evictions", "device_hits", "device_misses",
             "host_hits", "host_misses"), 0)

    @property
    def num_slots(self) -> int:
        return self.config.max_loras

    def exists(self, name: str) -> bool:
        with self._lock:
            entry = self._reg.find(name)
            return entry is not None and not entry.unloading

    # ---- engine thread ------------------------------------------------------------------------
    def _valid_slot(self, entry: Entry) -> int | None:
        if entry.slot is not None and entry.meta is not None \
                and self._slot_owner[entry.slot] == (entry.name, entry.meta.identity):
            return entry.slot
        return None

    def request_resident(self, name: str) -> bool:
        """True when `name` sits in a device slot with its current weights; else start loading it."""
        with self._lock:
            entry = self._reg.live(name)
            slot = self._valid_slot(entry)
            if slot is not None:
                self._slot_used[slot] = time.monotonic()
                self._counters["device_hits"] += 1
                return True
            if entry.error is not None:
                err, entry.error = entry.error, None
                raise err
            if name not in self._wanted:
                self._counters["device_misses"] += 1
                self._counters["host_hits" if entry.adapter is not None else "host_misses"] += 1
            self._wanted[name] = None
            if entry.adapter is None and not entry.loading:
                entry.loading = True
                self._pool.submit(self._read, entry, entry.generation)
            return False

    def _read(self, entry: Entry, generation: int) -> None:
        """Worker thread: disk -> validated host copy in the serving dtype."""
        start = time.perf_counter()
        try:
            adapter = self._host.convert(read_adapter(entry.name, entry.path, self.arch, self.config.max_lora_rank))
            self._base.check(adapter.name, os.path.join(adapter.path, WEIGHTS_FILE))
        except Exception as e:     # any failure to read it fails the requests for it, never stalls them
            if not isinstance(e, AdapterError):
                log.error("adapter %r: load failed", entry.name, exc_info=True)
                e = AdapterError(f"adapter {entry.name!r} could not be loaded: {type(e).__name__}")
            with self._lock:
                if entry.generation == generation:
                    entry.error, entry.loading = e, False
            return
        with self._lock:
            self._counters["loads"] += 1
            self._counters["load_seconds"] += time.perf_counter() - start
            if entry.generation == generation:
                self._set_host(entry, adapter)
                entry.loading = False

    def _set_host(self, entry: Entry, adapter: LoraAdapter) -> None:
        """Install a freshly read adapter as the entry's current weights. Lock held."""
        if entry.meta is not None and entry.meta.identity != adapter.identity and entry.slot is not None:
            if entry.pins > 0:
                entry.retired.append(entry.slot)      # running requests finish on the old weights
            else:
                self._slot_owner[entry.slot] = None
            entry.slot = None
        if entry.meta is None or entry.meta.identity != adapter.identity:
            self._installs += 1
            entry.install = self._installs
        entry.adapter = entry.meta = adapter
        for victim in self._host.admit(entry.name, self._wanted):
            self._counters["host_evictions"] += 1
            if victim in self._entries:
                self._entries[victim].adapter = None

    def poll(self) -> None:
        """Engine thread, once per step: copy host-ready requested adapters into device slots."""
        with self._lock:
            self._reap()
            for name in list(self._wanted):
                entry = self._entries.get(name)
                if entry is None or entry.unloading:
                    del self._wanted[name]
                    continue
                if self._valid_slot(entry) is not None:
                    del self._wanted[name]
                    continue
                if entry.adapter is None:
                    continue
                slot = self._free_slot()
                if slot is None:
                    return          # every slot is pinned; try again next step
                del self._wanted[name]
                try:
                    self._copy_in(entry, slot)
                except Exception as e:   # its requests fail (request_resident raises), others go on
                    log.error("adapter %r: copy into slot %d failed", name, slot, exc_info=True)
                    self._slot_owner[slot] = None
                    entry.slot, entry.adapter = None, None
                    self._host.discard(name)
                    entry.error = AdapterError(f"adapter {name!r} could not be placed on the device: "
                                               f"{type(e).__name__}")

    def _free_slot(self) -> int | None:
        """A free slot, else the least recently used one no running request pins. Lock held."""
        best = None
        for s, owner in enumerate(self._slot_owner):
            if owner is None:
                return s
            entry = self._entries.get(owner[0])
            pinned = entry is not None and entry.pins > 0 and (entry.slot == s or s in entry.retired)
            if not pinned and (best is None or self._slot_used[s] < self._slot_used[best]):
                best = s
        if best is not None:
            self._counters["evictions"] += 1
            entry = self._entries.get(self._slot_owner[best][0])
            if entry is not None and entry.slot == best:
                entry.slot = None
        return best

    def _copy_in(self, entry: Entry, slot: int) -> None:
        adapter = entry.adapter
        for module, layer in self.layers.items():
            a, b = adapter.weights.get(module, (None, None))
            layer.slots.load(slot, a, b)
        self._slot_owner[slot] = (entry.name, adapter.identity)
        self._slot_used[slot] = time.monotonic()
        entry.slot = slot
        for s in entry.retired:     # no row reads the old weights once the new ones are resident
            if s != slot:
                self._slot_owner[s] = None
        entry.retired = []
        self._host.touch(entry.name)

    def _reap(self) -> None:
        """Forget unloaded adapters and free retired slots once no request pins them. Lock held."""
        for name, entry in list(self._entries.items()):
            if entry.pins > 0:
                continue
            for s in entry.retired:
                self._slot_owner[s] = None
            entry.retired = []
            if entry.unloading:
                if entry.slot is not None:
                    self._slot_owner[entry.slot] = None
                self._host.discard(name)
                self._wanted.pop(name, None)
                del self._entries[name]

    def cache_key(self, name: str) -> str | None:
        """The prefix-cache key of the weights new requests for `name` run on now (identity and
        install serial: unload + load, or a reload with other weights, gives a new key); None
        when they are not resident."""
        with self._lock:
            return self._cache_key(self._reg.live(name))

    def _cache_key(self, entry: Entry) -> str | None:
        if self._valid_slot(entry) is None:
            return None
        return f"{entry.meta.identity}#{entry.install}"

    def pin(self, name: str) -> str | None:
        """A request starts using `name` (counted; a pinned adapter's slot is never evicted).
        Returns the cache key of the weights it starts on (None: not the current ones)."""
        with self._lock:
            entry = self._reg.live(name)
            entry.pins += 1
            entry.served += 1
            entry.last_used = time.time()
            return self._cache_key(entry)

    def unpin(self, name: str) -> None:
        with self._lock:
            entry = self._entries.get(name)
            assert entry is not None and entry.pins > 0, f"unpin({name!r}) without a pin"
            entry.pins -= 1
            if entry.pins == 0:
                self._reap()

    def slot_and_rank(self, name: str) -> tuple[int, int]:
        """The device slot and rank serving `name`: its current weights, else (for requests already
        running across a reload) the newest retired slot they pinned."""
        with self._lock:
            entry = self._entries.get(name)
            slot = None if entry is None else self._valid_slot(entry)
            if slot is None and entry is not None and entry.pins > 0 and entry.retired:
                slot = entry.retired[-1]
            if slot is None:
                raise AdapterError(f"adapter {name!r} is not resident on the device")
            self._slot_used[slot] = time.monotonic()
            return slot, self.config.max_lora_rank if entry.meta is None else entry.meta.rank

    # ---- admin threads -----------------------------------------------------------------------
    def load(self, name: str, path: str) -> AdapterInfo:
        """Register (or re-register) `name` from folder `path`: read and validate now, in this thread."""
        check_name(name)
        real = os.path.realpath(path)
        if not os.path.isdir(real):
            raise AdapterError(f"adapter {path}: not a folder")
        start = time.perf_counter()
        adapter = self._host.convert(read_adapter(name, real, self.arch, self.config.max_lora_rank))
        with self._lock:
            self._counters["loads"] += 1
            self._counters["load_seconds"] += time.perf_counter() - start
            entry = self._reg.register(name, real)
            self._set_host(entry, adapter)
            return self._info(entry)

    def unload(self, name: str) -> None:
        """New requests get unknown-adapter at once; running ones finish, then the slot is freed.
        A folder in adapters_dir stays unknown until load(name, path) registers it again."""
        with self._lock:
            self._reg.mark_unloaded(name)
            self._reap()

    def list(self) -> list[AdapterInfo]:
        with self._lock:
            self._reg.scan()
            return [self._info(e) for e in sorted(self._entries.values(), key=lambda e: e.name)
                    if not e.unloading]

    def device_slots_used(self) -> int:
        with self._lock:
            return sum(owner is not None for owner in self._slot_owner)

    def counters(self) -> dict[str, float]:
        """Cumulative loads, load seconds, evictions, host/device hits and misses (for /metrics)."""
        with self._lock:
            return dict(self._counters)

    def identity(self, name: str) -> str:
        """name@hash of the weights that new requests for `name` get."""
        with self._lock:
            entry = self._reg.live(name)
            if entry.meta is not None:
                return entry.meta.identity
            path = entry.path
        return f"{name}@{content_hash(path)[:16]}"

    def _info(self, entry: Entry) -> AdapterInfo:
        tier = "device" if self._valid_slot(entry) is not None else "host" if entry.adapter is not None else "disk"
        m = entry.meta
        return AdapterInfo(entry.name, m.rank if m else None, m.alpha if m else None,
                           m.targets if m else (), tier, entry.served, entry.last_used,
                           m.identity if m else None)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
