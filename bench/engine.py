"""`loraplex bench`: offline decode throughput at several batch sizes.

For each batch size, args.prompts short prompts run with exactly args.max_tokens new tokens
each (ignore_eos), keeping `batch size` requests in flight. `--adapters N` writes N random
PEFT-layout adapters (r=16, all seven modules, non-zero B) to a temporary adapters dir and
assigns them to the prompts round-robin. Prints a table and writes JSON to args.out.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import tempfile
from dataclasses import dataclass

from loadtest.record import write_atomic
from server.config import ConfigError, EngineConfig
from server.engine.engine import Engine
from server.engine.offline import drive
from server.engine.request import Request, SamplingParams

log = logging.getLogger(__name__)

TOPICS = ("the sea", "a mountain village", "robots", "the moon", "an old library", "winter",
          "a lost key", "the desert")


def _prompts(engine: Engine, n: int) -> list[list[int]]:
    return [engine.tokenizer.encode(f"Write a long story about {TOPICS[i % len(TOPICS)]}, part {i}.")
            for i in range(n)]


def write_adapters(engine: Engine, root: str, n: int) -> list[str]:
    from server.lora.adapter import TARGETS, LoraArch, write_random_adapter
    arch = LoraArch.from_layers(engine.model.lora_linears())
    names = [f"bench-{i}" for i in range(n)]
    for i, name in enumerate(names):
        write_random_adapter(os.path.join(root, name), arch, r=16, alpha=32.0, targets=TARGETS, seed=i)
    return names


def _run(engine: Engine, prompts: list[list[int]], adapters: list[str | None], batch: int,
         max_tokens: int) -> dict:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    reqs = [Request(list(ids), params, adapter=adapter) for ids, adapter in zip(prompts, adapters)]
    stats = drive(engine, reqs, batch)     # steps that only waited for adapter loads are not timed
    return {"batch_size": batch, "prompts": len(prompts), "generated_tokens": stats.generated,
            "wall_s": round(stats.wall_s, 3), "tokens_per_s": round(stats.generated / stats.wall_s, 2),
            "steps": len(stats.busy), "mean_step_ms": round(1e3 * sum(stats.busy) / max(len(stats.busy), 1), 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


@dataclass(frozen=True)
class BenchArgs:
    """What `loraplex bench` measures, besides the engine's config."""
    prompts: int = 32                 # prompts per batch size
    batch_sizes: str = "1,8,32"       # comma-separated
    max_tokens: int = 32
    adapters: int = 0                 # distinct random adapters, round-robin
    out: str = "bench.json"


def run_bench(config: EngineConfig, args: BenchArgs) -> int:
    batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    if not batch_sizes or min(batch_sizes) < 1:
        raise ConfigError(f"--batch-sizes must be positive integers, got {args.batch_sizes!r}")
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-") as tmp:
        if args.adapters > 0:
            config = dataclasses.replace(config, adapters_dir=tmp)
        config = dataclasses.replace(config, max_num_seqs=max(config.max_num_seqs, max(batch_sizes)))
        engine = Engine(config)
        names = write_adapters(engine, tmp, args.adapters) if args.adapters > 0 else []
        prompts = _prompts(engine, args.prompts)
        adapters = [names[i % len(names)] if names else None for i in range(len(prompts))]
        # Warm-up, untimed: the first forward repacks NF4 weights, and every adapter that fits the
        # device slots is loaded once, so the timed runs measure steady state. With more adapters
        # than --max-loras the timed runs include the loads that cycling them through slots costs.
        warm = max(2, min(len(names), config.max_loras))
        _run(engine, prompts[:warm], adapters[:warm], warm, 2)
        rows = [_run(engine, prompts, adapters, b, args.max_tokens) for b in batch_sizes]
    result = {"model": config.model, "quantization": config.quantization, "device": str(engine.device),
              "dtype": str(engine.dtype).replace("torch.", ""), "max_tokens": args.max_tokens,
              "adapters": args.adapters, "weight_mib": round(engine.model.weight_bytes() / 2**20, 1),
              "runs": rows}
    _print_table(result)
    out = os.path.abspath(args.out)
    write_atomic(out, json.dumps(result, indent=2).encode())
    log.info("wrote %s", out)
    return 0


def _print_table(result: dict) -> None:
    print(f"model {result['model']}  {result['quantization']}/{result['dtype']} on {result['device']}  "
          f"weights {result['weight_mib']} MiB  adapters {result['adapters']}  "
          f"max_tokens {result['max_tokens']}")
    print(f"{'batch':>6} {'tokens/s':>10} {'step ms':>9} {'steps':>6} {'wall s':>8} {'peak RSS MiB':>12}")
    for r in result["runs"]:
        print(f"{r['batch_size']:>6} {r['tokens_per_s']:>10} {r['mean_step_ms']:>9} {r['steps']:>6} "
              f"{r['wall_s']:>8} {r['peak_rss_mib']:>12}")
