"""Tool calls: the grammar that makes a model's calls valid, and the parser that reads them back.

One output format for every model and mode (the Hermes / Qwen style that vLLM's `hermes`
parser reads), each call its own tagged, compact JSON object:

    <tool_call>
    {"name":"get_weather","arguments":{"city":"Paris"}}
    </tool_call>

The constraint's source (ConstraintSpec kind "tools") is canonical JSON:
    {"mode": "required" | "auto", "parallel": bool, "tools": [{"name": str, "parameters": {...}}]}
A named tool_choice is "required" over that one tool.

- required: the output is one call, or several separated by a newline when parallel; nothing
  else. Each call's `arguments` validates against its function's `parameters`.
- auto: free text, in which `<tool_call>` starts a call (a lazy lexeme: llguidance's
  "tool calling" pattern, docs/syntax.md); from there to `</tool_call>` the call is enforced
  as above. Without parallel calls, nothing may follow the first call.

Object schemas in the parameters that list `properties` and say nothing of other keys get
`additionalProperties: false` (OpenAI's strict mode requires it; `closed_objects`). Each
tool's parameters are moved under the root `$defs` (`t<i>`, its own `$defs` as
`t<i>.<name>`, local `$ref`s rewritten to match), so schemas with `$ref`s (pydantic's nested
models) keep working inside the call object. The calls are read back from the output by
server/structured/tool_parser.py.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from server.errors import GrammarError
from server.structured.closing import close_row, keep_closing

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
MODES = ("required", "auto")
# Added to a derived closing budget: the tokens of one call's frame (`<tool_call>\n{"name":...,
# "arguments":` and `}\n</tool_call>`, about 20 with SmolLM2's tokenizer), so that once the rule
# is on no new call starts that could not end in time, and the open one still closes.
CALL_RESERVE = 24
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ToolSpec:
    mode: str
    parallel: bool
    tools: tuple[tuple[str, dict], ...]       # (name, parameters schema)

    @staticmethod
    def from_source(source: str) -> "ToolSpec":
        try:
            v = json.loads(source)
            spec = ToolSpec(v["mode"], bool(v["parallel"]), tuple((t["name"], t["parameters"]) for t in v["tools"]))
        except (ValueError, KeyError, TypeError) as e:
            raise GrammarError(f"tool constraint is malformed: {e}") from e
        if spec.mode not in MODES or not spec.tools:
            raise GrammarError(f"tool constraint needs a mode in {MODES} and at least one tool")
        return spec

    def source(self) -> str:
        return json.dumps({"mode": self.mode, "parallel": self.parallel,
                           "tools": [{"name": n, "parameters": p} for n, p in self.tools]},
                          separators=(",", ":"), ensure_ascii=False)


def call_schema(tools: tuple[tuple[str, dict], ...]) -> dict:
    """The JSON Schema of one call object {"name", "arguments"} over these tools (compact,
    strict: the options the JSON constraints use)."""
    defs: dict[str, Any] = {}
    options = []
    for i, (name, params) in enumerate(tools):
        root = f"t{i}"
        params = dict(params or _NO_PARAMETERS)
        own = {**params.pop("$defs", {}), **params.pop("definitions", {})}
        for key, sub in own.items():
            defs[f"{root}.{key}"] = _rewrite_refs(closed_objects(sub), root)
        defs[root] = _rewrite_refs(closed_objects(params), root)
        options.append({"type": "object", "properties": {"name": {"const": name}, "arguments": {"$ref": f"#/$defs/{root}"}},
                        "required": ["name", "arguments"], "additionalProperties": False})
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {"x-guidance": {"whitespace_flexible": False, "lenient": False, "coerce_one_of": False},
            **schema, "$defs": defs}


_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_ONE = ("items", "additionalProperties", "not")


def closed_objects(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object schema that lists
    `properties` and says nothing of other keys, as OpenAI's strict function calling asks:
    a call's arguments hold the declared parameters only (they still validate against the
    schema as given). A copy; the schema is walked as a schema, so a property that happens
    to be named "properties" is left alone."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: closed_objects(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and "patternProperties" not in out:
            out["additionalProperties"] = False
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(v) for v in out[key]]
    for key in _SUBSCHEMA_ONE:
        if isinstance(out.get(key), dict):
            out[key] = closed_objects(out[key])
    for key in ("$defs", "definitions"):
        if isinstance(out.get(key), dict):
            out[key] = {k: closed_objects(v) for k, v in out[key].items()}
    return out


def _rewrite_refs(value: Any, root: str) -> Any:
    """Local $refs of one tool's parameters, pointed at where they now live under $defs."""
    if isinstance(value, list):
        return [_rewrite_refs(v, root) for v in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for k, v in value.items():
        if k == "$ref" and isinstance(v, str):
            if v == "#":
                v = f"#/$defs/{root}"
            elif v.startswith(("#/$defs/", "#/definitions/")):
                v = f"#/$defs/{root}." + v.split("/", 2)[2]
            elif v.startswith("#/"):
                v = f"#/$defs/{root}/" + v[2:]
            else:
                raise GrammarError(f"tool parameters may only use local $refs, got {v!r}")
        out[k] = _rewrite_refs(v, root) if k not in ("const", "enum", "default", "examples") else v
    return out


def tool_grammar(spec: ToolSpec) -> str:
    """The Lark grammar (llguidance dialect) of a tool constraint."""
    body = "%json " + json.dumps(call_schema(spec.tools), separators=(",", ":"), ensure_ascii=False)
    call = f'{json.dumps(CALL_OPEN + chr(10))} call_json {json.dumps(chr(10) + CALL_CLOSE)}'
    if spec.mode == "required":
        start = "start: call (\"\\n\" call)*" if spec.parallel else "start: call"
        return f"%llguidance {{}}\n{start}\ncall: {call}\ncall_json: {body}\n"
    head = f'call_hd[lazy]: TEXT {json.dumps(CALL_OPEN)}'
    rest = f'call: call_hd "\\n" call_json {json.dumps(chr(10) + CALL_CLOSE)}'
    start = "start: call* tail" if spec.parallel else "start: tail | call"
    return (f"%llguidance {{}}\n{start}\ntail: TEXT\nTEXT: /(.|\\n)*/\n{head}\n{rest}\n"
            f"call_json: {body}\n")


def call_bounds(text: str) -> int | None:
    """Where the JSON of the call being written starts in `text`, or None when the output is
    not inside a call now (before the first, or after a complete one)."""
    start = text.rfind(CALL_OPEN)
    if start < 0 or text.find(CALL_CLOSE, start) >= 0:
        return None
    return start + len(CALL_OPEN)


def repeats_a_call(text: str) -> bool:
    """Whether the output has just completed a call identical (name and arguments) to an
    earlier one: a small model asked for parallel calls tends to repeat its first."""
    if not text.endswith(CALL_CLOSE):
        return False
    calls = [c.strip() for c in text.split(CALL_OPEN)[1:]]
    return len(calls) > 1 and calls[-1] in calls[:-1]


def close_tool_row(logits, matcher, text: str) -> None:
    """The closing rule (structured/closing.py) for tool output, in place on one masked row
    (V,): inside a call, close its JSON; after a complete call, end the output where the
    grammar allows; free text before any call is left alone (auto: a text answer)."""
    start = call_bounds(text)
    if start is not None:
        close_row(logits, matcher, text[start:])
    elif CALL_OPEN in text and matcher.eos_token_id < logits.shape[0]:
        keep_closing(logits, torch.tensor([matcher.eos_token_id], device=logits.device))
