"""ConstraintSpec: what a request asks its output to match, parsed from the API fields.

Two request fields may carry a constraint:

- `response_format` (OpenAI):
    {"type": "text"}                                  no constraint
    {"type": "json_object"}                           any JSON object
    {"type": "json_schema", "json_schema": {"name": str, "schema": {...}, "strict": bool}}
- `structured_outputs` (vLLM style), exactly one of:
    {"json": {...schema...} | "<schema as a JSON string>"}
    {"json_object": true}
    {"regex": "<pattern>"}                            the whole output matches the pattern
    {"choice": ["a", "b", ...]}                       the output is exactly one of the strings
    {"grammar": "<Lark grammar>"}                     llguidance's Lark dialect
  plus, optionally, {"whitespace": "compact" | "flexible"} and {"close_within": N} (JSON
  constraints only; both may be given alongside response_format).

Whitespace: JSON output is compact by default (no whitespace between tokens, separators
"," and ":"), so a model cannot pad its answer with spaces or newlines until max_tokens.
A request opts back in with structured_outputs {"whitespace": "flexible"} (which may be
given alongside response_format), or inside the schema with llguidance's own setting
`"x-guidance": {"whitespace_flexible": true}`.

Closing within the budget: with close_within N > 0, the last N tokens before max_tokens are
spent closing the JSON value (server/structured/closing.py): whenever the grammar allows a
token that closes the open string, array or object, or ends the output, only those may be
sampled; where a value must start, the shortest one the grammar allows (`""`, `0`, `null`,
...); elsewhere (a required key, a minLength) decoding goes on. A model that would ramble
inside a string until max_tokens then ends with a complete, valid value and finish_reason
"stop" (the text is cut short, not truncated). The same rule takes over early when the
output loops (the same tokens again and again: server/engine/constrain.py).
Unset (None), the budget is derived from max_tokens (`default_close_within`); 0 opts out,
and max_tokens then cuts the output wherever it is, as in OpenAI's API.

`strict` is accepted and has no effect: every schema is enforced in full or refused.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from server.errors import GrammarError

KINDS = ("json", "regex", "choice", "grammar", "tools")   # tools: server/structured/tools.py
WHITESPACE = ("compact", "flexible")
_CONSTRAINT_KEYS = ("json", "json_object", "regex", "choice", "grammar")
_ANY_OBJECT = '{"type":"object"}'
_OPTIONS = ("whitespace", "close_within")
CLOSABLE = ("json", "tools")    # kinds the closing rule knows how to end
MAX_CLOSE_WITHIN = 4096
MAX_SCHEMA_DEPTH = 64      # nesting levels (objects and arrays) of a schema; llguidance stops near 100
MAX_CHOICES = 1024           # llguidance parses at most 2000 items per row: one alternation of choices


@dataclass(frozen=True)
class ConstraintSpec:
    """One constraint in canonical form; equal specs compile to the same grammar.

    kind:       "json" (source is a JSON Schema), "regex", "choice" (source is a JSON list
                of strings) or "grammar" (Lark).
    source:     canonical text: schemas and choice lists dumped compactly with their key order
                kept (llguidance generates object properties in the order the schema lists
                them, so {"a","b"} and {"b","a"} are different grammars).
    whitespace: "compact" or "flexible"; only meaningful for kind "json".
    name:       json_schema.name, used in error messages.
    close_within: closing budget in tokens (see above), None = derived from max_tokens; not
                part of the grammar.
    """
    kind: str
    source: str
    whitespace: str = "compact"
    name: str = ""
    close_within: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GrammarError(f"constraint kind must be one of {KINDS}, got {self.kind!r}")
        if self.whitespace not in WHITESPACE:
            raise GrammarError(f"whitespace must be one of {WHITESPACE}, got {self.whitespace!r}")
        if self.close_within is not None and (isinstance(self.close_within, bool)
                                              or not isinstance(self.close_within, int)
                                              or not 0 <= self.close_within <= MAX_CLOSE_WITHIN):
            raise GrammarError(f"close_within must be an integer in 0..{MAX_CLOSE_WITHIN}, "
                               f"got {self.close_within!r}")
        if self.close_within and self.kind not in CLOSABLE:
            raise GrammarError(f"close_within applies to JSON constraints only, not to {self.kind!r}")
        if not isinstance(self.source, str):
            raise GrammarError(f"constraint source must be a string, got {type(self.source).__name__}")

    @property
    def cache_key(self) -> str:
        """Hash of everything that changes the compiled grammar (not the name)."""
        text = "\0".join((self.kind, self.whitespace, self.source))
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def default_close_within(max_tokens: int) -> int:
    """The closing budget of a JSON constraint that names none: a quarter of max_tokens, at
    least 16 and at most 64 (closing a few levels of nesting, a string and the required keys
    left takes a dozen tokens or more); with max_tokens of 16 or less the whole output closes
    (the shortest value the schema allows)."""
    return max(16, min(64, max_tokens // 4))


def canonical_json(value: Any) -> str:
    """Compact JSON, key order kept (it is part of the schema's meaning here)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def parse_constraint(response_format: dict | None,
                     structured_outputs: dict | None) -> ConstraintSpec | None:
    """The request's constraint, or None when it has none; GrammarError when malformed."""
    from_format = _from_response_format(response_format)
    options, from_outputs = _from_structured_outputs(structured_outputs)
    if from_format is not None and from_outputs is not None:
        raise GrammarError("give a constraint in response_format or in structured_outputs, not both")
    spec = from_format if from_format is not None else from_outputs
    given = [k for k in _OPTIONS if options.get(k) is not None]
    if spec is None:
        if given:
            raise GrammarError(f"structured_outputs.{given[0]} needs a JSON constraint "
                               "(response_format json_object/json_schema or structured_outputs.json)")
        return None
    if given:
        if spec.kind != "json":
            raise GrammarError(f"structured_outputs.{given[0]} applies to JSON constraints only, "
                               f"not to {spec.kind!r}")
        spec = ConstraintSpec(spec.kind, spec.source, options.get("whitespace") or spec.whitespace, spec.name,
                              spec.close_within if options.get("close_within") is None else options["close_within"])
    return spec


