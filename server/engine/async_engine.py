"""AsyncEngine: one daemon thread owns the Engine and loops on step(); asyncio callers stream.

Everything that touches the Engine runs on that thread: adds, aborts and `run_on_loop`
callables go through a thread-safe inbox and are drained before each step. Each request's
outputs come back to its caller's event loop through an asyncio.Queue
(loop.call_soon_threadsafe). Leaving `generate`'s iterator early (break, cancel, aclose)
aborts the request.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from server.engine.isolation import EngineFatalError
from server.engine.request import ErrorKind, Request, RequestOutput

if TYPE_CHECKING:
    from server.engine.engine import Engine

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05      # how long the loop sleeps when there is nothing to do
STALLED_WAIT_S = 0.002  # ... and when requests wait but none could run (adapters loading)
MAX_FAILED_STEPS = 3    # this many failing steps in a row: the engine is broken, not a request


class EngineDeadError(RuntimeError):
    """The engine thread stopped (shutdown, or a step raised); no more requests are served."""


class AsyncEngine:
    def __init__(self, engine: "Engine") -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self._dead: BaseException | None = None
        self._failed_steps = 0
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    # -- the engine thread ----------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stopping:
                self._drain_inbox()
                if not self.engine.has_unfinished():
                    self._wake.wait(IDLE_WAIT_S)
                    self._wake.clear()
                    continue
                for out in self._step():
                    self._deliver(out)
                if self.engine.last_step_tokens == 0:
                    self._wake.wait(STALLED_WAIT_S)
                    self._wake.clear()
        except BaseException as e:  # EngineFatalError (or a bug): fail every stream rather than hang them
            log.critical("engine loop died: %r", e, exc_info=not isinstance(e, EngineFatalError))
            self._dead = e
        finally:
            self._close_streams()

    def _step(self) -> list[RequestOutput]:
        """engine.step(). A request's own failure never reaches here (the step isolates it).
        EngineFatalError (nobody's fault: device, memory) ends the loop and so the engine. Any
        other exception is a bug: every live request ends with the error and the loop goes on
        (aborting all of them leaves the KV pool and pins clean), unless the steps keep failing."""
        try:
            outputs = self.engine.step()
        except EngineFatalError:
            raise
        except Exception as e:
            self._failed_steps += 1
            if self._failed_steps >= MAX_FAILED_STEPS:
                raise EngineFatalError(f"{self._failed_steps} engine steps in a row failed: {e!r}") from e
            log.exception("engine step failed; aborting %d requests", len(self._streams))
            outs = [self.engine.abort(rid) for rid in list(self.engine.live_request_ids())]
            for out in outs:
                if out is not None:
                    out.error, out.error_kind = f"internal error in the engine step: {e!r}", ErrorKind.INTERNAL
            return [o for o in outs if o is not None]
        self._failed_steps = 0
        return outputs

    def _close_streams(self) -> None:
        """On exit: run what is queued, then end every open stream (abort, or the loop's error)."""
        try:
            self._drain_inbox()
        except Exception:
            log.exception("engine call failed while stopping")
        for request_id in list(self._streams):
            try:
                out = self.engine.abort(request_id)
            except Exception:
                log.exception("abort of %s failed while stopping", request_id)
                out = None
            if out is not None:
                if self._dead is not None and out.error is None:
                    out.error, out.error_kind = f"the engine stopped: {self.death}", ErrorKind.INTERNAL
                self._deliver(out)
            else:
                self._push(request_id, EngineDeadError("the engine stopped"))

    def _drain_inbox(self) -> None:
        while True:
            try:
                fn = self._inbox.get_nowait()
            except queue.Empty:
                return
            fn()

    def _push(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        loop, q = stream
        if isinstance(item, BaseException) or item.finished:
            del self._streams[request_id]
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening
            pass

    def _deliver(self, out: RequestOutput) -> None:
        self._push(out.request_id, out)

    def _submit(self, fn: Callable[[], None]) -> None:
        if self._dead is not None or self._stopping:
            raise EngineDeadError("the engine is not running") from self._dead
        self._inbox.put(fn)
        self._wake.set()

    # -- callers (any thread / event loop) ----------------------------------------------------
    async def run_on_loop(self, fn: Callable[[], Any]) -> Any:
        """Run fn() on the engine thread between steps; its result (or exception) comes back."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def settle(ok: bool, value: Any) -> None:
            if not fut.done():
                (fut.set_result if ok else fut.set_exception)(value)

        def call() -> None:
            try:
                result = (True, fn())
            except Exception as e:  # handed to the awaiting caller
                result = (False, e)
            try:
                loop.call_soon_threadsafe(settle, *result)
            except RuntimeError:
                pass

        self._submit(call)
        return await fut

    async def generate(self, req: Request) -> AsyncIterator[RequestOutput]:
        """Add req and yield its outputs (deltas) until the finished one. add_request's errors
        (PromptTooLongError, AdapterError, ...) are raised here before anything is yielded."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        rid = req.request_id

        def add() -> None:
            self._streams[rid] = (loop, q)
            try:
                self.engine.add_request(req)
            except BaseException:
                del self._streams[rid]
                raise

        finished = False
        try:
            await self.run_on_loop(add)   # inside try: a caller cancelled here still aborts (FIFO inbox)
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op once it finished); its stream gets a final "abort" output."""
        def do() -> None:
            out = self.engine.abort(request_id)
            if out is not None:
                self._deliver(out)
            else:
                self._streams.pop(request_id, None)
        try:
            self._submit(do)
        except EngineDeadError:
            pass

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._dead is None

    @property
    def death(self) -> str | None:
        """Why the loop stopped on its own (None while it runs, or after a plain shutdown)."""
        return None if self._dead is None else f"{type(self._dead).__name__}: {self._dead}"

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop: unfinished requests end with reason "abort"; then release adapter workers."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        self.engine.constraints.close()
        self.engine.store.close()
