"""server/api/protocol.py: OpenAI request bodies parse as clients send them; wrong types are refused."""
import pytest
from pydantic import ValidationError

from server.api.protocol import ChatCompletionRequest, CompletionRequest, LoadAdapterRequest

MSG = [{"role": "user", "content": "hi"}]


def test_unknown_fields_are_ignored():
    r = ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, "presence_penalty": 0.1,
                                              "tools": [], "x-custom": 1})
    assert r.model == "m" and not hasattr(r, "tools")


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