def _from_response_format(rf: dict | None) -> ConstraintSpec | None:
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise GrammarError(f"response_format must be an object, got {type(rf).__name__}")
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ConstraintSpec("json", _ANY_OBJECT)
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise GrammarError("response_format.json_schema must be an object with 'name' and 'schema'")
        unknown = sorted(set(js) - {"name", "schema", "strict", "description"})
        if unknown:
            raise GrammarError(f"response_format.json_schema has unknown fields {unknown}")
        name = js.get("name", "")
        if not isinstance(name, str):
            raise GrammarError(f"response_format.json_schema.name must be a string, got {name!r}")
        if "strict" in js and not isinstance(js["strict"], bool) and js["strict"] is not None:
            raise GrammarError(f"response_format.json_schema.strict must be a boolean, got {js['strict']!r}")
        if "schema" not in js:
            raise GrammarError("response_format.json_schema.schema is required")
        return ConstraintSpec("json", _schema_source(js["schema"], "response_format.json_schema.schema"),
                              name=name)
    raise GrammarError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def _from_structured_outputs(so: dict | None) -> tuple[dict, ConstraintSpec | None]:
    """-> ({option: value} for the options given, the constraint or None)."""
    if so is None:
        return {}, None
    if not isinstance(so, dict):
        raise GrammarError(f"structured_outputs must be an object, got {type(so).__name__}")
    unknown = sorted(set(so) - set(_CONSTRAINT_KEYS) - set(_OPTIONS))
    if unknown:
        raise GrammarError(f"structured_outputs has unknown fields {unknown}; "
                           f"allowed: {list(_CONSTRAINT_KEYS) + list(_OPTIONS)}")
    whitespace = so.get("whitespace")
    if whitespace is not None and whitespace not in WHITESPACE:
        raise GrammarError(f"structured_outputs.whitespace must be one of {WHITESPACE}, got {whitespace!r}")
    close = so.get("close_within")
    if close is not None and (isinstance(close, bool) or not isinstance(close, int)
                              or not 0 <= close <= MAX_CLOSE_WITHIN):
        raise GrammarError(f"structured_outputs.close_within must be an integer in 0..{MAX_CLOSE_WITHIN}, "
                           f"got {close!r}")
    options = {"whitespace": whitespace, "close_within": close}
    given = [k for k in _CONSTRAINT_KEYS if so.get(k) is not None]
    if len(given) > 1:
        raise GrammarError(f"structured_outputs takes one of {list(_CONSTRAINT_KEYS)}, got {given}")
    if not given:
        return options, None
    key = given[0]
    value = so[key]
    if key == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except (json.JSONDecodeError, RecursionError) as e:
                raise GrammarError(f"structured_outputs.json is not valid JSON: {e}") from e
        return options, ConstraintSpec("json", _schema_source(value, "structured_outputs.json"))
    if key == "json_object":
        if value is not True:
            raise GrammarError(f"structured_outputs.json_object must be true, got {value!r}")
        return options, ConstraintSpec("json", _ANY_OBJECT)
    if key == "choice":
        if (not isinstance(value, list) or not value
                or not all(isinstance(c, str) for c in value)):
            raise GrammarError(f"structured_outputs.choice must be a non-empty list of strings, got {value!r:.200}")
        if len(value) > MAX_CHOICES:
            raise GrammarError(f"structured_outputs.choice has {len(value)} choices; at most {MAX_CHOICES}")
        return options, ConstraintSpec("choice", canonical_json(value))
    if not isinstance(value, str) or not value:
        raise GrammarError(f"structured_outputs.{key} must be a non-empty string, got {value!r}")
    return options, ConstraintSpec(key, value)


def _schema_source(schema: Any, where: str) -> str:
    if not isinstance(schema, dict):
        raise GrammarError(f"{where} must be a JSON Schema object, got {type(schema).__name__}")
    if nesting_depth(schema) > MAX_SCHEMA_DEPTH:
        raise GrammarError(f"{where} is nested more than {MAX_SCHEMA_DEPTH} levels deep")
    return canonical_json(schema)


def nesting_depth(value: Any) -> int:
    """Levels of objects and arrays in a JSON value (iterative: any depth is measured safely)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, depth = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((c, depth + 1) for c in children)
    return deepest
