"""RayAppConfig and the Serve YAML files: validated settings, and configs Serve itself accepts."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from server.config import ConfigError
from server.deploy.ray_app import app_builder
from server.deploy.ray_config import RayAppConfig

ROOT = Path(__file__).resolve().parents[2]


def test_from_args_fills_each_config_and_converts_types(tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys: []\n")
    cfg = RayAppConfig.from_args({"replicas": "3", "max-loras": "6", "port": 9000, "api_keys": str(keys),
                                  "enable_prefix_caching": "false", "adapters_dir": "rel/adapters"})
    assert cfg.replicas == 3 and cfg.server.port == 9000
    assert cfg.server.engine.max_loras == 6 and cfg.server.engine.enable_prefix_caching is False
    assert cfg.models_per_replica == 6                          # 0 = the slot count
    assert cfg.max_ongoing_requests == 4 * cfg.server.engine.max_num_seqs
    assert cfg.cpus_per_replica == max(1, (os.cpu_count() or 1) // 3)   # the cores, shared
    assert RayAppConfig.from_args({"cpus_per_replica": "2.5"}).cpus_per_replica == 2.5
    assert cfg.server.engine.adapters_dir == os.path.abspath("rel/adapters")   # replicas run elsewhere


@pytest.mark.parametrize("args, message", [
    ({"replicas": 0}, "replicas must be >= 1"),
    ({"no_such_flag": 1}, "unknown setting 'no_such_flag'"),
    ({"engine": "x"}, "unknown setting 'engine'"),
    ({"max_loras": "many"}, "max_loras must be a number"),
    ({"models_per_replica": -1}, "models_per_replica must be >= 0"),
    ({"metrics_port": 70000}, "metrics_port must be in 0..65535"),
    ({"cpus_per_replica": -1}, "cpus_per_replica must be >= 0"),
])
def test_bad_settings_are_refused_by_name(args, message):
    with pytest.raises(ConfigError, match=message):
        RayAppConfig.from_args(args)


def _apps(doc: dict) -> list[dict]:
    return doc["applications"]


@pytest.mark.parametrize("path", ["deploy/ray/serve.yaml", "deploy/ray/rayservice.yaml"])
def test_the_shipped_serve_configs_validate_and_build(path, tmp_path):
    doc = yaml.safe_load((ROOT / path).read_text())
    if doc.get("kind") == "RayService":
        doc = yaml.safe_load(doc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(doc)            # Serve's own schema for `serve deploy`
    (app,) = _apps(doc)
    assert app["import_path"] == "server.deploy.ray_app:app_builder"
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys: []\n")
    built = app_builder(dict(app["args"], api_keys=str(keys)))     # the volume's file, here
    assert type(built).__name__ == "Application"
