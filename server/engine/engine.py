"""Engine: the synchronous step loop (schedule, run, constrain + sample, postprocess).

One Engine owns the model, the KV pool, the scheduler, the adapter store and the sampler;
only one thread may call it (AsyncEngine, in server/engine/async_engine.py, is that thread
for the HTTP server; server/engine/offline.py runs it to completion for `loraplex generate`).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from server.config import EngineConfig
from server.engine.kv_cache import BlockPool, pool_size
from server.engine.request import (ErrorKind, FinishReason, Request, RequestOutput, SamplingParams, SamplingParamsError,
                                   TokenLogprob)
from server.engine import isolation
from server.engine.client import EngineSnapshot
from server.engine.constrain import ConstraintStage
from server.engine.runner import Runner
from server.engine.sampler import Sampler, apply_logit_bias
from server.engine.scheduler import Scheduler
from server.errors import AdapterError, GrammarError
from server.lora.store import AdapterStore
from server.model.loader import load_model, resolve_model_dir
from server.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)

KV_MEMORY_FRACTION = 0.5   # at most this share of the free device (or host) memory goes to the KV pool


@dataclass
class _Live:
    req: Request
    detok: IncrementalDetokenizer
    completion_tokens: int = 0


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


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.resolved_device())
        self.dtype = config.resolved_dtype()
        self.model = load_model(config, self.device, self.dtype)
        model_dir = resolve_model_dir(config.model)
        self.tokenizer = Tokenizer(model_dir)
        arch = self.model.arch
        elem = torch.tensor([], dtype=self.dtype).element_size()
        bytes_per_block = 2 * arch.num_layers * config.block_size * arch.num_kv_heads * arch.head_dim * elem
        num_blocks = pool_size(config, bytes_per_block, _memory_budget(self.device))
        self.model.allocate_kv_cache(num_blocks, config.block_size)
        self.pool = BlockPool(num_blocks, config.block_size, config.prefix_cache_blocks)
        # The context a request may reach: the model's (or --max-model-len), and what the pool holds.
        self.max_model_len = min(config.max_model_len or arch.max_position_embeddings,
                                 num_blocks * config.block_size)
        self.store = AdapterStore(config, self.model.lora_linears(), self.device, self.dtype, model_dir)
        # The base in every prefix-cache key: fixed for this process, named for clarity.
        base_key = f"{model_dir}|{config.quantization}|{self.dtype}"
        self.scheduler = Scheduler(config, self.pool, self.store, self.max_model_len, base_key)
        self.runner = Runner(self.model, self.pool, self.store, self.device)
        if config.compiles():
            self._compile_decode_step()
        self.sampler = Sampler(self.device, config.seed)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids | set(arch.eos_token_ids))
        self._live: dict[str, _Live] = {}
        self.constraints = ConstraintStage(lambda req: self._live[req.request_id].detok.text)
        self.last_step_tokens = 0     # tokens the last step computed (0: nothing could run)
        log.info("engine ready: %d KV blocks x %d tokens, max_model_len %d, device %s",
                 num_blocks, config.block_size, self.max_model_len, self.device)

    def _compile_decode_step(self) -> None:
        """The compiled decode step, compiled now (before any request) in a borrowed KV block."""
        from server.model import compiled
        scratch = self.pool.allocate(1)
        try:
            log.info("decode step: %s", compiled.enable(self.model, scratch[0]))
        finally:
            self.pool.free(scratch)

    # -- requests -------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        """Queue a request. Raises PromptTooLongError, AdapterError (unknown adapter), SamplingParamsError."""
        if req.request_id in self._live:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        if req.adapter is not None and not self.store.exists(req.adapter):
            raise AdapterError(f"unknown adapter {req.adapter!r}")
        if not req.prompt_ids:
            raise SamplingParamsError("prompt", "the prompt must have at least one token")
        vocab = self.tokenizer.vocab_size
        bad = next((t for t, _ in req.params.logit_bias if t >= vocab), None)
        if bad is not None:
            raise SamplingParamsError("logit_bias", f"logit_bias token ids must be in 0..{vocab - 1}, got {bad}")
        live = _Live(req, IncrementalDetokenizer(self.tokenizer, req.prompt_ids, req.params.stop))
        self.sampler.register(req.request_id, req.params.seed)
        try:
            self.scheduler.add(req)
        except BaseException:
            self.sampler.release(req.request_id)
            raise
        req.arrival = req.arrival or time.monotonic()
        self._live[req.request_id] = live

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

    def snapshot(self) -> EngineSnapshot:
        """Counters the engine already keeps, at this instant (engine thread; no disk access)."""
        sched = self.scheduler
        return EngineSnapshot(
            running=len(sched.running), waiting=len(sched.waiting), kv_blocks_total=self.pool.num_blocks,
            kv_blocks_used=self.pool.num_used, max_loras=self.config.max_loras,
            device_slots_used=self.store.device_slots_used(),
            running_adapters=tuple(r.adapter for r in sched.running if r.adapter),
            waiting_adapters=tuple(r.adapter for r in sched.waiting if r.adapter),
            preemptions=sched.num_preemptions, adapter_counters=self.store.counters(),
            prefix_cache_queries=dict(sched.cache_queries), prefix_cache_hits=dict(sched.cache_hits),
            kv_blocks_cached=self.pool.num_cached)

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (engine thread); the number of blocks that were cached."""
        n = self.scheduler.reset_cache()
        log.info("prefix cache reset: %d blocks dropped", n)
        return n

    # -- one step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One scheduling step. A request whose own work fails ends alone, with its error
        (server/engine/isolation.py); EngineFatalError when the failure is nobody's fault."""
        self.store.poll()
        outputs = self._expire()
        sched = self.scheduler.schedule()
        outputs += [self._fail(r, e, ErrorKind.ADAPTER) for r, e in sched.failed]
        self.last_step_tokens = sched.num_tokens
        if not sched.requests:
            return outputs
        constrained = [r for r, s in zip(sched.requests, sched.sampled) if s and r.constraint is not None]
        filling = self.constraints.start(constrained)  # masks fill on a worker thread while the model runs
        sched, logits, culprits = isolation.forward(self.runner.run, sched)   # logits (B, V)
        self.scheduler.commit(sched.requests)   # their K/V are written: cache their full blocks
        outputs += [self._fail(r, isolation.describe("forward", e)) for r, e in culprits]
        rows = [i for i, s in enumerate(sched.sampled) if s]
        if not rows:
            return outputs
        reqs = [sched.requests[i] for i in rows]
        with torch.inference_mode():  # the logits are the forward's inference tensors, changed in place
            if len(rows) < len(sched.requests):
                logits = logits[rows]  # (n, V) only requests that reached their last token (a copy)
            if any(r.params.logit_bias for r in reqs):
                apply_logit_bias(logits, [r.params for r in reqs])   # before the grammar mask
            reqs, logits, failed = self.constraints.apply(reqs, logits, self.constraints.rows(constrained, filling))
            outputs += [self._fail(r, e) for r, e in failed]
            sampled, failures = isolation.batched(lambda idx: self._sample(reqs, logits, idx),
                                                  list(range(len(reqs))), "sampling")
        outputs += [self._fail(reqs[i], isolation.describe("sampling", e)) for i, e in failures.items()]
        return outputs + self._postprocess([(r, s) for r, s in zip(reqs, sampled) if s is not None])

    def _sample(self, reqs: list[Request], logits: torch.Tensor, idx: list[int]) -> list[tuple]:
        """Sample rows idx of logits -> [(token, logprob)] in that order."""
        part = [reqs[i] for i in idx]
        rows = logits if len(idx) == len(reqs) else logits[idx]
        out = self.sampler.sample(rows, [r.params for r in part], [r.request_id for r in part],
                                  [(r.prompt_ids, r.output_ids) for r in part])
        return list(zip(out.token_ids, out.logprobs))

    def _expire(self) -> list[RequestOutput]:
        """End requests past their deadline (Request.deadline, from --request-timeout)."""
        now = time.monotonic()
        late = [live for live in self._live.values() if live.req.deadline is not None and live.req.deadline <= now]
        return [self._fail(live.req, "the request ran past its deadline", ErrorKind.TIMEOUT) for live in late]

    def _postprocess(self, sampled: list[tuple[Request, tuple]]) -> list[RequestOutput]:
        outputs = []
        for req, (tok, lp) in sampled:
            live = self._live[req.request_id]
            try:
                outputs.append(self._advance(live, tok, lp))
            except Exception as e:   # this request's grammar advance or detokenizing
                isolation.fatal_if_device(e, "postprocess")
                log.error("request %s: postprocess failed: %r", req.request_id, e)
                outputs.append(self._fail(req, isolation.describe("postprocess", e)))
        return outputs

    def _advance(self, live: _Live, tok: int, lp: TokenLogprob | None) -> RequestOutput:
        req = live.req
        req.output_ids.append(tok)
        live.completion_tokens += 1
        complete, error = self._consume(req, tok)
        reason = FinishReason.ABORT if error else self._finish_reason(req, tok, complete)
        text = "" if reason == FinishReason.STOP and self._is_stop_token(req, tok) else live.detok.push([tok])
        if live.detok.stopped:
            reason = FinishReason.STOP
        lps = [lp] if lp is not None else None
        if reason is not None:
            return self._finish(live, reason, [tok], text, lps, error)
        return self._output(live, [tok], text, lps, False)

    def _fail(self, req: Request, error: str | BaseException, kind: ErrorKind = ErrorKind.INTERNAL
              ) -> RequestOutput:
        """End one request now with an error; the rest of the step goes on."""
        message = error if isinstance(error, str) else str(error)
        live = self._live.get(req.request_id)
        if live is None:          # it had already ended when its failure surfaced
            return RequestOutput(req.request_id, [], "", None, True, FinishReason.ABORT, len(req.prompt_ids),
                                 len(req.output_ids), message, kind, req.cached_tokens or 0)
        out = self._finish(live, FinishReason.ABORT, [], "", None, message)
        out.error_kind = kind
        return out

    def _is_stop_token(self, req: Request, tok: int) -> bool:
        return tok in req.params.stop_token_ids or (not req.params.ignore_eos and tok in self.eos_token_ids)

    def _consume(self, req: Request, tok: int) -> tuple[bool, str | None]:
        """Advance the request's constraint by tok (not by a token that ends the request)
        -> (the grammar is complete, the error if the grammar refused tok)."""
        if req.constraint is None or self._is_stop_token(req, tok):
            return False, None
        try:
            req.constraint.consume(tok)
        except GrammarError as e:
            log.error("request %s: %s", req.request_id, e)
            return False, str(e)
        return req.constraint.is_stopped(), None

    def _finish_reason(self, req: Request, tok: int, grammar_complete: bool) -> FinishReason | None:
        if self._is_stop_token(req, tok) or grammar_complete:
            return FinishReason.STOP
        if len(req.output_ids) >= req.params.max_tokens or req.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, live: _Live, reason: FinishReason, new_ids: list[int], text: str,
                lps: list[TokenLogprob] | None, error: str | None = None) -> RequestOutput:
        req = live.req
        self.scheduler.finish(req)
        self.sampler.release(req.request_id)
        del self._live[req.request_id]
        req.finish_reason = reason
        if reason != FinishReason.ABORT:
            try:
                text += live.detok.flush()
            except Exception as e:   # this request's detokenizing: it ends with the error instead
                isolation.fatal_if_device(e, "detokenize")
                req.finish_reason, error = FinishReason.ABORT, isolation.describe("detokenize", e)
        return self._output(live, new_ids, text, lps, True, error)

    @staticmethod
    def _output(live: _Live, new_ids: list[int], text: str, lps: list[TokenLogprob] | None,
                finished: bool, error: str | None = None) -> RequestOutput:
        req = live.req
        return RequestOutput(req.request_id, new_ids, text, lps, finished, req.finish_reason if finished else None,
                             len(req.prompt_ids), live.completion_tokens, error,
                             ErrorKind.INTERNAL if error is not None else None, req.cached_tokens or 0)

