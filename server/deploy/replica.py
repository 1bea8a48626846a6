"""EngineReplica: one loraplex engine as a Ray Serve replica (the body of the engine deployment).

It runs the same engine as `loraplex serve` (LocalEngine: the engine thread, the adapter
store, mixed-adapter batches). Serve's model multiplexing decides only where a request goes:
the request's adapter is its multiplexed model id, and the multiplexed loader (`lease`, at
most models_per_replica ids per replica: --max-loras, its slot count, by default) makes sure the
adapter is known here (after the adapter log's changes the request has seen). Batching across
adapters still happens inside the engine. Base-model requests carry no id and go anywhere.

A generation streams back, first, this replica's name (the ingress puts it in the
x-loraplex-replica header), then the engine's RequestOutputs. Cancelling the stream (the
client went away) closes the engine stream, which aborts the request.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator

from ray import serve

from server.api.state import base_model_id
from server.config import EngineConfig
from server.deploy import serve_patch  # noqa: F401  (before any replica initializes)
from server.deploy.adapter_log import AdapterSync, LogState
from server.deploy.replica_metrics import REFRESH_S, ReplicaMetrics
from server.deploy.wire import WireRequest
from server.engine.client import EngineSnapshot
from server.engine.local import LocalEngine
from server.engine.request import RequestOutput
from server.errors import AdapterError
from server.lora.registry import AdapterInfo
from server.structured.grammar import GrammarCompiler

log = logging.getLogger("loraplex.deploy")


class EngineReplica:
    def __init__(self, cfg: EngineConfig, app_state, models_per_replica: int) -> None:
        """app_state: a handle to the AppState deployment (adapter log, replica board);
        models_per_replica: the adapter ids Serve's multiplexing keeps here (RayAppConfig)."""
        self.engine = LocalEngine.start(cfg)
        self.compiler = GrammarCompiler(self.engine.tokenizer.hf)
        self.name = serve.get_replica_context().replica_id.unique_id
        self._state = app_state
        self.sync = AdapterSync(self._fetch_log, self.engine.load_adapter, self.engine.unload_adapter)
        # an instance attribute (a plain function: Serve keeps its cache on it), as its cap is
        # configured

        async def lease(model_id: str) -> str:
            return await self._lease(model_id)
        self.lease = serve.multiplexed(max_num_models_per_replica=models_per_replica)(lease)
        self._metrics = ReplicaMetrics(self.name)
        self._base_label = base_model_id(cfg.model)
        self._refresher: asyncio.Task | None = None     # started on the replica's loop (first call)
        log.info("replica %s ready (pid %d)", self.name, os.getpid())

    def _start_refresh(self) -> None:
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        """Every REFRESH_S: the adapter log's changes applied, the metrics exported and reported."""
        while True:
            try:
                await self.sync.catch_up()
                snapshot = await self.engine.snapshot()
                self._metrics.update(snapshot, self._base_label, self.sync.version)
                await self._state.report.remote(self.name, snapshot)
            except Exception as e:    # a stopped engine is reported by check_health
                log.warning("replica %s: refresh failed: %s", self.name, e)
            await asyncio.sleep(REFRESH_S)

    async def _fetch_log(self) -> LogState:
        return await self._state.state.remote()

    async def _lease(self, model_id: str) -> str:
        """Serve's loader for one adapter id: known here, else AdapterError. The engine's store
        places it in a slot when a request needs it, as on a single server."""
        if not await self.engine.adapter_exists(model_id):
            raise AdapterError(f"unknown adapter {model_id!r}")
        return model_id

    async def generate(self, wire: WireRequest) -> AsyncIterator[str | RequestOutput]:
        self._start_refresh()
        await self.sync.upto(wire.adapters_version)
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self.lease(model_id)
        compiled = None if wire.spec is None else await self.compiler.compile_async(wire.spec)
        req = wire.to_request(compiled)
        yield self.name
        async with contextlib.aclosing(self.engine.generate(req)) as outputs:
            async for out in outputs:
                yield out

    async def describe(self) -> dict:
        return {"max_model_len": self.engine.max_model_len, "replica": self.name}

    async def adapter_exists(self, name: str, version: int) -> bool:
        await self.sync.upto(version)
        return await self.engine.adapter_exists(name)

    async def adapter_infos(self, version: int) -> list[AdapterInfo]:
        await self.sync.upto(version)
        return await self.engine.adapter_infos()

    async def load_adapter(self, name: str, path: str, version: int) -> int:
        """An admin load: read and check it here (its errors go back to the caller), then log it
        for the other replicas; -> the log's new version."""
        await self.sync.upto(version)
        await self.engine.load_adapter(name, path)
        changed = await self._state.record.remote(name, path)
        self.sync.mark(name, changed)
        return changed

    async def unload_adapter(self, name: str, version: int) -> int:
        await self.sync.upto(version)
        await self.engine.unload_adapter(name)
        changed = await self._state.record.remote(name, None)
        self.sync.mark(name, changed)
        return changed

    async def snapshot(self) -> EngineSnapshot:
        return await self.engine.snapshot()

    async def reset_prefix_cache(self) -> int:
        return await self.engine.reset_prefix_cache()

    async def check_health(self) -> None:
        """Serve's health probe: a dead engine makes Serve replace this replica."""
        self._start_refresh()
        if not self.engine.is_alive:
            raise RuntimeError(f"the engine stopped: {self.engine.death}")
