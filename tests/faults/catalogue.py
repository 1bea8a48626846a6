"""The bad inputs of the fault-injection suite, and the hostile-but-valid ones.

`bad_inputs(server)` -> Cases that must each get a 4xx in OpenAI's error shape; `edge_inputs()`
-> requests at the limits (or merely nasty) that must succeed. Admin cases write what they
need (a truncated safetensors file, a .bin-only adapter, a symlink out of the root) into the
server's adapters folder first.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from server.lora.adapter import write_random_adapter
from tests.e2e.conftest import KEYS, model_arch

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
LOAD = "/v1/load_lora_adapter"
UNLOAD = "/v1/unload_lora_adapter"
ADMIN = KEYS["admin"]
MSG = [{"role": "user", "content": "hi"}]


@dataclass
class Case:
    name: str
    body: object                        # dict/list (sent as JSON), bytes/str (sent as is), or a callable -> bytes iterator
    path: str = CHAT
    key: str | None = ADMIN
    status: int | tuple[int, ...] = 400   # expected status (4xx for bad inputs)
    headers: dict = field(default_factory=dict)


def _chat(**patch) -> dict:
    return {"model": "base", "messages": MSG, "max_tokens": 2, **patch}


def _raw(**patch) -> bytes:
    """A chat body with non-JSON-standard literals (NaN, Infinity) allowed in."""
    return json.dumps(_chat(**patch), allow_nan=True).encode()


def _deep_schema(levels: int) -> dict:
    s: dict = {"type": "string"}
    for _ in range(levels):
        s = {"type": "array", "items": s}
    return s


def _rf(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def numeric_cases() -> list[Case]:
    """Each numeric parameter just past and far past its limits, and NaN / +-inf."""
    nan, inf = math.nan, math.inf
    out = []
    spec = {
        "max_tokens": [0, -1, -10**12, 10**30, nan, inf],
        "max_completion_tokens": [0, 10**9, nan],
        "temperature": [2.0001, -0.0001, 1e9, -1e9, nan, inf, -inf],
        "top_p": [0, 1.0001, -5, 1e300, nan, inf],
        "top_k": [-1, -10**20, nan],
        "frequency_penalty": [2.0001, -2.0001, 1e9, nan, inf, -inf],
        "presence_penalty": [2.0001, -1e9, nan, inf],
        "repetition_penalty": [0, -1, nan, inf],
        "n": [0, 9, 10**9, -1, nan],
        "seed": [2**63, 2**80, -(2**63) - 1, -(2**200), nan],
    }
    for param, values in spec.items():
        for v in values:
            out.append(Case(f"{param}={v!r}", _raw(**{param: v})))
    out += [Case(f"top_logprobs={v}", _raw(logprobs=True, top_logprobs=v)) for v in (21, -1, 10**9, nan)]
    out += [Case(f"completion logprobs={v}", {"model": "base", "prompt": "x", "logprobs": v}, COMPLETIONS)
            for v in (21, -1)]
    out += [Case(f"close_within={v}", _chat(structured_outputs={"json_object": True, "close_within": v}))
            for v in (-1, 4097, 10**12)]
    out += [Case(f"logit_bias={v!r}", _raw(logit_bias=v)) for v in
            ({"42": 100.5}, {"42": -101}, {"42": nan}, {"42": inf}, {"x": 1}, {"-3": 1}, {"999999": 1},
             {str(i): 1 for i in range(1025)})]
    return out


def type_cases() -> list[Case]:
    wrong = [("model", 5), ("messages", "hi"), ("messages", [5]), ("messages", [{"role": "user", "content": 5}]),
             ("messages", [{"role": "wizard", "content": "x"}]), ("messages", []),
             ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
             ("max_tokens", "many"), ("max_tokens", 1.5), ("max_tokens", True), ("temperature", "hot"),
             ("top_p", []), ("top_k", 1.5), ("n", "2"), ("stream", "yes"), ("stream_options", "x"),
             ("stream_options", {"include_usage": "yes"}), ("stop", 5), ("stop", [1, 2]), ("seed", "7"),
             ("seed", 1.5), ("logprobs", "yes"), ("logprobs", 1), ("top_logprobs", "3"),
             ("response_format", "json"), ("structured_outputs", []), ("ignore_eos", "no"), ("user", 5),
             ("frequency_penalty", {}), ("presence_penalty", "a"), ("repetition_penalty", True),
             ("max_completion_tokens", "x"), ("tools", "all"), ("logit_bias", [1])]
    out = [Case(f"type {k}={v!r}", _chat(**{k: v})) for k, v in wrong]
    out += [Case(f"completion prompt={p!r}", {"model": "base", "prompt": p}, COMPLETIONS)
            for p in (5, [1.5], [[1, "a"]], [True], None, [], [10**7])]
    out += [Case("completion logprobs=true", {"model": "base", "prompt": "x", "logprobs": True}, COMPLETIONS),
            Case("completion echo=yes", {"model": "base", "prompt": "x", "echo": "yes"}, COMPLETIONS)]
    return out


def unsupported_cases() -> list[Case]:
    """Fields this server does not implement: refused, never ignored."""
    return [Case("tools on completions", {"model": "base", "prompt": "x", "tools": [
                 {"type": "function", "function": {"name": "f"}}]}, COMPLETIONS),
            Case("tool_choice required without tools", _chat(tool_choice="required")),
            Case("functions", _chat(functions=[{"name": "f"}])),
            Case("top_logprobs without logprobs", _chat(top_logprobs=2)),
            Case("echo", {"model": "base", "prompt": "x", "echo": True}, COMPLETIONS),
            Case("suffix", {"model": "base", "prompt": "x", "suffix": "y"}, COMPLETIONS),
            Case("best_of", {"model": "base", "prompt": "x", "best_of": 3}, COMPLETIONS)]


def body_cases(max_body: int) -> list[Case]:
    big = b'{"model": "base", "messages": [{"role": "user", "content": "' + b"w " * (10 * 2**20) + b'"}]}'

    def chunked():
        yield b'{"model": "base", "messages": [{"role": "user", "content": "'
        for _ in range(max_body // 2**16 + 8):
            yield b"x" * 2**16
        yield b'"}]}'
    near = ("word " * ((max_body - 200) // 5)).strip()
    many = [{"role": "user", "content": "hi"}] * 40000       # past the messages limit
    lots = [{"role": "user", "content": "hi"}] * 4000        # within it, but far more tokens than the context
    return [Case("empty body", b""), Case("not JSON", b"not json at all"), Case("truncated JSON", b'{"model": "base", "me'),
            Case("a JSON array", b"[1, 2, 3]"), Case("an empty array", b"[]"), Case("null", b"null"),
            Case("a number", b"42"), Case("a string", b'"hello"'),
            Case("deep nesting", b'{"model": "base", "messages": ' + b"[" * 100000 + b"]" * 100000 + b"}"),
            Case("deep objects", b'{"a":' * 50000 + b"1" + b"}" * 50000),
            Case("invalid UTF-8", b'{"model": "base", "messages": [{"role": "user", "content": "\xff\xfe\xfa"}]}'),
            Case("lone surrogate escape", b'{"model": "base", "messages": [{"role": "user", "content": "\\ud800 hello"}]}'),
            Case("lone surrogate bytes", b'{"model": "base", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}'),
            Case("lone surrogate in stop", b'{"model": "base", "messages": [], "stop": ["\\udfff"]}'),
            Case("lone surrogate in a schema key", json.dumps(_chat(response_format=_rf(
                {"type": "object", "properties": {"\udc00": {"type": "string"}}}))).encode()),
            Case("20 MB body", big, status=413),
            Case("chunked body over the limit", chunked, status=413),
            Case("text near the body limit", _chat(messages=[{"role": "user", "content": near}]), status=413),
            Case("40000 messages", _chat(messages=many)),
            Case("4000 messages", _chat(messages=lots), status=413),
            Case("text/plain body", json.dumps(_chat()).encode(), headers={"content-type": "text/plain"})]


def grammar_cases() -> list[Case]:
    so = lambda **kw: _chat(structured_outputs=kw)    # noqa: E731
    return [Case("schema: unknown type", _chat(response_format=_rf({"type": "nonsense"}))),
            Case("schema: not an object", _chat(response_format=_rf("string"))),
            Case("schema: unsatisfiable", _chat(response_format=_rf({"type": "string", "minLength": 5, "maxLength": 2}))),
            Case("schema: unsatisfiable integer", _chat(response_format=_rf({"type": "integer", "minimum": 5, "maximum": 1}))),
            Case("schema: 80 levels", _chat(response_format=_rf(_deep_schema(80)))),
            Case("schema: 400 levels", _chat(response_format=_rf(_deep_schema(400)))),
            Case("schema: uniqueItems", _chat(response_format=_rf({"type": "array", "uniqueItems": True}))),
            Case("schema: not", _chat(response_format=_rf({"not": {"type": "string"}}))),
            Case("schema: remote $ref", _chat(response_format=_rf({"$ref": "http://127.0.0.1:1/x.json"}))),
            Case("json_schema without schema", _chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}})),
            Case("response_format xml", _chat(response_format={"type": "xml"})),
            Case("two constraints", _chat(response_format={"type": "json_object"}, structured_outputs={"regex": "a"})),
            Case("structured json not JSON", so(json="{not json")),
            Case("structured json deep", so(json="[" * 5000 + "]" * 5000)),
            Case("regex: unclosed group", so(regex="(")), Case("regex: unclosed class", so(regex="[a-")),
            Case("regex: bad repeat", so(regex="a{5,3}")), Case("regex: lookbehind", so(regex="(?<=a)b")),
            Case("regex: empty", so(regex="")),
            Case("choice: empty", so(choice=[])), Case("choice: not strings", so(choice=[1, 2])),
            Case("choice: 1025", so(choice=[f"c{i}" for i in range(1025)])),
            Case("grammar: not Lark", so(grammar="start: ((")),
            Case("unknown structured field", so(jsn={"type": "object"}))]


def adapter_name_cases() -> list[Case]:
    names = ["../acme-support", "acme-support/../beta-legal", "/etc/passwd", "..", ".hidden", "a/b",
             "x" * 10000, "адаптер", "acme-support\u0000", " acme-support", "", "%2e%2e%2fetc", "C:\\Windows"]
    return [Case(f"model {n[:24]!r}", _chat(model=n), status=404) for n in names]


def admin_cases(server) -> list[Case]:
    root = Path(server.adapters_dir)
    staging = root / "staging"
    staging.mkdir(exist_ok=True)
    arch = model_arch(server.model_dir)
    truncated = Path(write_random_adapter(str(staging / "truncated"), arch, r=4, alpha=8.0, targets=("q_proj",), seed=3))
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    bin_only = Path(write_random_adapter(str(staging / "bin-only"), arch, r=4, alpha=8.0, targets=("q_proj",), seed=4))
    os.replace(bin_only / "adapter_model.safetensors", bin_only / "adapter_model.bin")
    outside = root.parent / "outside-adapter"
    write_random_adapter(str(outside), arch, r=4, alpha=8.0, targets=("q_proj",), seed=5)
    link = staging / "link-out"
    if not link.exists():
        link.symlink_to(outside, target_is_directory=True)
    load = lambda name, path, **kw: Case(f"load {name!r} from {str(path)[-32:]}", {"lora_name": name, "lora_path": str(path)},  # noqa: E731
                                         LOAD, **kw)
    return [load("etc", "/etc"), load("outside", outside), load("link-out", link), load("up", str(root) + "/../.."),
            load("truncated", truncated), load("bin-only", bin_only), load("acme-support", root / "acme-support"),
            load("../escape", root / "acme-support"), load("x" * 200, root / "acme-support"),
            load("base", root / "acme-support"), load("ghost", staging / "missing", status=404),
            load("by-beta", root / "acme-support", key=KEYS["beta"], status=403),
            load("no-key", root / "acme-support", key=None, status=401),
            Case("load without lora_path", {"lora_name": "x"}, LOAD),
            Case("unload unknown", {"lora_name": "nope"}, UNLOAD, status=404),
            Case("unload traversal", {"lora_name": "../acme-support"}, UNLOAD, status=404),
            Case("unload by acme", {"lora_name": "acme-support"}, UNLOAD, key=KEYS["acme"], status=403)]


def key_cases() -> list[Case]:
    return [Case("no key", _chat(), key=None, status=401), Case("wrong key", _chat(), key="sk-wrong-00000000", status=401),
            Case("a key one character short", _chat(), key=KEYS["acme"][:-1], status=401),
            Case("basic auth", _chat(), key=None, status=401, headers={"Authorization": "Basic YWRtaW46YWRtaW4="}),
            Case("acme key on beta-legal", _chat(model="beta-legal"), key=KEYS["acme"], status=404),
            Case("beta key on acme-support", _chat(model="acme-support"), key=KEYS["beta"], status=404),
            Case("beta key on shared-json", _chat(model="shared-json"), key=KEYS["beta"], status=404)]


def bad_inputs(server, max_body: int) -> list[Case]:
    return (numeric_cases() + type_cases() + unsupported_cases() + body_cases(max_body) + grammar_cases()
            + adapter_name_cases() + admin_cases(server) + key_cases())


def edge_inputs() -> list[Case]:
    """At the limits, or merely nasty: these must succeed (200)."""
    ok = 200
    so = lambda **kw: _chat(structured_outputs=kw)    # noqa: E731
    return [Case("max_tokens=1", _chat(max_tokens=1), status=ok), Case("temperature=2", _chat(temperature=2.0), status=ok),
            Case("temperature=0", _chat(temperature=0), status=ok), Case("top_p tiny", _chat(top_p=1e-9), status=ok),
            Case("top_k past the vocabulary", _chat(top_k=10**30), status=ok),
            Case("seed at int64 max, n=2", _chat(seed=2**63 - 1, n=2), status=ok),
            Case("seed at int64 min", _chat(seed=-(2**63)), status=ok),
            Case("penalties at their limits", _chat(frequency_penalty=2, presence_penalty=-2, repetition_penalty=1e-3),
                 status=ok),
            Case("n at max", _chat(n=8, max_tokens=1), status=ok),
            Case("top_logprobs=20", _chat(logprobs=True, top_logprobs=20), status=ok),
            Case("regex (a+)+$", so(regex="(a+)+$"), status=ok), Case("regex (x+x+)+y", so(regex="(x+x+)+y"), status=ok),
            Case("choice of 1024", so(choice=[f"c{i}" for i in range(1024)]), status=ok),
            Case("tools empty, tool_choice none", _chat(tools=[], tool_choice="none"), status=ok),
            Case("tools, any arguments", _chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
                                               tool_choice="required"), status=ok),
            Case("tools, named choice", _chat(tools=[{"type": "function", "function": {"name": "f"}}],
                                              tool_choice={"type": "function", "function": {"name": "f"}}), status=ok),
            Case("unicode everywhere", _chat(messages=[{"role": "user", "content": "h\u00e9llo \U0001F600 \u0000 \u202e"}],
                                             stop=["\U0001F600"]), status=ok)]
