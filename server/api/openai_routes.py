"""/v1/chat/completions, /v1/completions, /v1/models.

Everything that can fail with a 4xx (auth, model, parameters, prompt length, grammar,
queue) is checked before the response starts, so a stream never opens on a bad request.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging

import jinja2
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.api import errors
from server.api.auth import Principal
from server.api.generation import Generation
from server.api.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion,
                                 ChatCompletionChunk, ChatCompletionRequest, ChatDelta, Completion,
                                 CompletionChoice, CompletionRequest, ModelCard, ModelList, PromptTokensDetails, Usage,
                                 SamplingRequest)
from server.api.render import SSE_DONE, TokenText, chat_logprobs, completion_logprobs, sse
from server.api.requests import build_requests
from server.api.state import ServerState, valid_adapter_name
from server.api.tool_calls import StreamedCalls, active_tools, template_inputs, tool_spec, whole_output
from server.errors import ModelLoadError
from server.structured.grammar import new_matcher, parse_constraint
from server.structured.spec import CLOSABLE

log = logging.getLogger("loraplex.api")
router = APIRouter()
_DISCONNECT_POLL_S = 0.5


def _state(request: Request) -> ServerState:
    return request.app.state.server


async def resolve_model(state: ServerState, who: Principal, model: str) -> str | None:
    """The adapter a request's `model` names (None = base); 404 when missing or not this tenant's."""
    if state.is_base(model):
        return None
    if not valid_adapter_name(model) or not who.may_use(model) or not await state.engine.adapter_exists(model):
        raise errors.model_not_found(model)
    return model


async def _constraints(state: ServerState, body: SamplingRequest, count: int) -> list:
    """One matcher per choice, or [] when the request has no constraint."""
    spec = tool_spec(body) if isinstance(body, ChatCompletionRequest) else None
    if spec is None:
        spec = parse_constraint(body.response_format, body.structured_outputs)
    if spec is None:
        return []
    compiled = await state.compiler.compile_async(spec)
    # an unset closing budget is resolved from each request's max_tokens (api/requests.py)
    close = spec.close_within if spec.close_within is not None or spec.kind in CLOSABLE else 0
    return [new_matcher(compiled, close) for _ in range(count)]


def _check_fields(body: SamplingRequest) -> None:
    """400 for fields given with a value this server does not implement (never ignored)."""
    refused = body.refused_fields()
    if refused:
        raise errors.invalid(f"{refused[0]} is not supported by this server", refused[0], "unsupported_parameter")
    if isinstance(body, ChatCompletionRequest) and body.top_logprobs is not None and not body.logprobs:
        raise errors.invalid("top_logprobs requires logprobs: true", "top_logprobs")


def _check_length(state: ServerState, chars: int, param: str) -> None:
    """413 at once for text that cannot fit the context whatever it tokenizes to: no token
    covers more than tokenizer.max_token_chars characters (twice that, for margin)."""
    limit = state.engine.max_model_len
    if chars > 2 * limit * state.engine.tokenizer.max_token_chars:
        raise errors.APIError(413, f"the {param} has {chars} characters, far more than this model's context of "
                              f"{limit} tokens can hold", "invalid_request_error", param, "context_length_exceeded")


async def prepare(request: Request, body: SamplingRequest, prompts_of, chars: int,
                   param: str) -> tuple[ServerState, Generation]:
    """Check everything cheap first, then tokenize (off the event loop) and compile the grammar.
    chars: the characters of text the prompt holds (for the early length check)."""
    state = _state(request)
    who = state.principal(request)
    engine = state.require_ready()
    adapter = await resolve_model(state, who, body.model)
    if not (1 <= body.n <= state.cfg.max_n):
        raise errors.invalid(f"n must be in 1..{state.cfg.max_n}, got {body.n}", "n")
    _check_fields(body)
    _check_length(state, chars, param)
    prompts = await asyncio.to_thread(prompts_of, engine.tokenizer)   # templating and tokenizing
    constraints = await _constraints(state, body, len(prompts) * body.n)
    rid = request.state.request_id
    gen = Generation(state, adapter, build_requests(state, body, prompts, constraints, adapter, rid,
                                                               who.cache_scope), rid)
    gen.reserve()
    request.state.generation = gen    # RequestGate closes it when the response ends, whatever happened
    await gen.start()                 # submitted: the headers can name the replica
    return state, gen


async def until_disconnect(request: Request, work: asyncio.Task):
    """Await `work`; cancel it (aborting the engine requests) if the client goes away first."""
    while True:
        done, _ = await asyncio.wait({work}, timeout=_DISCONNECT_POLL_S)
        if done:
            return work.result()
        if await request.is_disconnected():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            raise errors.APIError(499, "client closed the request", "invalid_request_error")


def _usage(gen: Generation) -> Usage:
    return Usage(prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens,
                 total_tokens=gen.prompt_tokens + gen.completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=gen.cached_tokens))


async def _sse(gen: Generation, first: list[str], chunk_of, usage_chunk) -> AsyncIterator[str]:
    for line in first:
        yield line
    try:
        async with contextlib.aclosing(gen.stream()) as deltas:
            async for d in deltas:
                yield chunk_of(d)
    except Exception as e:  # the stream has started: report in-band, then end it
        err = errors.from_exception(e) or errors.internal_error(e, gen.request_id)
        yield sse(err.body())
        yield SSE_DONE
        return
    if usage_chunk is not None:
        yield usage_chunk(_usage(gen))
    yield SSE_DONE


def stream_response(lines: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(lines, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def chat_chars(body: ChatCompletionRequest) -> int:
    """The characters of text a chat request's prompt holds: messages, their calls, the tools."""
    return (sum(len(m.text()) + len(m.model_dump_json(include={"tool_calls"})) for m in body.messages)
            + sum(len(t.model_dump_json()) for t in body.tools or []))


