"""Engine: the synchronous step loop (schedule, run, constrain + sample, postprocess).

One Engine owns the model, the KV pool, the scheduler, the adapter store and the sampler;
only one thread may call it (AsyncEngine, in server/engine/async_engine.py, is that thread
for the HTTP server). `generate_cli` is the `loraplex generate` command.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
import sys
import time
from dataclasses import dataclass

import torch

from server.config import EngineConfig
from server.engine.kv_cache import BlockPool, pool_size
from server.engine.request import (FinishReason, Request, RequestOutput, SamplingParams, SamplingParamsError,
                                   TokenLogprob)
from server.engine.runner import Runner
from server.engine.sampler import Sampler, SamplerOutput
from server.engine.scheduler import Scheduler
from server.errors import AdapterError, GrammarError
from server.model.loader import load_model, resolve_model_dir
from server.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)

KV_MEMORY_FRACTION = 0.5   # at most this share of the free device (or host) memory goes to the KV pool


@dataclass
class _Live:
    req: Request
    detok: IncrementalDetokenizer
    completion_tokens: int = 0


@dataclass
class Completion:
    """One finished request, for Engine.generate."""
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    logprobs: list[TokenLogprob] | None
    prompt_tokens: int
    error: str | None = None


def _memory_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * KV_MEMORY_FRACTION)
    return int(_host_available_bytes() * KV_MEMORY_FRACTION)


def _host_available_bytes() -> int:
    """MemAvailable (free + reclaimable page cache); free pages alone undercount on a busy host."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _adapter_store(config: EngineConfig, model: torch.nn.Module, device: torch.device, dtype: torch.dtype):
    try:
        from server.lora.store import AdapterStore
    except ImportError:   # the adapter store is optional: base-model serving needs none of it
        log.warning("server.lora.store is unavailable: adapters are disabled")
        return None
    return AdapterStore(config, model.lora_linears(), device, dtype)


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.resolved_device())
        self.dtype = config.resolved_dtype()
        self.model = load_model(config, self.device, self.dtype)
        self.tokenizer = Tokenizer(resolve_model_dir(config.model))
        arch = self.model.arch
        elem = torch.tensor([], dtype=self.dtype).element_size()
        bytes_per_block = 2 * arch.num_layers * config.block_size * arch.num_kv_heads * arch.head_dim * elem
        num_blocks = pool_size(config, bytes_per_block, _memory_budget(self.device))
        self.model.allocate_kv_cache(num_blocks, config.block_size)
        self.pool = BlockPool(num_blocks, config.block_size)
        # The context a request may reach: the model's (or --max-model-len), and what the pool holds.
        self.max_model_len = min(config.max_model_len or arch.max_position_embeddings,
                                 num_blocks * config.block_size)
        self.store = _adapter_store(config, self.model, self.device, self.dtype)
        self.scheduler = Scheduler(config, self.pool, self.store, self.max_model_len)
        self.runner = Runner(self.model, self.pool, self.store, self.device)
        self.sampler = Sampler(self.device, config.seed)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids | set(arch.eos_token_ids))
        self._live: dict[str, _Live] = {}
        self.overlap_masks = True     # grammar masks fill on _mask_pool during the forward (False: inline)
        self._mask_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
        self.last_step_tokens = 0     # tokens the last step computed (0: nothing could run)
        log.info("engine ready: %d KV blocks x %d tokens, max_model_len %d, device %s",
                 num_blocks, config.block_size, self.max_model_len, self.device)

    # -- requests -------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        """Queue a request. Raises PromptTooLongError, AdapterError (unknown adapter), SamplingParamsError."""
        if req.request_id in self._live:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        if req.adapter is not None and (self.store is None or not self.store.exists(req.adapter)):
            raise AdapterError(f"unknown adapter {req.adapter!r}")
        if not req.prompt_ids:
            raise SamplingParamsError("prompt", "the prompt must have at least one token")
        self.scheduler.add(req)
        req.arrival = req.arrival or time.monotonic()
        self._live[req.request_id] = _Live(req, IncrementalDetokenizer(self.tokenizer, req.prompt_ids,
                                                                        req.params.stop))

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; returns its final output (reason "abort"), None if it is not live."""
        live = self._live.get(request_id)
        if live is None:
            return None
        return self._finish(live, FinishReason.ABORT, [], "", None)

    def has_unfinished(self) -> bool:
        return bool(self._live)

    def live_request_ids(self) -> list[str]:
        return list(self._live)

    def stats(self) -> dict:
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kv_blocks_used": self.pool.num_used, "kv_blocks_total": self.pool.num_blocks,
                "adapters_resident": self._resident_adapters(), "preemptions": self.scheduler.num_preemptions}

    def _resident_adapters(self) -> list[str]:
        if self.store is None:
            return []
        return [a.name for a in self.store.list() if a.tier == "device"]

    # -- one step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.store is not None:
            self.store.poll()
        sched = self.scheduler.schedule()
        outputs = [self._finish(self._live[r.request_id], FinishReason.ABORT, [], "", None, str(e))
                   for r, e in sched.failed]
        self.last_step_tokens = sched.num_tokens
        if not sched.requests:
            return outputs
        rows = [i for i, s in enumerate(sched.sampled) if s]
        reqs = [sched.requests[i] for i in rows]
        masks = self._start_masks(reqs)  # grammar masks fill on a worker thread while the model runs
        logits = self.runner.run(sched)[rows]  # (n, V) only requests that reached their last token
        self._constrain(reqs, logits, masks)
        sampled = self.sampler.sample(logits, [r.params for r in reqs], [r.request_id for r in reqs],
                                      [(r.prompt_ids, r.output_ids) for r in reqs])
        return outputs + self._postprocess(reqs, sampled)

    def _start_masks(self, reqs: list[Request]) -> concurrent.futures.Future | None:
        """Fill the constrained rows' token bitmasks, overlapping the forward when overlap_masks is on.

        Matcher state only changes in _postprocess, so the masks for this step are known before
        the forward; llguidance and torch both release the GIL, so the fill runs alongside it.
        """
        matchers = [r.constraint for r in reqs if r.constraint is not None]
        if not matchers:
            return None
        from server.structured.bitmask import fill_bitmasks
        if self.overlap_masks:
            return self._mask_pool.submit(fill_bitmasks, matchers)
        done: concurrent.futures.Future = concurrent.futures.Future()
        done.set_result(fill_bitmasks(matchers))
        return done

    def _constrain(self, reqs: list[Request], logits: torch.Tensor, masks: concurrent.futures.Future | None) -> None:
        """Mask the logits of grammar-constrained rows to the tokens their grammar allows."""
        if masks is None:
            return
        from server.structured.bitmask import apply_bitmask
        from server.structured.closing import close_row
        rows = [i for i, r in enumerate(reqs) if r.constraint is not None]
        sub = logits[rows]  # (n, V) a copy: masked in place, then written back
        apply_bitmask(sub, masks.result().to(logits.device))  # bitmask (n, ceil(V/32))
        for j, i in enumerate(rows):
            req = reqs[i]
            m = req.constraint
            if m.close_within and req.params.max_tokens - len(req.output_ids) <= m.close_within:
                # inside the closing budget: steer toward ending the JSON value
                close_row(sub[j], m, self.tokenizer.decode(req.output_ids))
        logits[rows] = sub

    def _postprocess(self, reqs: list[Request], sampled: SamplerOutput) -> list[RequestOutput]:
        outputs = []
        for req, tok, lp in zip(reqs, sampled.token_ids, sampled.logprobs):
            live = self._live[req.request_id]
            req.output_ids.append(tok)
            live.completion_tokens += 1
            reason, error = self._finish_reason(req, tok)
            text = "" if reason == FinishReason.STOP and self._is_stop_token(req, tok) else live.detok.push([tok])
            if live.detok.stopped:
                reason = FinishReason.STOP
            lps = [lp] if lp is not None else None
            if reason is not None:
                outputs.append(self._finish(live, reason, [tok], text, lps, error))
            else:
                outputs.append(self._output(live, [tok], text, lps, False))
        return outputs

    def _is_stop_token(self, req: Request, tok: int) -> bool:
        return tok in req.params.stop_token_ids or (not req.params.ignore_eos and tok in self.eos_token_ids)

    def _finish_reason(self, req: Request, tok: int) -> tuple[FinishReason | None, str | None]:
        if self._is_stop_token(req, tok):
            return FinishReason.STOP, None
        if req.constraint is not None:
            try:
                req.constraint.consume(tok)
            except GrammarError as e:
                log.error("request %s: %s", req.request_id, e)
                return FinishReason.ABORT, str(e)
            if req.constraint.is_stopped():
                return FinishReason.STOP, None
        if len(req.output_ids) >= req.params.max_tokens or req.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH, None
        return None, None

    def _finish(self, live: _Live, reason: FinishReason, new_ids: list[int], text: str,
                lps: list[TokenLogprob] | None, error: str | None = None) -> RequestOutput:
        req = live.req
        self.scheduler.finish(req)
        self.sampler.release(req.request_id)
        del self._live[req.request_id]
        req.finish_reason = reason
        if reason != FinishReason.ABORT:
            text += live.detok.flush()
        return self._output(live, new_ids, text, lps, True, error)

    @staticmethod
    def _output(live: _Live, new_ids: list[int], text: str, lps: list[TokenLogprob] | None,
                finished: bool, error: str | None = None) -> RequestOutput:
        req = live.req
        return RequestOutput(req.request_id, new_ids, text, lps, finished, req.finish_reason if finished else None,
                             len(req.prompt_ids), live.completion_tokens, error)

    # -- offline use ----------------------------------------------------------------------
    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams],
                 adapters: list[str | None] | None = None) -> list[Completion]:
        """Run prompts (text, encoded as is, or token ids) to completion; results in prompt order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        adapters = adapters or [None] * len(prompts)
        reqs = []
        for prompt, p, adapter in zip(prompts, params_list, adapters, strict=True):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            reqs.append(Request(ids, p, adapter=adapter))
            self.add_request(reqs[-1])
        done: dict[str, Completion] = {r.request_id: Completion(r.request_id, "", [], None, None,
                                                                 len(r.prompt_ids)) for r in reqs}
        while any(done[r.request_id].finish_reason is None for r in reqs):
            for out in self.step():
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


# AsyncEngine lives in its own file; importable from here too (it imports Engine from this module).
from server.engine.async_engine import AsyncEngine, EngineDeadError  # noqa: E402,F401
