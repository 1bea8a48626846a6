"""Constrained-decoding micro-benchmark: compile time, mask time per step, apply time.

    python bench/structured.py [--schemas FILE] [--model DIR] [--compiled-apply]
    python bench/structured.py --overlap [--rows 8] [--repeats 3]

Replays the valid instances of a JSONSchemaBench-style file (one {"schema", "tests"} a line)
through matchers in lock-step batches of 1 and 8, timing fill_bitmasks for each step, as
the engine would call it. --compiled-apply also times llguidance's torch.compile'd apply
(its first call compiles: 5-16 s on a small CPU). --overlap instead times Engine.step with
`rows` schema-constrained greedy requests, mask fill overlapped with the forward (on the
engine's worker thread) and not, alternating, and checks both give the same tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

DEFAULT_SCHEMAS = Path(__file__).resolve().parents[1] / "tests" / "structured" / "data" / "jsonschemabench_sample.jsonl"


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _report(name: str, seconds: list[float]) -> str:
    us = [s * 1e6 for s in seconds]
    return f"{name}: p50 {_pct(us, .5):.0f} us, p99 {_pct(us, .99):.0f} us, mean {statistics.fmean(us):.0f} us, n={len(us)}"


def bench_compile(compiler, rows: list[dict]) -> list:
    from server.errors import GrammarError
    from server.structured.spec import ConstraintSpec
    compiled, times = [], []
    for row in rows:
        spec = ConstraintSpec("json", json.dumps(row["schema"], separators=(",", ":"), ensure_ascii=False))
        start = time.perf_counter()
        try:
            compiled.append((row, compiler.compile(spec)))
        except GrammarError:
            continue
        finally:
            times.append(time.perf_counter() - start)
    print(_report(f"compile ({len(compiled)} compiled, {len(rows) - len(compiled)} refused)", times))
    return compiled


def bench_masks(compiled: list, tokenize, batch: int, max_tokens: int = 256) -> None:
    """Lock-step replay of `batch` valid instances at a time; times one fill_bitmasks per step."""
    from server.structured.grammar import apply_bitmask, fill_bitmasks, new_matcher
    traces = []
    for row, grammar in compiled:
        data = next(t["data"] for t in row["tests"] if t["valid"])
        traces.append((grammar, tokenize(json.dumps(data, separators=(",", ":"), ensure_ascii=False))[:max_tokens]))
    fill, apply = [], []
    for g in range(0, len(traces) - batch + 1, batch):
        group = traces[g:g + batch]
        matchers = [new_matcher(grammar) for grammar, _ in group]
        for step in range(max(len(ids) for _, ids in group)):
            live = [(m, ids[step]) for m, (_, ids) in zip(matchers, group) if step < len(ids)]
            start = time.perf_counter()
            mask = fill_bitmasks([m for m, _ in live])                     # (n, W)
            fill.append(time.perf_counter() - start)
            logits = torch.randn(len(live), live[0][0].vocab_size)         # (n, V)
            start = time.perf_counter()
            apply_bitmask(logits, mask)
            apply.append(time.perf_counter() - start)
            for m, tok in live:
                m.consume(tok)
    print(_report(f"fill_bitmasks, batch {batch}, per step", fill))
    print(_report(f"apply_bitmask, batch {batch}, per step", apply))


def bench_apply(vocab: int, compiled_apply: bool) -> None:
    from server.structured.bitmask import apply_bitmask
    for batch in (1, 8):
        mask = torch.randint(-2**31, 2**31 - 1, (batch, (vocab + 31) // 32), dtype=torch.int32)
        logits = torch.randn(batch, vocab)
        impls = [("plain ops", apply_bitmask)]
        if compiled_apply:
            import llguidance.torch
            impls.append(("llguidance torch.compile", llguidance.torch.apply_token_bitmask_inplace))
        for name, fn in impls:
            start = time.perf_counter()
            fn(logits.clone(), mask)
            first = time.perf_counter() - start
            times = []
            for _ in range(300):
                x = logits.clone()
                start = time.perf_counter()
                fn(x, mask)
                times.append(time.perf_counter() - start)
            print(_report(f"apply {name}, batch {batch} (first call {first:.3f} s)", times))


def bench_overlap(compiler, rows: list[dict], count: int, repeats: int, max_tokens: int = 48) -> None:
    """Engine.step time with `count` constrained rows: the mask fill overlapping the forward or not (same tokens)."""
    from server.config import EngineConfig
    from server.engine.engine import Engine
    from server.engine.offline import drive
    from server.engine.request import Request, SamplingParams
    from server.errors import GrammarError
    from server.structured.grammar import new_matcher
    from server.structured.spec import ConstraintSpec
    engine = Engine(EngineConfig(kv_cache_tokens=8192, max_num_seqs=max(16, count)))   # the default model
    grammars = []
    for row in rows:
        try:
            grammars.append(compiler.compile(ConstraintSpec("json", json.dumps(row["schema"], separators=(",", ":")))))
        except GrammarError:
            continue
        if len(grammars) == count:
            break
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    times: dict[bool, list[float]] = {False: [], True: []}
    masking: dict[bool, list[float]] = {False: [], True: []}   # time the step spends on masks after the forward
    stage = engine.constraints

    def record(outs) -> None:            # every step of these runs has constrained rows
        masking[stage.overlap].append(stage.masking_s)
    tokens: dict[bool, list] = {}
    for _ in range(repeats):
        for overlap in (False, True):
            stage.overlap = overlap
            reqs = [Request(engine.tokenizer.encode_chat([{"role": "user", "content": "Reply with JSON following: "
                                                           + g.spec.source}]), params, constraint=new_matcher(g))
                    for g in grammars]
            stats = drive(engine, reqs, len(reqs), on_step=record)
            times[overlap] += stats.busy[1:]                          # the first step is the prefill
            out = [r.output_ids for r in reqs]
            assert tokens.setdefault(overlap, out) == out, "greedy runs differ between repeats"
    assert tokens[True] == tokens[False], "overlapping the mask fill changed the tokens"
    for overlap in (False, True):
        print(_report(f"Engine.step, {len(grammars)} constrained rows, overlap={overlap}", times[overlap]))
        print(_report(f"  mask wait + apply after the forward, overlap={overlap}", masking[overlap]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schemas", default=str(DEFAULT_SCHEMAS))
    p.add_argument("--model", default=None, help="HF folder with the tokenizer; default: the embedded model")
    p.add_argument("--compiled-apply", action="store_true")
    p.add_argument("--overlap", action="store_true", help="time Engine.step with mask overlap on and off")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from server.structured.grammar import GrammarCompiler
    if args.model is None:
        from server.model.default import ensure_default_model
        args.model = str(ensure_default_model())
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    compiler = GrammarCompiler(tokenizer)
    with open(args.schemas, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    if args.overlap:
        bench_overlap(compiler, rows, args.rows, args.repeats)
        compiler.close()
        return 0
    compiled = bench_compile(compiler, rows)
    for batch in (1, 8):
        bench_masks(compiled, lambda text: tokenizer.encode(text, add_special_tokens=False), batch)
    bench_apply(compiler.vocab_size, args.compiled_apply)
    compiler.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
