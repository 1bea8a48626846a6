"""End to end in one Engine (the default NF4 model): tool calls the model makes under each mode.

Under `auto` the model itself decides to call: on this prompt SmolLM2-135M writes a sentence,
then `<tool_call>`, from which the grammar holds it to a valid call. Under `required` (base
and an adapter) every output is calls only. The closing budget keeps each output whole.
"""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from server.api.protocol import ChatCompletionRequest
from server.api.tool_calls import template_inputs, tool_spec, whole_output
from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import Request, SamplingParams
from server.structured.grammar import GrammarCompiler, new_matcher
from server.structured.spec import default_close_within
from server.structured.tools import CALL_RESERVE

pytestmark = pytest.mark.slow

ADAPTERS = Path(__file__).resolve().parents[2] / "adapters"
ADD = {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": ADD}}]


@pytest.fixture(scope="module")
def engine():
    return Engine(EngineConfig(adapters_dir=str(ADAPTERS), kv_cache_tokens=8192, max_num_seqs=8))


def _run(engine, jobs):
    """jobs: (chat body, adapter) -> [(text, finish reason)], greedy, as one batch, closing budget
    derived as the API derives it."""
    compiler = GrammarCompiler(engine.tokenizer.hf)
    reqs = []
    for body, adapter in jobs:
        messages, tools = template_inputs(body, engine.tokenizer.template_takes_tools)
        m = new_matcher(compiler.compile(tool_spec(body)))
        m.close_within = default_close_within(body.max_tokens) + CALL_RESERVE
        reqs.append(Request(engine.tokenizer.encode_chat(messages, tools),
                            SamplingParams(max_tokens=body.max_tokens, temperature=0.0), adapter=adapter, constraint=m))
        engine.add_request(reqs[-1])
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None, out.error
    compiler.close()
    return [(engine.tokenizer.decode(r.output_ids), r.finish_reason.value) for r in reqs]


def _body(content: str, choice) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": content}],
                                                 "tools": TOOLS, "tool_choice": choice, "max_tokens": 120})


def test_calls_made_under_auto_and_required(engine):
    jobs = [(_body("What is 2+3? Use a tool call.", "auto"), None),
            (_body("What is 2+3?", "required"), None),
            (_body("Add 10 and 32.", "required"), "pirate")]
    outs = _run(engine, jobs)
    for (body, adapter), (text, reason) in zip(jobs, outs):
        content, calls, finish = whole_output(text, reason)
        assert calls, (adapter, text)
        assert finish == "tool_calls"
        for c in calls:
            assert c.function.name == "add"
            jsonschema.validate(json.loads(c.function.arguments), ADD)
        if body.tool_choice == "auto":
            assert content                             # it said something first, then called
        else:
            assert content is None                     # required: calls only
