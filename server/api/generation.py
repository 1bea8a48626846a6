"""Generation: the engine requests of one HTTP request (n choices x prompts), merged.

Each choice is one engine Request; their output streams are merged into one stream of
ChoiceDelta in arrival order. Closing the stream (client gone, handler cancelled) cancels
every choice, which closes its engine iterator and so aborts it (KV blocks and the
adapter pin are released by the engine). Latency and token metrics are recorded here.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator

from server.api import errors
from server.api.state import ServerState
from server.engine.request import ErrorKind, Request, RequestOutput, TokenLogprob

log = logging.getLogger("loraplex.api")
_DONE = object()


@dataclass
class ChoiceDelta:
    index: int
    text: str
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None       # set on the choice's last delta


class Generation:
    def __init__(self, state: ServerState, adapter: str | None, choices: list[Request],
                 request_id: str) -> None:
        """choices: the engine Requests, fully built (api/requests.py); choice i is choices[i]."""
        self.state = state
        self.adapter = adapter
        self.label = adapter or state.base_id
        self.choices = choices
        self.request_id = request_id
        self.prompt_tokens = 0          # summed over distinct prompts (n copies counted once)
        self.completion_tokens = 0
        self.cached_tokens = 0          # of prompt_tokens, served from the prefix cache
        self._prompt_seen: set[int] = set()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._reserved: set[int] = set()    # choices holding a waiting place (no token yet)
        self._unrouted = set(range(len(choices)))   # choices whose replica is not known yet
        self._routed = asyncio.Event()
        self._start = time.monotonic()

    @property
    def replica(self) -> str:
        """The replicas that took the choices (comma-separated, in choice order; "" before start)."""
        return ",".join(dict.fromkeys(r.served_by for r in self.choices if r.served_by))

    async def start(self) -> None:
        """Submit every choice, and return once each has a replica (or has ended): the response's
        headers name them. Idempotent; stream() starts the choices itself if this was not called."""
        self._submit()
        if self._unrouted:
            await self._routed.wait()

    def _submit(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._run(i, r)) for i, r in enumerate(self.choices)]

    def _mark_routed(self, index: int) -> None:
        self._unrouted.discard(index)
        if not self._unrouted:
            self._routed.set()

    def reserve(self) -> None:
        """Take a waiting place per choice (429 when the queue is full); call before responding."""
        self.state.admit(len(self.choices))
        self._reserved = set(range(len(self.choices)))

    def close(self) -> None:
        """Abort unfinished choices and give back waiting places; idempotent, never awaits.

        No awaits: under a cancelled scope (client gone) every await raises again. Cancelling a
        choice's task closes its engine stream, which aborts the engine request. The HTTP layer
        also calls this when the response ends, in case the stream was never iterated.
        """
        for t in self._tasks:
            t.cancel()
        for index in list(self._reserved):
            self._release(index)

    def _release(self, index: int) -> None:
        if index in self._reserved:
            self._reserved.discard(index)
            self.state.release()

    async def stream(self) -> AsyncIterator[ChoiceDelta]:
        """Deltas of every choice as they come; the last delta of a choice has finish_reason."""
        assert self._reserved or not self.choices or self._tasks, "reserve() before stream()"
        self._submit()
        status = "error"
        try:
            remaining = len(self._tasks)
            while remaining:
                item = await self._queue.get()
                if item is _DONE:
                    remaining -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield item
            status = "ok"
        except (asyncio.CancelledError, GeneratorExit):
            status = "aborted"
            raise
        finally:
            self.close()
            m = self.state.metrics
            m.requests.labels(self.label, status).inc()
            m.prompt_tokens.labels(self.label).inc(self.prompt_tokens)
            m.generation_tokens.labels(self.label).inc(self.completion_tokens)
            m.cached_prompt_tokens.labels(self.label).inc(self.cached_tokens)
            m.e2e.labels(self.label).observe(time.monotonic() - self._start)

    async def collect(self) -> dict[int, ChoiceDelta]:
        """The whole output of every choice (texts and logprobs joined), by choice index."""
        out: dict[int, ChoiceDelta] = {i: ChoiceDelta(i, "", None, None) for i in range(len(self.choices))}
        async with contextlib.aclosing(self.stream()) as deltas:
            async for d in deltas:
                acc = out[d.index]
                acc.text += d.text
                if d.logprobs is not None:
                    acc.logprobs = (acc.logprobs or []) + d.logprobs
                if d.finish_reason is not None:
                    acc.finish_reason = d.finish_reason
        return out

    async def _run(self, index: int, req: Request) -> None:
        engine = self.state.engine
        waiting = True
        last = time.monotonic()
        m = self.state.metrics
        try:
            async with contextlib.aclosing(engine.generate(req)) as outputs:
                if req.served_by:
                    self._mark_routed(index)
                async for out in outputs:
                    self._mark_routed(index)
                    if not (out.new_token_ids or out.new_text or out.finished):
                        continue        # a remote replica's first word: it took the request
                    now = time.monotonic()
                    if waiting and (out.new_token_ids or out.finished):
                        waiting = False
                        self._release(index)
                        m.ttft.labels(self.label).observe(now - self._start)
                    elif out.new_token_ids:
                        m.inter_token.labels(self.label).observe(now - last)
                    last = now
                    self._account(req, out)
                    if out.error:
                        raise self._error(out)
                    self._queue.put_nowait(ChoiceDelta(
                        index, out.new_text, out.logprobs,
                        out.finish_reason.value if out.finished and out.finish_reason else
                        ("stop" if out.finished else None)))
                    if out.finished:
                        break
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # handed to the consumer, which raises it in its context
            self._queue.put_nowait(e)
        finally:
            self._mark_routed(index)
            self._release(index)
            self._queue.put_nowait(_DONE)

    def _error(self, out: RequestOutput) -> errors.APIError:
        """The client's error for an engine request that failed (other requests are unaffected)."""
        if out.error_kind == ErrorKind.TIMEOUT:
            return errors.APIError(504, f"the request ran past the server's request timeout of "
                                   f"{self.state.cfg.request_timeout:g} s", "server_error", None, "request_timeout")
        if out.error_kind == ErrorKind.ADAPTER:    # the adapter's own message names only it
            return errors.APIError(500, f"generation failed: {out.error}", "server_error", None, "adapter_failed")
        log.error("request %s: generation failed: %s", self.request_id, out.error)
        return errors.APIError(500, f"generation failed (request id {self.request_id})", "server_error", None,
                               "generation_failed")

    def _account(self, req: Request, out: RequestOutput) -> None:
        key = id(req.prompt_ids)           # the n choices of one prompt share its id list
        if key not in self._prompt_seen:
            self._prompt_seen.add(key)
            self.prompt_tokens += out.prompt_tokens
            self.cached_tokens += out.cached_tokens
        self.completion_tokens += len(out.new_token_ids)
