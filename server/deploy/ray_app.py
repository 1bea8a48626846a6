"""The Ray Serve application: an ingress (the same FastAPI app), engine replicas, an adapter log.

    HTTP -> Serve proxy -> Ingress (server/api/ as on a single server: routes, auth, tenants,
            templating, grammar checks, admission)
         -> EngineReplica x N (chosen by Serve's model multiplexing: model id = adapter)
            each running the loraplex engine, batching its requests across adapters
    admin loads/unloads -> one replica (checks the adapter) -> AppState's AdapterLog -> every
            replica applies the log up to the version a request carries before taking it
    replicas' snapshots -> AppState's ReplicaBoard -> the app's /metrics (all replicas together)

`build_app(RayAppConfig)` returns the bound application for `serve.run`;
`app_builder(args)` is the same for `serve run server.deploy.ray_app:app_builder` and
KubeRay's RayService (docs/scale-out.md).
"""
from __future__ import annotations

from ray import serve
from ray.serve.handle import DeploymentHandle

from server.api.app import create_app
from server.config import EngineConfig, ServerConfig
from server.deploy import serve_patch  # noqa: F401  (before any replica initializes)
from server.deploy.app_state import AppState
from server.deploy.ray_client import RayEngineClient
from server.deploy.ray_config import RayAppConfig
from server.deploy.replica import EngineReplica

APP_NAME = "loraplex"


@serve.ingress()
class Ingress:
    """The FastAPI app of `loraplex serve`, with the engine replicas behind its EngineClient."""

    def __init__(self, cfg: ServerConfig, engine: DeploymentHandle, app_state: DeploymentHandle) -> None:
        self._cfg = cfg
        self._engine = engine
        self._state = app_state

    def __serve_build_asgi_app__(self):
        return create_app(self._cfg, self._connect)

    def _connect(self, engine_cfg: EngineConfig) -> RayEngineClient:
        return RayEngineClient(self._engine, self._state, engine_cfg)


def build_app(cfg: RayAppConfig):
    server = cfg.server
    state_dep = serve.deployment(AppState, name="AppState", num_replicas=1, ray_actor_options={"num_cpus": 0})
    engine_dep = serve.deployment(
        EngineReplica, name="EngineReplica", num_replicas=cfg.replicas,
        max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.cpus_per_replica},
        health_check_period_s=5, health_check_timeout_s=30, graceful_shutdown_timeout_s=server.drain_timeout)
    ingress_dep = serve.deployment(Ingress, name="Ingress", num_replicas=1,
                                   max_ongoing_requests=server.max_queue + 64,
                                   ray_actor_options={"num_cpus": 0})
    app_state = state_dep.bind()
    return ingress_dep.bind(server, engine_dep.bind(server.engine, app_state, cfg.models_per_replica), app_state)


def app_builder(args: dict):
    """`serve run server.deploy.ray_app:app_builder replicas=2 model=default ...` (and Serve YAML's
    `import_path` with `args`): the flags of `loraplex serve`, by name, with '_' for '-'."""
    return build_app(RayAppConfig.from_args(args))
