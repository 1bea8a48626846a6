"""The structured-output clients people use, against a live server: instructor and LangChain.

Each must return an object that validates against its pydantic model, on the base model and
through an adapter (tools mode and JSON-schema mode alike). LangChain's json_mode sends no
schema, so it is held to returning parseable JSON only.
"""
from __future__ import annotations

import json

import instructor
import openai
import pytest
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tests.e2e.conftest import KEYS

TEXT = "Extract the contact: Jane Roe, jane@example.com, 34 years old."
MODELS = ["base", "acme-support"]


class Contact(BaseModel):
    name: str = Field(max_length=40)
    email: str = Field(max_length=60)
    age: int


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key=KEYS["admin"], max_retries=0, timeout=120)


def _chat(live_server, model: str) -> ChatOpenAI:
    return ChatOpenAI(base_url=live_server.url + "/v1", api_key=KEYS["admin"], model=model, temperature=0,
                      max_tokens=100, max_retries=0, timeout=120)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("mode", [instructor.Mode.TOOLS, instructor.Mode.JSON_SCHEMA])
def test_instructor(client, model, mode):
    ic = instructor.from_openai(client, mode=mode)
    got = ic.chat.completions.create(model=model, response_model=Contact, max_retries=0, temperature=0,
                                     max_tokens=100, messages=[{"role": "user", "content": TEXT}])
    assert isinstance(got, Contact)
    Contact.model_validate(got.model_dump())


@pytest.mark.parametrize("model", MODELS)
def test_langchain_bind_tools_with_tool_choice(live_server, model):
    msg = _chat(live_server, model).bind_tools([add], tool_choice="add").invoke("What is 2 plus 3?")
    assert len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call["name"] == "add" and call["id"].startswith("call_")
    assert add.invoke(call["args"]) == call["args"]["a"] + call["args"]["b"]   # the args fit the tool


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_langchain_with_structured_output(live_server, model, method):
    got = _chat(live_server, model).with_structured_output(Contact, method=method).invoke(TEXT)
    assert isinstance(got, Contact)


def test_langchain_json_mode_returns_parseable_json(live_server):
    out = _chat(live_server, "base").with_structured_output(None, method="json_mode", include_raw=True).invoke(
        TEXT + " Reply in JSON.")
    assert isinstance(json.loads(out["raw"].content), dict)
