"""The Responses API request (POST /v1/responses), stateless, and its translation to a chat request.

A response is generated exactly as the equivalent chat completion is (same template, tools,
constraints, adapters, auth, metrics): `to_chat` maps
    instructions          -> a leading system message
    input (text or items) -> messages; `function_call` / `function_call_output` items ->
                             assistant tool_calls / tool results
    max_output_tokens     -> max_completion_tokens
    text.format           -> response_format (json_schema: name, schema, strict at the top level)
    tools, tool_choice    -> chat tools (the Responses shape is flat: {"type": "function", "name", ...})
Nothing is stored: `store: true`, `previous_response_id`, `background` and `conversation` are
refused with a 400, as are `include`, `reasoning`, `truncation: auto` and built-in tools.
"""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import Field

from server.api.protocol import ChatCompletionRequest, _Body
from server.api.strict import StrictModel
from server.api.tool_models import FUNCTION_NAME


class InputText(StrictModel):
    type: Literal["input_text", "output_text", "text"]
    text: str


class MessageItem(StrictModel):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Union[str, list[InputText]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(StrictModel):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(StrictModel):
    type: Literal["function_call_output"]
    call_id: str
    output: str


InputItem = Union[FunctionCallItem, FunctionCallOutputItem, MessageItem]


class FunctionTool(StrictModel):
    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(StrictModel):
    type: Literal["function"]
    name: str


class TextFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextOptions(StrictModel):
    format: TextFormat | None = None


class ResponsesRequest(_Body):
    model: str
    input: Union[str, list[InputItem]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    text: TextOptions | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedFunction, None] = None
    parallel_tool_calls: bool | None = None
    stream: bool = False
    user: str | None = None
    metadata: dict[str, str] | None = None
    # what a stateless server cannot do, refused when asked for (refused_fields)
    store: bool | None = None
    previous_response_id: str | None = None
    background: bool | None = None
    conversation: Any = None
    include: list[Any] | None = None
    reasoning: Any = None
    truncation: str | None = None

    def refused_fields(self) -> list[str]:
        asked = {"store": self.store is True, "previous_response_id": self.previous_response_id is not None,
                 "background": self.background is True, "conversation": self.conversation is not None,
                 "include": bool(self.include), "reasoning": self.reasoning is not None,
                 "truncation": self.truncation not in (None, "disabled")}
        return [name for name, on in asked.items() if on]

    def to_chat(self) -> ChatCompletionRequest:
        """The chat request this response is generated as."""
        body: dict[str, Any] = {"model": self.model, "messages": self._messages(), "stream": self.stream}
        for ours, theirs in (("max_output_tokens", "max_completion_tokens"), ("temperature", "temperature"),
                             ("top_p", "top_p"), ("parallel_tool_calls", "parallel_tool_calls"), ("user", "user")):
            if getattr(self, ours) is not None:
                body[theirs] = getattr(self, ours)
        fmt = self.text.format if self.text else None
        if fmt is not None and fmt.type == "json_schema":
            body["response_format"] = {"type": "json_schema", "json_schema": {
                k: v for k, v in (("name", fmt.name or "response"), ("schema", fmt.schema_), ("strict", fmt.strict))
                if v is not None}}
        elif fmt is not None:
            body["response_format"] = {"type": fmt.type}
        if self.tools:
            body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                             for t in self.tools]
        if isinstance(self.tool_choice, NamedFunction):
            body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice
        return ChatCompletionRequest.model_validate(body)

    def _messages(self) -> list[dict]:
        out: list[dict] = [{"role": "system", "content": self.instructions}] if self.instructions else []
        items = [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        for item in items:
            if isinstance(item, MessageItem):
                out.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") is not None:
                    out[-1]["tool_calls"].append(call)
                else:
                    out.append({"role": "assistant", "content": None, "tool_calls": [call]})
            else:
                out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        return out
