"""ServerState: what every route needs (config, engine, keys, metrics) and the admission gate.

One instance per app, stored in `app.state.server`. The engine is loaded in the
background after start-up; until it is there (and once draining starts) generation
requests get 503 and /ready reports not ready.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fastapi import Request

from server.api import errors
from server.api.auth import KeyTable, Principal, bearer_token
from server.api.metrics import Metrics
from server.config import EngineConfig, ServerConfig
from server.engine.client import EngineClient
from server.errors import LoraplexError
from server.lora.registry import valid_name
from server.model.default import MODEL_DIRNAME
from server.structured.grammar import GrammarCompiler

log = logging.getLogger("loraplex.api")

BASE_ALIAS = "base"
# Adapter names: one path component, never a path ("../x", "a/b" are refused); the store's rule.
valid_adapter_name = valid_name


def base_model_id(model: str) -> str:
    """The id clients use for the base model: the model folder's (or .gguf file's) name."""
    if model == "default":
        return MODEL_DIRNAME
    p = Path(model)
    return p.stem if p.suffix == ".gguf" else p.resolve().name


@dataclass
class Gate:
    """Admission bookkeeping, touched only on the event loop thread."""
    draining: bool = False
    inflight: int = 0        # HTTP requests under /v1 not yet fully answered
    waiting: int = 0         # engine requests submitted that have produced no token yet


@dataclass
class ServerState:
    cfg: ServerConfig
    keys: KeyTable
    base_id: str
    metrics: Metrics = field(default_factory=Metrics)
    gate: Gate = field(default_factory=Gate)
    starter: Callable[[EngineConfig], EngineClient] | None = None   # loads the engine (blocking)
    engine: EngineClient | None = None    # set once the model is loaded
    compiler: GrammarCompiler | None = None   # for the engine's tokenizer, set with it
    load_error: str | None = None
    died: str | None = None               # the engine stopped on a failure (set at shutdown)

    async def start_engine(self) -> None:
        """Load the model off the event loop; /ready turns 200 when done."""
        assert self.starter is not None, "ServerState needs a starter"
        try:
            client = await asyncio.to_thread(self.starter, self.cfg.engine)
            self.compiler = await asyncio.to_thread(GrammarCompiler, client.tokenizer.hf)
        except Exception as e:  # reported by /health and the process exit code
            log.error("model failed to load: %s", e, exc_info=not isinstance(e, LoraplexError))
            self.load_error = str(e)
            return
        self.engine = client
        self.metrics.set_snapshot(await client.snapshot())
        log.info("ready: serving %s", self.base_id)

    async def stop_engine(self) -> None:
        if self.engine is not None:
            self.died = self.failure       # kept: the exit code is decided after shutdown
            client, self.engine = self.engine, None
            if self.compiler is not None:
                self.compiler.close()
            await client.shutdown()

    async def refresh_metrics(self) -> None:
        self.metrics.queue_waiting.set(self.gate.waiting)
        self.metrics.inflight.set(self.gate.inflight)
        if self.engine is not None and self.engine.is_alive:
            self.metrics.set_snapshot(await self.engine.snapshot())

    @property
    def failure(self) -> str | None:
        """Why this server can no longer serve (the model failed to load, the engine died), or None."""
        if self.load_error or self.died:
            return self.load_error or self.died
        if self.engine is not None and not self.engine.is_alive:
            return f"the engine stopped: {self.engine.death}"
        return None

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.gate.draining and self.failure is None

    def require_ready(self) -> EngineClient:
        """The AsyncEngine, or 503 while loading or draining."""
        if self.gate.draining:
            raise errors.unavailable("server is shutting down")
        if self.engine is None:
            raise errors.unavailable(
                "model failed to load" if self.load_error else "model is still loading; retry shortly")
        if not self.engine.is_alive:
            raise errors.unavailable("the engine stopped; the server is restarting")
        return self.engine

    def principal(self, request: Request) -> Principal:
        """The caller's Principal; 401 when the keys file is in use and the key is missing or wrong."""
        token = bearer_token(request.headers.get("authorization"))
        who = self.keys.authenticate(token)
        if who is None:
            raise errors.unauthorized("missing API key" if token is None else "incorrect API key provided")
        return who

    def require_admin(self, request: Request) -> Principal:
        who = self.principal(request)
        if not who.admin:
            raise errors.forbidden(f"tenant {who.tenant!r} may not load or unload adapters")
        return who

    def is_base(self, model: str) -> bool:
        return model in (self.base_id, BASE_ALIAS)

    def admit(self, count: int) -> None:
        """Reserve `count` waiting places; 429 when the queue would pass --max-queue."""
        if self.gate.waiting + count > self.cfg.max_queue:
            raise errors.queue_full(self.gate.waiting)
        self.gate.waiting += count

    def release(self, count: int = 1) -> None:
        self.gate.waiting -= count
        assert self.gate.waiting >= 0, "waiting counter went negative"