def encode_chat(tok, body: ChatCompletionRequest) -> list[int]:
    messages, tools = template_inputs(body, tok.template_takes_tools)
    try:
        return tok.encode_chat(messages, tools)
    except (jinja2.TemplateError, ModelLoadError) as e:   # e.g. roles the template refuses
        raise errors.invalid(f"the model's chat template cannot render these messages: {e}", "messages") from e


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state, gen = await prepare(request, body, lambda tok: [encode_chat(tok, body)], chat_chars(body), "messages")
    text = TokenText(state.engine.tokenizer.hf)
    rid = f"chatcmpl-{gen.request_id}"
    tools_on = active_tools(body)[1] != "none"
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        streams = {i: StreamedCalls() for i in range(len(gen.choices))} if tools_on else {}

        def chunk(d):
            if not tools_on:
                delta = ChatDelta(content=d.text) if d.text else ChatDelta()
                return sse(ChatCompletionChunk(id=rid, model=gen.label, choices=[ChatChunkChoice(
                    index=d.index, delta=delta, logprobs=chat_logprobs(text, d.logprobs),
                    finish_reason=d.finish_reason)]))
            calls = streams[d.index]
            deltas = calls.deltas(d.text, d.finish_reason is not None)
            if not deltas and (d.logprobs or d.finish_reason is not None):
                deltas = [ChatDelta()]
            last = len(deltas) - 1
            return "".join(sse(ChatCompletionChunk(id=rid, model=gen.label, choices=[ChatChunkChoice(
                index=d.index, delta=delta, logprobs=chat_logprobs(text, d.logprobs) if k == 0 else None,
                finish_reason=calls.finish_reason(d.finish_reason) if k == last else None)]))
                for k, delta in enumerate(deltas))
        first = [sse(ChatCompletionChunk(id=rid, model=gen.label, choices=[
            ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))]))
            for i in range(len(gen.choices))]
        usage = (lambda u: sse(ChatCompletionChunk(id=rid, model=gen.label, choices=[], usage=u))) \
            if include_usage else None
        return stream_response(_sse(gen, first, chunk, usage))
    out = await until_disconnect(request, asyncio.create_task(gen.collect()))
    choices = []
    for i, d in sorted(out.items()):
        content, calls, reason = whole_output(d.text, d.finish_reason) if tools_on else (d.text, None, d.finish_reason)
        choices.append(ChatChoice(index=i, message=AssistantMessage(content=content, tool_calls=calls),
                                  logprobs=chat_logprobs(text, d.logprobs), finish_reason=reason))
    return JSONResponse(ChatCompletion(id=rid, model=gen.label, choices=choices, usage=_usage(gen)).model_dump())


def _completion_prompts(body: CompletionRequest):
    p = body.prompt

    def prompts(tok) -> list[list[int]]:
        if isinstance(p, str):
            return [tok.encode(p)]
        if not p:
            raise errors.invalid("prompt must not be empty", "prompt")
        if all(isinstance(x, str) for x in p):
            return [tok.encode(x) for x in p]
        lists = [p] if all(isinstance(x, int) for x in p) else p
        for ids in lists:
            if any(not (0 <= t < tok.vocab_size) for t in ids):
                raise errors.invalid(f"prompt token ids must be in 0..{tok.vocab_size - 1}", "prompt")
        return [list(ids) for ids in lists]
    return prompts


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    p = body.prompt
    chars = len(p) if isinstance(p, str) else sum(len(x) for x in p if isinstance(x, str))
    state, gen = await prepare(request, body, _completion_prompts(body), chars, "prompt")
    text = TokenText(state.engine.tokenizer.hf)
    rid = f"cmpl-{gen.request_id}"
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        offsets = dict.fromkeys(range(len(gen.choices)), 0)

        def chunk(d):
            lp = completion_logprobs(text, d.logprobs, offsets[d.index])
            offsets[d.index] += len(d.text)
            return sse(Completion(id=rid, model=gen.label, choices=[CompletionChoice(
                index=d.index, text=d.text, logprobs=lp, finish_reason=d.finish_reason)]))
        usage = (lambda u: sse(Completion(id=rid, model=gen.label, choices=[], usage=u))) \
            if include_usage else None
        return stream_response(_sse(gen, [], chunk, usage))
    out = await until_disconnect(request, asyncio.create_task(gen.collect()))
    choices = [CompletionChoice(index=i, text=d.text, logprobs=completion_logprobs(text, d.logprobs, 0),
                                finish_reason=d.finish_reason) for i, d in sorted(out.items())]
    return JSONResponse(Completion(id=rid, model=gen.label, choices=choices, usage=_usage(gen)).model_dump())


async def _model_cards(state: ServerState, who: Principal) -> list[ModelCard]:
    cards = [ModelCard(id=state.base_id, root=state.base_id)]
    for info in await state.engine.adapter_infos():
        if who.may_use(info.name):
            cards.append(ModelCard(id=info.name, root=info.name, parent=state.base_id))
    return cards


@router.get("/v1/models")
async def list_models(request: Request):
    state = _state(request)
    who = state.principal(request)
    state.require_ready()
    return JSONResponse(ModelList(data=await _model_cards(state, who)).model_dump())


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    state = _state(request)
    who = state.principal(request)
    state.require_ready()
    for card in await _model_cards(state, who):
        if card.id == model_id or (state.is_base(model_id) and card.parent is None):
            return JSONResponse(card.model_dump())
    raise errors.model_not_found(model_id)
