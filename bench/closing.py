"""How constrained outputs end, with the closing rule off and at its default.

    python -m bench.closing [--schemas FILE] [--count 50] [--max-tokens 256]

Runs greedy requests on the default model (NF4, no penalties: what a client gets by default)
in one batch: `count` JSONSchemaBench schemas ("Reply with only a JSON value that follows
this JSON Schema: ...") and 7 json_object prompts. Each runs twice: with close_within 0 (the
client opted out: max_tokens cuts the output) and with the default budget
(server/structured/spec.py default_close_within, plus the loop detector of
server/engine/constrain.py). For each it counts the outputs that stopped by themselves,
those the closing rule ended ("closed": the budget was reached or a loop seen), those cut at
max_tokens, and how many parse (and, for schemas, validate with format checks).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jsonschema  # noqa: E402

from server.config import EngineConfig  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.request import FinishReason, Request, SamplingParams  # noqa: E402
from server.errors import GrammarError  # noqa: E402
from server.structured.grammar import GrammarCompiler, new_matcher, parse_constraint  # noqa: E402
from server.structured.spec import ConstraintSpec, canonical_json, default_close_within  # noqa: E402

SCHEMAS = Path(__file__).resolve().parents[1] / "tests" / "structured" / "data" / "jsonschemabench_sample.jsonl"
OBJECT_PROMPTS = ("Describe a cat as JSON.", "Give me a JSON object describing a cat", "Describe a car as JSON.",
                  "Return a JSON object with a city and its country.", "List three fruits in a JSON object.",
                  "Give me a user profile in JSON.", "Summarize the weather today as JSON.")


def pick_schemas(compiler: GrammarCompiler, path: Path, count: int) -> list[dict]:
    """`count` schemas spread over the file, among those that compile and are under 1,500 chars."""
    usable = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if len(canonical_json(row["schema"])) > 1500:
                continue
            try:
                compiler.compile(ConstraintSpec("json", canonical_json(row["schema"])))
            except GrammarError:
                continue
            usable.append(row)
    step = len(usable) / count
    return [usable[int(i * step)] for i in range(count)]


def run(engine: Engine, compiler: GrammarCompiler, schemas: list[dict], max_tokens: int,
        close_within: int) -> dict[str, list[tuple[str, str, bool]]]:
    """-> {"schemas": [...], "objects": [...]}, each (end, text, valid) in order; end is
    "stop", "closed" or "length"."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    jobs = [(f"Reply with only a JSON value that follows this JSON Schema:\n{canonical_json(r['schema'])}",
             ConstraintSpec("json", canonical_json(r["schema"])), r["schema"]) for r in schemas]
    jobs += [(p, parse_constraint({"type": "json_object"}, None), {"type": "object"}) for p in OBJECT_PROMPTS]
    reqs = []
    for message, spec, _ in jobs:
        ids = engine.tokenizer.encode_chat([{"role": "user", "content": message}])
        reqs.append(Request(ids, params, constraint=new_matcher(compiler.compile(spec), close_within)))
        engine.add_request(reqs[-1])
    while engine.has_unfinished():
        engine.step()
    out = []
    for req, (_, _, schema) in zip(reqs, jobs):
        text = engine.tokenizer.decode(req.output_ids)
        end = "length" if req.finish_reason == FinishReason.LENGTH else "closed" if req.closing else "stop"
        valid = _valid(text, schema)
        out.append((end, text, valid))
        if not valid:
            print(f"  close_within {close_within}: {end}, not valid: {text[:120]!r} ... {text[-60:]!r}\n"
                  f"    schema {canonical_json(schema)[:300]}", file=sys.stderr)
    return {"schemas": out[:len(schemas)], "objects": out[len(schemas):]}


def _valid(text: str, schema: dict) -> bool:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls(schema, format_checker=cls.FORMAT_CHECKER).validate(value)
    except jsonschema.ValidationError:
        return False
    return True


def row(label: str, results: list[tuple[str, str, bool]]) -> str:
    ends = [e for e, _, _ in results]
    return (f"| {label} | {len(results)} | {ends.count('stop')} | {ends.count('closed')} | {ends.count('length')} "
            f"| {sum(v for _, _, v in results)}/{len(results)} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schemas", default=str(SCHEMAS))
    p.add_argument("--count", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=256)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(EngineConfig(adapters_dir=tmp, kv_cache_tokens=49152, max_num_seqs=96,
                                     max_num_batched_tokens=4096))
        compiler = GrammarCompiler(engine.tokenizer.hf)
        schemas = pick_schemas(compiler, Path(args.schemas), args.count)
        budget = default_close_within(args.max_tokens)
        lines = [f"greedy, max_tokens {args.max_tokens}, no penalties; default close_within = {budget}", "",
                 "| run | outputs | stopped | closed by the rule | cut at max_tokens | parse (and validate) |",
                 "|---|---|---|---|---|---|"]
        for label, close in (("close_within 0 (opted out)", 0), (f"default (close_within {budget})", budget)):
            res = run(engine, compiler, schemas, args.max_tokens, close)
            lines += [row(f"{label}: schemas", res["schemas"]), row(f"{label}: json_object", res["objects"])]
        compiler.close()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
