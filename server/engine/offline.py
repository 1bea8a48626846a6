"""Running an Engine to completion off the server: `generate()` and `loraplex generate`."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass

from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import FinishReason, Request, SamplingParams, TokenLogprob

log = logging.getLogger(__name__)


@dataclass
class Completion:
    """One finished request, for generate()."""
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    logprobs: list[TokenLogprob] | None
    prompt_tokens: int
    error: str | None = None


def generate(engine: Engine, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams],
             adapters: list[str | None] | None = None) -> list[Completion]:
    """Run prompts (text, encoded as is, or token ids) to completion; results in prompt order."""
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    adapters = adapters or [None] * len(prompts)
    reqs = []
    for prompt, p, adapter in zip(prompts, params_list, adapters, strict=True):
        ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        reqs.append(Request(ids, p, adapter=adapter))
        engine.add_request(reqs[-1])
    done: dict[str, Completion] = {r.request_id: Completion(r.request_id, "", [], None, None,
                                                             len(r.prompt_ids)) for r in reqs}
    while any(done[r.request_id].finish_reason is None for r in reqs):
        for out in engine.step():
            c = done[out.request_id]
            c.text += out.new_text
            c.token_ids += out.new_token_ids
            if out.logprobs is not None:
                c.logprobs = (c.logprobs or []) + out.logprobs
            if out.finished:
                c.finish_reason, c.error = out.finish_reason, out.error
    return [done[r.request_id] for r in reqs]


def generate_cli(config: EngineConfig, args: argparse.Namespace) -> int:
    """`loraplex generate`: the completion on stdout (streamed), logs on stderr."""
    engine = Engine(config)
    tok = engine.tokenizer
    ids = tok.encode(args.prompt) if args.raw else tok.encode_chat([{"role": "user", "content": args.prompt}])
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    req = Request(ids, params, adapter=args.adapter)
    engine.add_request(req)
    t0 = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
            if out.error:
                log.error("generation failed: %s", out.error)
                return 1
    sys.stdout.write("\n")
    n = len(req.output_ids)
    dt = time.perf_counter() - t0
    log.info("%d prompt + %d completion tokens in %.2f s (%.1f tokens/s), finish: %s",
             len(ids), n, dt, n / max(dt, 1e-9), req.finish_reason.value if req.finish_reason else None)
    return 0
