"""RayEngineClient: the EngineClient of the ingress, over the engine deployment's replicas.

The API (server/api/) runs unchanged on top of it: templating, tokenizing, grammar checks,
auth and admission happen in the ingress; the Request is sent to an engine replica as a
WireRequest with `multiplexed_model_id` = its adapter, so Serve routes it to a replica that
already serves that adapter. Admin loads and unloads run on one replica, which checks the
adapter and records the change in the adapter log; the version that comes back is stamped on
every later request, and each replica catches up with the log before taking one.

Which adapter names exist is answered here, without a call: the shared adapters folder plus
the log's changes, the same rule as the store's registry. A replica that dies with requests in
flight fails them with ReplicaLostError (503); they are not retried, since a request that
has streamed tokens cannot be replayed unseen and sampling need not repeat.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from server.config import EngineConfig
from server.deploy.adapter_log import LogState
from server.deploy.wire import WireRequest
from server.engine.client import EngineSnapshot
from server.engine.request import Request, RequestOutput
from server.errors import ReplicaLostError
from server.lora.registry import AdapterInfo, AdapterRegistry
from server.model.loader import resolve_model_dir
from server.tokenizer import Tokenizer

log = logging.getLogger("loraplex.deploy")
_LOST = (ActorDiedError, ActorUnavailableError, RayActorError)
LOST_MESSAGE = "the replica serving this request stopped"


def _unwrap(e: RayTaskError) -> BaseException:
    """The replica's own exception (AdapterError, ...) out of Ray's wrapper."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, Exception) else e


class RayEngineClient:
    def __init__(self, engine, app_state, cfg: EngineConfig) -> None:
        """engine, app_state: handles to the engine and AppState deployments. Blocking (it
        waits for a replica's answer): called from the app's start-up thread."""
        self._engine = engine
        self._state = app_state
        self.tokenizer = Tokenizer(resolve_model_dir(cfg.model))
        self.max_model_len: int = engine.describe.remote().result()["max_model_len"]
        self._names = AdapterRegistry(cfg.adapters_dir)
        self._version = 0
        self._apply(app_state.state.remote().result())

    def _apply(self, state: LogState) -> None:
        for name, (path, _) in sorted(state.entries.items(), key=lambda kv: kv[1][1]):
            if path is None:
                with contextlib.suppress(Exception):
                    self._names.mark_unloaded(name)
            else:
                self._names.register(name, path)
        self._version = max(self._version, state.version)

    async def generate(self, req: Request) -> AsyncIterator[RequestOutput]:
        wire = WireRequest.of(req, self._version)
        call = self._engine.options(stream=True, multiplexed_model_id=req.adapter or "")
        stream = call.generate.remote(wire)
        try:
            async for item in stream:
                if isinstance(item, str):       # the replica's name: it took the request
                    req.served_by = item
                    yield RequestOutput(req.request_id, [], "", None, False, None, len(req.prompt_ids), 0)
                    continue
                yield item
                if item.finished:
                    return
        except RayTaskError as e:
            raise _unwrap(e) from None
        except _LOST as e:
            log.warning("request %s: its replica %s stopped: %s", req.request_id, req.served_by, type(e).__name__)
            raise ReplicaLostError(LOST_MESSAGE) from None
        finally:
            stream.cancel()       # a no-op once finished; else the replica aborts the request

    @property
    def is_alive(self) -> bool:
        return True               # Serve replaces dead replicas; a lost one fails only its requests

    @property
    def death(self) -> str | None:
        return None

    async def shutdown(self) -> None:
        return None

    async def adapter_exists(self, name: str) -> bool:
        entry = self._names.find(name)
        return entry is not None and not entry.unloading

    async def adapter_infos(self) -> list[AdapterInfo]:
        return await self._call(self._engine.adapter_infos.remote(self._version))

    async def load_adapter(self, name: str, path: str) -> None:
        version = await self._call(self._engine.load_adapter.remote(name, path, self._version))
        self._names.register(name, path)
        self._version = max(self._version, version)

    async def unload_adapter(self, name: str) -> None:
        version = await self._call(self._engine.unload_adapter.remote(name, self._version))
        self._names.mark_unloaded(name)
        self._version = max(self._version, version)

    async def snapshot(self) -> EngineSnapshot:
        """Every replica's, combined (their latest reports: replica_board.py)."""
        return await self._state.combined.remote()

    async def reset_prefix_cache(self) -> int:
        return await self._call(self._engine.reset_prefix_cache.remote())

    @staticmethod
    async def _call(response):
        try:
            return await response
        except RayTaskError as e:
            raise _unwrap(e) from None
        except _LOST:
            raise ReplicaLostError(LOST_MESSAGE) from None
