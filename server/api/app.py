"""The FastAPI app: factory, lifespan (engine loaded in the background), middleware, serve().

Life of the process:
  start -> /health 200 at once, /ready 503 while the model loads -> ready -> SIGTERM/SIGINT:
  draining (new /v1 requests 503, /ready 503), in-flight requests finish (bounded by
  --drain-timeout) -> uvicorn closes connections -> lifespan shutdown stops the engine -> exit 0.
  The engine stops on its own (device error, out of memory): /health 503, every stream ends with
  an error, the server shuts down and exits 1, so a supervisor restarts it.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import uuid
from typing import Callable

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.requests import ClientDisconnect

from server.api import admin_routes, errors, openai_routes, responses_routes
from server.api.body_limit import BodyLimit
from server.api.auth import KeyTable
from server.api.state import ServerState, base_model_id
from server.config import EngineConfig, ServerConfig
from server.engine.client import EngineClient
from server.engine.local import LocalEngine

log = logging.getLogger("loraplex.api")
_GATED_PREFIX = "/v1/"
REPLICA_HEADER = b"x-loraplex-replica"   # names the replica(s) that served a generation
FAILURE_EXIT_DELAY_S = 2.0      # how long a server whose engine died answers 503 before it exits


class RequestGate:
    """Pure ASGI middleware: request ids, 503 while draining, in-flight counting, last-resort 500s.

    Pure ASGI (not BaseHTTPMiddleware) so that a streamed response counts as in flight until
    its last byte is sent, and so that no exception escapes with a traceback to the client.
    """

    def __init__(self, app, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if 0 < len(given) <= 64 and given.isprintable() else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid
        gated = scope["path"].startswith(_GATED_PREFIX)
        if gated and self.state.gate.draining:
            await errors.error_response(errors.unavailable("server is shutting down"), rid)(scope, receive, send)
            return
        started = False

        async def send_with_id(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append((b"x-request-id", rid.encode("latin-1")))
                generation = scope["state"].get("generation")
                if generation is not None and generation.replica:
                    headers.append((REPLICA_HEADER, generation.replica.encode("latin-1")))
                message["headers"] = headers
            await send(message)

        if gated:
            self.state.gate.inflight += 1
        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            log.info("request %s: client went away", rid)   # its engine requests were aborted
        except Exception as e:
            err = errors.from_exception(e) or errors.internal_error(e, rid)
            if not started:
                await errors.error_response(err, rid)(scope, receive, send)
        finally:
            generation = scope["state"].get("generation")
            if generation is not None:
                generation.close()
            if gated:
                self.state.gate.inflight -= 1


def create_app(cfg: ServerConfig, starter: Callable[[EngineConfig], EngineClient] = LocalEngine.start) -> FastAPI:
    """starter: loads the engine this app serves (blocking; run in a worker thread): this process's
    engine by default, or a client of remote replicas (server/deploy/ray_client.py)."""
    keys = KeyTable.from_file(cfg.api_keys) if cfg.api_keys else KeyTable.empty()
    state = ServerState(cfg=cfg, keys=keys, base_id=base_model_id(cfg.engine.model), starter=starter)
    state.metrics.set_base_label(state.base_id)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if keys.open:
            log.warning("no --api-keys file: the server is open (every caller may use every adapter "
                        "and load or unload adapters)")
        loading = asyncio.create_task(state.start_engine())
        yield
        loading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loading
        await state.stop_engine()

    app = FastAPI(title="loraplex", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    errors.install(app)
    app.include_router(openai_routes.router)
    app.include_router(responses_routes.router)
    app.include_router(admin_routes.router)
    app.add_middleware(BodyLimit, max_bytes=cfg.max_request_bytes)
    app.add_middleware(RequestGate, state=state)   # outermost: request ids reach every answer

    @app.get("/health")
    async def health() -> Response:
        failure = state.failure
        if failure:
            return JSONResponse({"status": "error", "error": failure}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        body = {"ready": state.ready, "draining": state.gate.draining, "model": state.base_id}
        return JSONResponse(body, status_code=200 if state.ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        await state.refresh_metrics()
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains instead of closing at once.

    Draining ends when no /v1 request is in flight or drain_timeout has passed; then the
    usual graceful shutdown runs. A second SIGINT forces exit. The signal is not re-raised
    after shutdown (uvicorn's default), so a drained server exits 0.
    """

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._drain_deadline: float | None = None
        self._failed_at: float | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self._drain_deadline is None:
            log.info("signal %s: draining (%d in flight, up to %.1f s)", signal.Signals(sig).name,
                     self.state.gate.inflight, self.state.cfg.drain_timeout)
            self.state.gate.draining = True
            self._drain_deadline = time.monotonic() + self.state.cfg.drain_timeout
        elif sig == signal.SIGINT:
            self.force_exit = True
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        failure = self.state.failure
        if failure:
            # A failed load exits at once. A dead engine keeps answering 503 (/health and /v1)
            # for a moment, so probes and clients see why, then the process exits non-zero and
            # a supervisor restarts it.
            now = time.monotonic()
            if self._failed_at is None:
                self._failed_at = now
                log.critical("exiting in %.1f s: %s", 0 if self.state.load_error else FAILURE_EXIT_DELAY_S, failure)
            return bool(self.state.load_error) or now - self._failed_at >= FAILURE_EXIT_DELAY_S
        if self._drain_deadline is not None:
            if self.state.gate.inflight == 0 or time.monotonic() >= self._drain_deadline:
                if self.state.gate.inflight:
                    log.warning("drain timeout: %d request(s) still in flight are aborted",
                                self.state.gate.inflight)
                return True
        return False


def serve(cfg: ServerConfig) -> int:
    """`loraplex serve`: run until drained; 0 on a clean shutdown, 1 when the model failed to load
    or the engine stopped on a failure that was no request's fault."""
    app = create_app(cfg)
    state: ServerState = app.state.server
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=max(1, int(cfg.drain_timeout) + 5),
                            timeout_keep_alive=5)
    DrainingServer(config, state).run()
    return 1 if state.failure else 0
