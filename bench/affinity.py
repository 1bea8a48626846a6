"""Adapter-affinity routing on paper: N replicas x K device slots under zipf adapter popularity.

    python -m bench.affinity [--requests 200000] [--rate 100] [--out FILE]

Each request names one of A adapters, drawn from a zipf law (popularity of the i-th most
popular adapter ~ 1 / i**s). A replica holds K adapters in its device slots and H in host
memory (both LRU, as the adapter store evicts: `--max-loras`, `--max-cpu-loras`). A request
whose adapter is not in its replica's slots waits for a slot load: from host memory (a copy)
or, when the replica has not got it there either, from disk (read and converted: the cold
load). Two routers are compared:

- random: any replica, uniformly (a plain load balancer);
- affinity: a replica that holds the adapter in its slots (the least recently loaded-into of
  those, when several do), else the replica whose least recently used slot is oldest: Ray
  Serve's model multiplexing with `max_num_models_per_replica` = the slot count (route to a
  replica with the model, else load it on one and evict by LRU there);
- affinity-host: the same over the host tier: a replica with the adapter in its slots, else
  one with it in host memory, else the one whose least recently used host entry is oldest
  (`max_num_models_per_replica` = the host capacity; which adapters hold slots stays the
  replica engine's business).

Reported per setting: the slot hit rate, the host hit rate among slot misses, the disk
loads per second at `rate` requests per second, and the busiest replica's share of requests
(affinity concentrates a popular adapter on one replica). Queueing is not modelled (every replica is assumed to keep up): the point is how
many replicas and slots make cold loads rare, for docs/scale-out.md.
"""
from __future__ import annotations

import argparse
import itertools
import random
from collections import OrderedDict
from dataclasses import dataclass

ROUTERS = ("random", "affinity", "affinity-host")


@dataclass(frozen=True)
class Setting:
    replicas: int
    slots: int
    adapters: int
    zipf_s: float
    host: int = 64

    def __post_init__(self) -> None:
        if min(self.replicas, self.slots, self.adapters) < 1 or self.zipf_s < 0 or self.host < self.slots:
            raise ValueError(f"replicas, slots and adapters must be >= 1, zipf_s >= 0, host >= slots: {self}")


@dataclass(frozen=True)
class Result:
    setting: Setting
    router: str
    hit_rate: float               # requests whose adapter was in the replica's slots
    host_hit_rate: float          # of the other requests, those whose adapter was in host memory
    disk_loads_per_s: float
    busiest: float                # the busiest replica's share of the requests (1/replicas = even)


def zipf_weights(n: int, s: float) -> list[float]:
    """Popularity of adapters 0..n-1 (0 the most popular), normalised to sum 1."""
    w = [1.0 / (i + 1) ** s for i in range(n)]
    total = sum(w)
    return [x / total for x in w]


def simulate(setting: Setting, router: str, requests: int, rate: float, seed: int = 0) -> Result:
    """Route `requests` draws and count slot hits; the first 10% warm the slots and are not counted."""
    if router not in ROUTERS:
        raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
    rng = random.Random(seed)
    cum = list(itertools.accumulate(zipf_weights(setting.adapters, setting.zipf_s)))
    draws = rng.choices(range(setting.adapters), cum_weights=cum, k=requests)
    slots = [OrderedDict() for _ in range(setting.replicas)]    # adapter -> None, LRU first
    host = [OrderedDict() for _ in range(setting.replicas)]
    clock = [0] * setting.replicas                              # when each replica last loaded
    warm = requests // 10
    hits = host_hits = 0
    served = [0] * setting.replicas
    for t, adapter in enumerate(draws):
        if router == "random":
            r = rng.randrange(setting.replicas)
        else:
            holders = [i for i, s in enumerate(slots) if adapter in s]
            if not holders and router == "affinity-host":
                holders = [i for i, h in enumerate(host) if adapter in h]
            if holders:
                r = min(holders, key=lambda i: clock[i])
            else:   # no replica has it: load where the least recently used entry is oldest (or free)
                tier, size = (slots, setting.slots) if router == "affinity" else (host, setting.host)
                r = min(range(setting.replicas), key=lambda i: (len(tier[i]) >= size, clock[i]))
        hit, in_host = _touch(slots[r], adapter, setting.slots), _touch(host[r], adapter, setting.host)
        if not hit:
            clock[r] = t
        if t >= warm:
            hits += hit
            host_hits += in_host and not hit
            served[r] += 1
    counted = requests - warm
    misses = counted - hits
    return Result(setting, router, hits / counted, host_hits / misses if misses else 1.0,
                  (misses - host_hits) / counted * rate, max(served) / counted)


def _touch(lru: OrderedDict, key: int, size: int) -> bool:
    """Use `key` in an LRU of `size` entries -> whether it was there."""
    if key in lru:
        lru.move_to_end(key)
        return True
    lru[key] = None
    if len(lru) > size:
        lru.popitem(last=False)
    return False


def table(results: list[Result]) -> str:
    head = ("| replicas | slots / host each | adapters | zipf s | router | slot hits | host hits of the misses "
            "| disk loads/s | busiest replica |\n|---|---|---|---|---|---|---|---|---|")
    rows = [f"| {r.setting.replicas} | {r.setting.slots} / {r.setting.host} | {r.setting.adapters} "
            f"| {r.setting.zipf_s:g} | {r.router} | {r.hit_rate:.3f} | {r.host_hit_rate:.3f} "
            f"| {r.disk_loads_per_s:.1f} | {r.busiest:.2f} |" for r in results]
    return "\n".join([head, *rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.affinity", description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=200_000)
    ap.add_argument("--rate", type=float, default=100.0, help="requests per second, for cold loads/s")
    ap.add_argument("--out", help="also write the table to this file")
    args = ap.parse_args(argv)
    results = [simulate(Setting(n, 8, a, s), router, args.requests, args.rate)
               for a, s in ((100, 1.0), (1000, 1.0), (1000, 1.2))
               for n in (1, 2, 4, 8, 16) for router in ROUTERS if n > 1 or router == "random"]
    text = (f"{args.requests} requests at {args.rate:g}/s; the first 10% warm the slots\n\n" + table(results))
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
