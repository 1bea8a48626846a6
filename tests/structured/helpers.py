"""Shared helpers for tests/structured: the JSONSchemaBench sample and JSON/token encoding."""
from __future__ import annotations

import json
from pathlib import Path

from server.errors import GrammarError
from server.structured.grammar import CompiledGrammar, new_matcher
from server.structured.spec import ConstraintSpec

SAMPLE = Path(__file__).parent / "data" / "jsonschemabench_sample.jsonl"


def load_sample() -> list[dict]:
    with open(SAMPLE, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def compact(value) -> str:
    """JSON the way the default (compact) grammar expects it."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def schema_spec(schema: dict, whitespace: str = "compact") -> ConstraintSpec:
    return ConstraintSpec("json", compact(schema), whitespace)


def encode(hf_tokenizer, text: str) -> list[int]:
    return hf_tokenizer.encode(text, add_special_tokens=False)


def accepts(compiled: CompiledGrammar, ids: list[int]) -> tuple[bool, str]:
    """Feed ids one by one through Matcher.consume, then EOS; (accepted, why not)."""
    m = new_matcher(compiled)
    for i, tok in enumerate(ids):
        try:
            m.consume(tok)
        except GrammarError as e:
            return False, f"refused at token {i}: {e}"
    if not m.is_accepting():
        return False, "not accepting at the end"
    m.consume(m.eos_token_id)           # an accepting grammar must take EOS
    assert m.is_stopped()
    return True, ""
