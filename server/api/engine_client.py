"""EngineClient: the HTTP side's handle on the engine, its adapter store and grammar compiler.

Everything the routes need from the engine goes through here, with the thread each call
runs on made explicit: generation streams come from AsyncEngine; adapter loads and listings
run in a worker thread (the store is thread-safe and reads disk); engine statistics are
read on the engine thread (run_on_loop) so a metrics scrape sees a consistent step.
"""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

from server.api.metrics import EngineSnapshot
from server.config import EngineConfig
from server.engine.request import Request, RequestOutput
from server.errors import AdapterError
from server.structured.grammar import GrammarCompiler

log = logging.getLogger("loraplex.api")


class EngineClient:
    def __init__(self, async_engine, compiler: GrammarCompiler) -> None:
        self.async_engine = async_engine
        self.engine = async_engine.engine
        self.store = self.engine.store             # AdapterStore (server/lora/store.py), or None
        self.tokenizer = self.engine.tokenizer     # server/tokenizer.py Tokenizer
        self.compiler = compiler
        self.max_model_len: int = self.engine.max_model_len

    @staticmethod
    def start(config: EngineConfig) -> "EngineClient":
        """Load the model and start the engine thread (blocking: call it in a worker thread)."""
        from server.engine.async_engine import AsyncEngine
        from server.engine.engine import Engine
        engine = Engine(config)
        compiler = GrammarCompiler(engine.tokenizer.hf)
        return EngineClient(AsyncEngine(engine), compiler)

    @property
    def is_alive(self) -> bool:
        return self.async_engine.is_alive

    @property
    def death(self) -> str | None:
        return self.async_engine.death

    def generate(self, req: Request) -> AsyncIterator[RequestOutput]:
        return self.async_engine.generate(req)

    async def shutdown(self) -> None:
        self.compiler.close()
        await asyncio.to_thread(self.async_engine.shutdown)

    # ---- adapters ------------------------------------------------------------------------
    async def _list(self) -> list:
        return [] if self.store is None else await asyncio.to_thread(self.store.list)

    async def adapter_exists(self, name: str) -> bool:
        return self.store is not None and await asyncio.to_thread(self.store.exists, name)

    async def adapter_names(self) -> list[str]:
        return [info.name for info in await self._list()]

    async def adapter_infos(self) -> list[dict]:
        infos = await self._list()
        return [{"name": i.name, "rank": i.rank, "alpha": i.alpha, "targets": list(i.targets),
                 "tier": i.tier, "requests_served": i.requests_served, "last_used": i.last_used,
                 "identity": i.identity} for i in infos]

    async def load_adapter(self, name: str, path: str) -> None:
        if self.store is None:
            raise AdapterError("adapters are disabled on this server")
        await asyncio.to_thread(self.store.load, name, path)

    async def unload_adapter(self, name: str) -> None:
        await asyncio.to_thread(self.store.unload, name)

    # ---- metrics -------------------------------------------------------------------------
    async def snapshot(self) -> EngineSnapshot:
        """Engine state read on the engine thread, between steps."""
        return await self.async_engine.run_on_loop(self._snapshot)

    def _snapshot(self) -> EngineSnapshot:
        stats = self.engine.stats()
        sched = self.engine.scheduler
        return EngineSnapshot(
            running=int(stats["running"]), waiting=int(stats["waiting"]),
            kv_blocks_total=int(stats["kv_blocks_total"]), kv_blocks_used=int(stats["kv_blocks_used"]),
            max_loras=self.engine.config.max_loras,
            device_slots_used=len(stats.get("adapters_resident", [])),
            running_adapters=[r.adapter for r in sched.running if r.adapter],
            waiting_adapters=[r.adapter for r in sched.waiting if r.adapter],
            adapter_counters=self.store.counters() if self.store is not None else {})
