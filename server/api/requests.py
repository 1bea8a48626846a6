"""The engine Requests of one HTTP request: built here, once, whole.

One Request per (prompt, choice): its prompt ids, SamplingParams (validated by the engine's
own rules: engine/request.py), adapter, constraint, a unique id and its deadline. The
Generation (api/generation.py) submits them as they are.
"""
from __future__ import annotations

import time
import uuid

from server.api import errors
from server.api.protocol import SamplingRequest
from server.api.state import ServerState
from server.engine.prefix_cache import tenant_salt
from server.engine.request import Constraint, Request, SamplingParams, check_fits, choice_seed
from server.structured.spec import default_close_within

# max_tokens of a constrained request that sets none: a JSON value far longer than this is
# almost always a model looping, and the closing budget needs a budget to close within
CONSTRAINED_MAX_TOKENS = 1024


def build_requests(state: ServerState, body: SamplingRequest, prompts: list[list[int]],
                   constraints: list[Constraint], adapter: str | None, request_id: str,
                   cache_scope: str) -> list[Request]:
    """Request i is choice i: prompt p's n choices are p*n .. p*n+n-1; choice i samples with
    seed + i so choices differ. Engine ids stay unique even when clients reuse an x-request-id.
    cache_scope: the caller's prefix-cache namespace (auth.Principal.cache_scope)."""
    limit = state.engine.max_model_len
    requested = body.requested_max_tokens()
    if requested is not None and requested < 1:
        raise errors.invalid(f"max_tokens must be >= 1, got {requested}", "max_tokens")
    prefix = f"{request_id}-{uuid.uuid4().hex[:8]}"
    now = time.monotonic()
    timeout = state.cfg.request_timeout
    salt = tenant_salt(cache_scope, body.cache_salt)
    try:
        bias = body.logit_bias_pairs()
    except ValueError as e:
        raise errors.invalid(str(e), "logit_bias") from e
    vocab = state.engine.tokenizer.vocab_size
    if any(t >= vocab for t, _ in bias):
        raise errors.invalid(f"logit_bias token ids must be in 0..{vocab - 1}", "logit_bias")
    out: list[Request] = []
    for p, ids in enumerate(prompts):
        if not ids:
            raise errors.invalid("prompt must not be empty", "prompt")
        check_fits(len(ids), limit, requested)
        max_tokens = requested if requested is not None else limit - len(ids)
        if requested is None and constraints:
            max_tokens = min(max_tokens, CONSTRAINED_MAX_TOKENS)
        for i in range(body.n):
            index = p * body.n + i
            if constraints and constraints[index].close_within is None:
                constraints[index].close_within = (default_close_within(max_tokens)
                                                   + constraints[index].close_reserve)
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=0 if body.top_k is None else body.top_k,
                frequency_penalty=body.frequency_penalty or 0.0,
                presence_penalty=body.presence_penalty or 0.0,
                repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
                seed=None if body.seed is None else choice_seed(body.seed, index),
                stop=body.stop_strings(), ignore_eos=body.ignore_eos,
                logprobs=body.requested_logprobs(), logit_bias=bias)
            out.append(Request(ids, params, adapter=adapter, constraint=constraints[index] if constraints else None,
                               request_id=f"{prefix}-{index}", arrival=now,
                               deadline=now + timeout if timeout else None, cache_salt=salt))
    return out
