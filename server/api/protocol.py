"""Pydantic models of the OpenAI requests and responses (plus loraplex's extensions).

Requests ignore unknown fields (clients send many we do not use) and reject wrong types
strictly, as OpenAI does ("logprobs": "yes" or "max_tokens": 1.5 are 400s; an integer
is fine where a number is expected). FastAPI turns the validation error into a 400.
Every string in a request body must be valid Unicode (no lone surrogates), checked once
over the whole body. OpenAI fields we do not implement are refused with a 400 naming
them, never accepted and ignored (`refused_fields`). Ranges are checked where the
engine's SamplingParams cannot see them (n, top_logprobs, max_tokens >= 1); the rest is
checked by SamplingParams itself so there is one source of truth.
"""
from __future__ import annotations

import re
import time
from typing import Any, Literal, Union

from pydantic import BaseModel, Field, model_validator
from pydantic_core import PydanticCustomError

from server.api.strict import StrictModel, invalid_unicode_at
from server.api.tool_models import ToolCall, ToolCallDelta, ToolChoice, ToolDef

_Request = StrictModel


MAX_MESSAGES = 4096     # a chat request's messages; checked before they are validated one by one


class _Body(_Request):
    """A whole request body: its strings are checked for valid Unicode before anything else."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("messages"), list) and len(data["messages"]) > MAX_MESSAGES:
            raise PydanticCustomError("too_long", "messages: at most {limit} messages, got {count}",
                                      {"limit": MAX_MESSAGES, "count": len(data["messages"]), "where": "messages"})
        where = invalid_unicode_at(data)
        if where is not None:
            raise PydanticCustomError("invalid_unicode", "{where}: the string is not valid Unicode "
                                      "(it holds a lone UTF-16 surrogate)", {"where": where})
        return data


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingRequest(_Body):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None                       # extension
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None        # extension (vLLM's)
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None  # extension (vLLM's name)
    ignore_eos: bool = False                       # extension
    cache_salt: str | None = Field(default=None, min_length=1)   # extension (vLLM's): own prefix-cache namespace
    user: str | None = None
    logit_bias: dict[str, float] | None = None     # token id (a decimal string) -> bias in [-100, 100]
    # OpenAI's deprecated function fields: accepted only at their "off" value (see refused_fields);
    # chat takes `tools` instead
    functions: list[Any] | None = None
    function_call: Any = None

    def refused_fields(self) -> list[str]:
        """Fields given with a value this server does not implement (a 400 names them)."""
        off = {"functions": ([], None), "function_call": (None, "none")}
        return [name for name, values in off.items() if getattr(self, name) not in values]

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """logit_bias as (token id, bias) pairs; ValueError naming a key that is not a token id."""
        pairs = []
        for key, bias in (self.logit_bias or {}).items():
            if not re.fullmatch(r"[0-9]{1,9}", key):
                raise ValueError(f"logit_bias keys must be token ids (decimal strings), got {key!r}")
            pairs.append((int(key), float(bias)))
        return tuple(pairs)

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None      # assistant: the calls it made
    tool_call_id: str | None = None               # tool: the call this result answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def requested_logprobs(self) -> int | None:
        """Top-k count for the engine: None = off."""
        if not self.logprobs:
            return None
        return self.top_logprobs or 0



PromptType = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(SamplingRequest):
    prompt: PromptType
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    tools: list[Any] | None = None      # chat only: refused here unless empty
    tool_choice: Any = None

    def refused_fields(self) -> list[str]:
        refused = super().refused_fields()
        refused += [f for f, off in (("tools", ([], None)), ("tool_choice", (None, "none")))
                    if getattr(self, f) not in off]
        if self.echo:
            refused.append("echo")
        if self.suffix:
            refused.append("suffix")
        if self.best_of is not None and self.best_of != self.n:
            refused.append("best_of")
        return refused

    def requested_max_tokens(self) -> int | None:
        # OpenAI's legacy default for /v1/completions is 16 tokens.
        return 16 if self.max_tokens is None else self.max_tokens

    def requested_logprobs(self) -> int | None:
        return self.logprobs


class LoadAdapterRequest(_Body):
    lora_name: str
    lora_path: str


class UnloadAdapterRequest(_Body):
    lora_name: str


# ---- responses -------------------------------------------------------------------


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "loraplex"
    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
