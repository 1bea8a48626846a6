"""`loraplex serve --replicas N`: start (or join) Ray, run the app, wait for SIGTERM/SIGINT.

A local start keeps every Ray process on the loopback interface: Ray is told its node is
127.0.0.1 and asked not to resolve that to the machine's address (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
Ray's single-machine mode, makes its own node-address lookup answer 127.0.0.1), the dashboard
is off, and Serve's HTTP proxy binds --host. tests/deploy checks the listening sockets.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

from server.deploy.ray_config import RayAppConfig

log = logging.getLogger("loraplex.deploy")
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def start_ray(cfg: RayAppConfig) -> None:
    """ray.init: join cfg.ray_address, or start a local instance on 127.0.0.1 only."""
    if not cfg.ray_address:
        os.environ.update(LOOPBACK_ENV)     # before ray is imported: read at import, inherited by Ray's processes
    import ray
    if cfg.ray_address:
        ray.init(address=cfg.ray_address, configure_logging=False)
        return
    cpus = max(float(os.cpu_count() or 1), cfg.replicas * cfg.cpus_per_replica)
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=cpus,
             _metrics_export_port=cfg.metrics_port or None, configure_logging=False, log_to_driver=True)


def serve_ray(cfg: RayAppConfig) -> int:
    start_ray(cfg)
    import ray
    from ray import serve

    from server.deploy.ray_app import APP_NAME, build_app
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": cfg.server.host, "port": cfg.server.port})
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/", blocking=False)
        log.info("serving %d replica(s) on http://%s:%d", cfg.replicas, cfg.server.host, cfg.server.port)
        stop.wait()
        log.info("shutting down the app")
        serve.shutdown()
    finally:
        ray.shutdown()
    return 0
