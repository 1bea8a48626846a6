"""Pydantic models of OpenAI function tools: definitions, choices, calls and stream deltas."""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, Field

from server.api.strict import StrictModel

FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"     # OpenAI's rule for function names


class FunctionDef(StrictModel):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None     # a JSON Schema; omitted = no parameters
    strict: bool | None = None                   # every schema is enforced in full either way


class ToolDef(StrictModel):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]


class FunctionCall(StrictModel):
    name: str
    arguments: str            # JSON text, as OpenAI sends it


class ToolCall(StrictModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """One streamed piece of a call: the first carries id, type and name (arguments ""),
    the next ones fragments of the arguments."""
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta
