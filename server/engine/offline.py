"""Running an Engine to completion off the server: the one step loop (`drive`), `generate()`
and `loraplex generate`. `loraplex bench` and the scripts in bench/ drive the engine here too.
"""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import FinishReason, Request, RequestOutput, SamplingParams, TokenLogprob

LOADING_WAIT_S = 0.002     # a step that computed nothing (adapters still loading) lets the loader run

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


@dataclass
class DriveStats:
    wall_s: float = 0.0
    steps: int = 0
    generated: int = 0
    busy: list[float] = field(default_factory=list)   # seconds of each step that computed tokens
    idle_steps: int = 0                               # steps that waited for adapter loads


def drive(engine: Engine, requests: Iterable[Request], in_flight: int,
          on_output: Callable[[RequestOutput], None] | None = None, timeout_s: float | None = None,
          on_step: Callable[[list[RequestOutput]], None] | None = None) -> DriveStats:
    """Add requests in order, keeping at most in_flight unfinished in the engine, and step until
    all of them finish; on_output sees every output, on_step each step's outputs together.
    TimeoutError past timeout_s."""
    pending = iter(requests)
    stats = DriveStats()
    live = 0
    t0 = time.perf_counter()
    while True:
        while live < in_flight and (req := next(pending, None)) is not None:
            engine.add_request(req)
            live += 1
        if live == 0:
            break
        s0 = time.perf_counter()
        outs = engine.step()
        elapsed = time.perf_counter() - s0
        stats.steps += 1
        for out in outs:
            stats.generated += len(out.new_token_ids)
            live -= out.finished
            if on_output is not None:
                on_output(out)
        if on_step is not None:
            on_step(outs)
        if engine.last_step_tokens == 0 and not outs:
            stats.idle_steps += 1
            time.sleep(LOADING_WAIT_S)
        else:
            stats.busy.append(elapsed)
        if timeout_s is not None and time.perf_counter() - t0 > timeout_s:
            raise TimeoutError(f"requests unfinished after {timeout_s:g} s ({stats.steps} steps)")
    stats.wall_s = time.perf_counter() - t0
    return stats


def generate(engine: Engine, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams],
             adapters: list[str | None] | None = None) -> list[Completion]:
    """Run prompts (text, encoded as is, or token ids) to completion; results in prompt order."""
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    adapters = adapters or [None] * len(prompts)
    reqs = [Request(engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt), p, adapter=adapter)
            for prompt, p, adapter in zip(prompts, params_list, adapters, strict=True)]
    done: dict[str, Completion] = {r.request_id: Completion(r.request_id, "", [], None, None,
                                                             len(r.prompt_ids)) for r in reqs}

    def collect(out: RequestOutput) -> None:
        c = done[out.request_id]
        c.text += out.new_text
        c.token_ids += out.new_token_ids
        if out.logprobs is not None:
            c.logprobs = (c.logprobs or []) + out.logprobs
        if out.finished:
            c.finish_reason, c.error = out.finish_reason, out.error
    drive(engine, reqs, len(reqs), collect)
    return [done[r.request_id] for r in reqs]


@dataclass(frozen=True)
class GenerateArgs:
    """What `loraplex generate` asks for, besides the engine's config."""
    prompt: str
    raw: bool = False                 # the prompt as is, without the chat template
    adapter: str | None = None
    max_tokens: int = 128
    temperature: float = 0.0
    seed: int | None = None


def generate_cli(config: EngineConfig, args: GenerateArgs) -> int:
    """`loraplex generate`: the completion on stdout (streamed), logs on stderr."""
    engine = Engine(config)
    tok = engine.tokenizer
    ids = tok.encode(args.prompt) if args.raw else tok.encode_chat([{"role": "user", "content": args.prompt}])
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    req = Request(ids, params, adapter=args.adapter)
    errors: list[str] = []

    def write(out: RequestOutput) -> None:
        sys.stdout.write(out.new_text)
        sys.stdout.flush()
        if out.error:
            errors.append(out.error)
    t0 = time.perf_counter()
    drive(engine, [req], 1, write)
    if errors:
        log.error("generation failed: %s", errors[0])
        return 1
    sys.stdout.write("\n")
    n = len(req.output_ids)
    dt = time.perf_counter() - t0
    log.info("%d prompt + %d completion tokens in %.2f s (%.1f tokens/s), finish: %s",
             len(ids), n, dt, n / max(dt, 1e-9), req.finish_reason.value if req.finish_reason else None)
    return 0
