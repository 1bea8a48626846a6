"""RayAppConfig: the replicated app's settings, validated, passed whole to build_app."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from server.config import ConfigError, EngineConfig, ServerConfig


def _absolute(cfg: ServerConfig) -> ServerConfig:
    """Paths made absolute: replicas run in other processes, whose working folder may differ."""
    model = cfg.engine.model
    if model != "default" and os.path.exists(model):
        model = os.path.abspath(model)
    engine = dataclasses.replace(cfg.engine, model=model, adapters_dir=os.path.abspath(cfg.engine.adapters_dir))
    return dataclasses.replace(cfg, engine=engine, api_keys=os.path.abspath(cfg.api_keys) if cfg.api_keys else "")


@dataclass(frozen=True)
class RayAppConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    replicas: int = 1                  # engine replicas
    ray_address: str = ""              # join this Ray cluster; "" = start a local one on 127.0.0.1
    # Ray's CPU resource each engine replica reserves; Ray also sets the replica's OMP_NUM_THREADS
    # (its torch and kernel threads) to it. 0 = this machine's cores shared among the replicas.
    cpus_per_replica: float = 0.0
    max_ongoing_requests: int = 0      # per engine replica; 0 = 4 x max_num_seqs
    metrics_port: int = 0              # a local start: Ray's Prometheus export port (0 = Ray picks one)
    # adapter ids Serve's multiplexing keeps per replica (its LRU): 0 = --max-loras, the slot
    # count; docs/scale-out.md's simulation favours --max-cpu-loras (route by host residency)
    models_per_replica: int = 0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"replicas must be >= 1, got {self.replicas}")
        if self.cpus_per_replica < 0:
            raise ConfigError(f"cpus_per_replica must be >= 0, got {self.cpus_per_replica}")
        if not (0 <= self.metrics_port < 65536):
            raise ConfigError(f"metrics_port must be in 0..65535, got {self.metrics_port}")
        if self.models_per_replica < 0:
            raise ConfigError(f"models_per_replica must be >= 0, got {self.models_per_replica}")
        if self.max_ongoing_requests < 0:
            raise ConfigError(f"max_ongoing_requests must be >= 0, got {self.max_ongoing_requests}")
        object.__setattr__(self, "server", _absolute(self.server))
        if self.max_ongoing_requests == 0:
            object.__setattr__(self, "max_ongoing_requests", 4 * self.server.engine.max_num_seqs)
        if self.cpus_per_replica == 0:
            object.__setattr__(self, "cpus_per_replica", float(max(1, (os.cpu_count() or 1) // self.replicas)))
        if self.models_per_replica == 0:
            object.__setattr__(self, "models_per_replica", self.server.engine.max_loras)

    @staticmethod
    def from_args(args: dict) -> "RayAppConfig":
        """From Serve's `args` (YAML or `serve run ... key=value`): keys are the fields of
        EngineConfig, ServerConfig and this class; values are converted to the field's type."""
        groups = {name: {f.name: f for f in dataclasses.fields(cls)}
                  for name, cls in (("engine", EngineConfig), ("server", ServerConfig), ("app", RayAppConfig))}
        given: dict[str, dict] = {"engine": {}, "server": {}, "app": {}}
        for key, value in args.items():
            key = key.replace("-", "_")
            group = next((g for g in ("engine", "server", "app") if key in groups[g] and key not in
                          ("engine", "server")), None)
            if group is None:
                raise ConfigError(f"unknown setting {key!r}")
            given[group][key] = _convert(groups[group][key], value)
        engine = EngineConfig(**given["engine"])
        return RayAppConfig(server=ServerConfig(engine=engine, **given["server"]), **given["app"])


def _convert(f: dataclasses.Field, value):
    default = f.default
    if isinstance(default, bool):
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
    if isinstance(default, (int, float)) and not isinstance(value, (int, float)):
        try:
            return type(default)(value)
        except ValueError as e:
            raise ConfigError(f"{f.name} must be a number, got {value!r}") from e
    return value
