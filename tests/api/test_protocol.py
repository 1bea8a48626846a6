"""server/api/protocol.py: OpenAI request bodies parse as clients send them; wrong types are refused."""
import pytest
from pydantic import ValidationError

from server.api.protocol import ChatCompletionRequest, CompletionRequest, LoadAdapterRequest

MSG = [{"role": "user", "content": "hi"}]


def test_unknown_fields_are_ignored():
    r = ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, "presence_penalty": 0.1,
                                              "tools": [], "x-custom": 1})
    assert r.model == "m" and not hasattr(r, "x-custom")
    assert r.refused_fields() == []              # an empty tools list asks for nothing


@pytest.mark.parametrize("patch, field", [
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
])
def test_fields_not_implemented_are_named_not_ignored(patch, field):
    r = ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, **patch})
    assert r.refused_fields() == [field]
    off = ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, "tool_choice": "none",
                                                "logit_bias": {}, "function_call": None})
    assert off.refused_fields() == []


def test_logit_bias_is_parsed_into_token_id_pairs():
    r = ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, "logit_bias": {"42": 5, "7": -100.0}})
    assert r.refused_fields() == [] and r.logit_bias_pairs() == ((42, 5.0), (7, -100.0))
    for key in ("x", "-1", "1.5", " 3", ""):
        with pytest.raises(ValueError, match="token ids"):
            ChatCompletionRequest.model_validate({"model": "m", "messages": MSG,
                                                  "logit_bias": {key: 1}}).logit_bias_pairs()


def test_completion_fields_not_implemented():
    base = {"model": "m", "prompt": "x"}
    assert CompletionRequest.model_validate({**base, "echo": True}).refused_fields() == ["echo"]
    assert CompletionRequest.model_validate({**base, "suffix": "y"}).refused_fields() == ["suffix"]
    assert CompletionRequest.model_validate({**base, "best_of": 3}).refused_fields() == ["best_of"]
    assert CompletionRequest.model_validate({**base, "best_of": 2, "n": 2}).refused_fields() == []
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert CompletionRequest.model_validate({**base, "tools": tools}).refused_fields() == ["tools"]
    assert CompletionRequest.model_validate({**base, "tool_choice": "auto"}).refused_fields() == ["tool_choice"]
    assert CompletionRequest.model_validate({**base, "tools": [], "tool_choice": "none"}).refused_fields() == []


@pytest.mark.parametrize("patch", [
    {"tools": [{"type": "function", "function": {"name": "bad name"}}]},     # OpenAI's name rule
    {"tools": [{"type": "retrieval"}]},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]},
    {"tool_choice": "sometimes"},
    {"tool_choice": {"type": "function"}},
    {"parallel_tool_calls": "yes"},
    {"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                        "function": {"name": "f", "arguments": {}}}]}]},
])
def test_tool_fields_are_validated(patch):
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, **patch})


@pytest.mark.parametrize("patch", [{"logprobs": "yes"}, {"logprobs": 1}, {"max_tokens": 1.5},
                                   {"max_tokens": True}, {"temperature": "1"}, {"stream": "true"},
                                   {"n": 2.0}, {"seed": "7"}])
def test_types_are_strict_as_in_openai(patch):
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, **patch})
    ok = ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, "temperature": 1})
    assert ok.temperature == 1.0                 # an integer is a number


@pytest.mark.parametrize("body, where", [
    ({"model": "m", "messages": [{"role": "user", "content": "\ud800 hello"}]}, "messages.0.content"),
    ({"model": "m\udfff", "messages": MSG}, "model"),
    ({"model": "m", "messages": MSG, "stop": ["ok", "\udc00"]}, "stop.1"),
    ({"model": "m", "messages": MSG, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"properties": {"\ud83d": {}}}}}}, "response_format.json_schema.schema.properties."),
])
def test_lone_surrogates_are_refused_with_their_path(body, where):
    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest.model_validate(body)
    err = e.value.errors()[0]
    assert err["type"] == "invalid_unicode" and err["ctx"]["where"].startswith(where)
    assert ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": "\U0001F600 emoji and accents é"}]}).messages[0].text().startswith("\U0001F600")


def test_content_parts_and_roles():
    r = ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "developer", "content": "be terse"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None}]})
    assert [m.text() for m in r.messages] == ["be terse", "ab", ""]


@pytest.mark.parametrize("patch", [{"max_tokens": "x"}, {"messages": "hi"}, {"n": "two"}, {"stop": 5},
                                   {"messages": [{"role": "wizard", "content": "x"}]}, {"messages": []},
                                   {"model": None}, {"logprobs": "very"}])
def test_wrong_types_are_refused(patch):
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, **patch})


def test_max_tokens_aliases_and_logprobs():
    r = ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, "max_tokens": 5,
                                              "max_completion_tokens": 9, "logprobs": True, "top_logprobs": 3})
    assert r.requested_max_tokens() == 9 and r.requested_logprobs() == 3
    r = ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, "logprobs": True})
    assert r.requested_max_tokens() is None and r.requested_logprobs() == 0
    assert ChatCompletionRequest.model_validate({"model": "m", "messages": MSG}).requested_logprobs() is None


@pytest.mark.parametrize("prompt", ["text", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_completion_prompt_forms(prompt):
    r = CompletionRequest.model_validate({"model": "m", "prompt": prompt})
    assert r.prompt == prompt and r.requested_max_tokens() == 16


def test_stop_forms():
    r = CompletionRequest.model_validate({"model": "m", "prompt": "p", "stop": "\n"})
    assert r.stop_strings() == ("\n",)
    r = CompletionRequest.model_validate({"model": "m", "prompt": "p", "stop": ["a", "b"]})
    assert r.stop_strings() == ("a", "b")


def test_admin_bodies():
    assert LoadAdapterRequest.model_validate({"lora_name": "a", "lora_path": "/p"}).lora_path == "/p"
    with pytest.raises(ValidationError):
        LoadAdapterRequest.model_validate({"lora_name": "a"})
