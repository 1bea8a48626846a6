"""Scenario: one load test read from YAML, validated, split into phases.

A scenario file holds top-level settings; an optional `phases:` list runs the same
load several times in sequence, each entry overriding any top-level key (for example
base-only against 32 adapters). Every value is checked here; a bad one raises
ScenarioError naming the file, the key and the value.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import yaml

SCENARIOS_DIR = os.path.join(os.path.dirname(__file__), "scenarios")
ARRIVAL_MODES = ("closed", "poisson")
POPULARITIES = ("base", "identical", "uniform", "zipf", "distinct")
LENGTH_DISTS = ("fixed", "uniform")
PHASE_KEYS = ("name", "arrivals", "requests", "duration_s", "adapters", "prompt_tokens",
              "max_tokens", "json_max_tokens", "ignore_eos", "json_fraction", "temperature",
              "system_prompt_tokens")
TOP_KEYS = PHASE_KEYS + ("description", "seed", "request_timeout_s", "phases")


class ScenarioError(ValueError):
    """A scenario file is missing, malformed, or has a value out of range."""


@dataclass(frozen=True)
class Length:
    """A distribution over positive integers: fixed `value`, or uniform in [min, max]."""
    dist: str = "fixed"
    value: int = 0
    min: int = 0
    max: int = 0

    def __post_init__(self) -> None:
        if self.dist not in LENGTH_DISTS:
            raise ScenarioError(f"length dist must be one of {LENGTH_DISTS}, got {self.dist!r}")
        if self.dist == "fixed" and (not isinstance(self.value, int) or self.value < 1):
            raise ScenarioError(f"fixed length must be an integer >= 1, got {self.value!r}")
        if self.dist == "uniform" and not (isinstance(self.min, int) and isinstance(self.max, int)
                                           and 1 <= self.min <= self.max):
            raise ScenarioError(f"uniform length needs integers 1 <= min <= max, got min={self.min!r} max={self.max!r}")

    @property
    def upper(self) -> int:
        return self.value if self.dist == "fixed" else self.max


@dataclass(frozen=True)
class Arrivals:
    """closed: `concurrency` clients each send the next request when the last one ends.
    poisson: requests arrive at `rate` per second, independent of completions."""
    mode: str = "closed"
    concurrency: int = 1
    rate: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in ARRIVAL_MODES:
            raise ScenarioError(f"arrivals.mode must be one of {ARRIVAL_MODES}, got {self.mode!r}")
        if not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise ScenarioError(f"arrivals.concurrency must be an integer >= 1, got {self.concurrency!r}")
        if not isinstance(self.rate, (int, float)) or self.rate <= 0:
            raise ScenarioError(f"arrivals.rate must be > 0 requests/s, got {self.rate!r}")


@dataclass(frozen=True)
class Popularity:
    """Which adapter each request names. Labels are `{prefix}1..{prefix}N` (a1..aN), or
    names[k-1] when `names` is given; `base` requests name the base model."""
    popularity: str = "base"
    count: int = 1                    # N; for `distinct`, N is the phase's request count
    alpha: float = 1.0                # zipf exponent: P(rank k) ~ 1 / k^alpha
    prefix: str = "a"
    names: tuple[str, ...] = ()       # the scenario's `adapter_names`
    base_fraction: float = 0.0        # share of requests sent to the base model instead

    def __post_init__(self) -> None:
        if not isinstance(self.base_fraction, (int, float)) or not 0.0 <= self.base_fraction <= 1.0:
            raise ScenarioError(f"adapters.base_fraction must be in [0, 1], got {self.base_fraction!r}")
        if self.popularity not in POPULARITIES:
            raise ScenarioError(f"adapters.popularity must be one of {POPULARITIES}, got {self.popularity!r}")
        if not isinstance(self.count, int) or self.count < 1:
            raise ScenarioError(f"adapters.count must be an integer >= 1, got {self.count!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ScenarioError(f"adapters.alpha must be > 0, got {self.alpha!r}")
        if not self.prefix or not isinstance(self.prefix, str):
            raise ScenarioError(f"adapters.prefix must be a non-empty string, got {self.prefix!r}")

    def label(self, k: int) -> str:
        """The adapter name of rank k (1-based)."""
        if self.names:
            if k > len(self.names):
                raise ScenarioError(f"adapter_names has {len(self.names)} names but rank {k} was drawn")
            return self.names[k - 1]
        return f"{self.prefix}{k}"


@dataclass(frozen=True)
class Phase:
    name: str
    arrivals: Arrivals
    requests: int                     # stop after this many requests ...
    duration_s: float                 # ... or after this many seconds, whichever first
    adapters: Popularity
    prompt_tokens: Length             # approximate prompt length (about 4 characters a token)
    max_tokens: Length
    json_max_tokens: Length           # max_tokens of schema requests (they stop when the JSON ends)
    ignore_eos: bool                  # sent as a body field on free-text requests
    json_fraction: float              # share of requests carrying a JSON schema
    temperature: float
    system_prompt_tokens: int = 0     # one system message of about this many tokens, the same for every request

    def __post_init__(self) -> None:
        if not isinstance(self.system_prompt_tokens, int) or self.system_prompt_tokens < 0:
            raise ScenarioError(f"phase {self.name!r}: system_prompt_tokens must be an integer >= 0, "
                                f"got {self.system_prompt_tokens!r}")
        if not isinstance(self.requests, int) or self.requests < 1:
            raise ScenarioError(f"phase {self.name!r}: requests must be an integer >= 1, got {self.requests!r}")
        if not isinstance(self.duration_s, (int, float)) or self.duration_s <= 0:
            raise ScenarioError(f"phase {self.name!r}: duration_s must be > 0, got {self.duration_s!r}")
        if not (0.0 <= self.json_fraction <= 1.0):
            raise ScenarioError(f"phase {self.name!r}: json_fraction must be in [0, 1], got {self.json_fraction!r}")
        if not (0.0 <= self.temperature <= 2.0):
            raise ScenarioError(f"phase {self.name!r}: temperature must be in [0, 2], got {self.temperature!r}")
        if self.adapters.names:
            need = self.requests if self.adapters.popularity == "distinct" else self.adapters.count
            if self.adapters.popularity != "base" and len(self.adapters.names) < need:
                raise ScenarioError(f"phase {self.name!r}: adapter_names has {len(self.adapters.names)} "
                                    f"names, {self.adapters.popularity} popularity needs {need}")


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    seed: int
    request_timeout_s: float
    phases: tuple[Phase, ...]
    raw: dict[str, Any]               # the file as read, kept for results.json

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int):
            raise ScenarioError(f"seed must be an integer, got {self.seed!r}")
        if self.request_timeout_s <= 0:
            raise ScenarioError(f"request_timeout_s must be > 0, got {self.request_timeout_s!r}")
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise ScenarioError(f"phase names must be unique, got {names}")


def resolve_path(path: str) -> str:
    """A path as given, or the name of a bundled scenario (`smoke`, `smoke.yaml`)."""
    if os.path.isfile(path):
        return path
    name = path if path.endswith((".yaml", ".yml")) else path + ".yaml"
    bundled = os.path.join(SCENARIOS_DIR, os.path.basename(name))
    if os.path.isfile(bundled):
        return bundled
    raise ScenarioError(f"scenario file not found: {path} (bundled: {', '.join(bundled_names())})")


def bundled_names() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(SCENARIOS_DIR) if f.endswith(".yaml"))


def load_scenario(path: str) -> Scenario:
    path = resolve_path(path)
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ScenarioError(f"{path}: not valid YAML: {e}") from e
    try:
        return parse_scenario(raw, default_name=os.path.splitext(os.path.basename(path))[0])
    except ScenarioError as e:
        raise ScenarioError(f"{path}: {e}") from e


def parse_scenario(raw: Any, default_name: str = "scenario") -> Scenario:
    if not isinstance(raw, dict):
        raise ScenarioError(f"a scenario must be a mapping, got {type(raw).__name__}")
    _check_keys(raw, TOP_KEYS, "scenario")
    base = {k: v for k, v in raw.items() if k in PHASE_KEYS}
    overrides = raw.get("phases") or [{}]
    if not isinstance(overrides, list):
        raise ScenarioError(f"phases must be a list of mappings, got {overrides!r}")
    phases = []
    for i, over in enumerate(overrides):
        if not isinstance(over, dict):
            raise ScenarioError(f"phases[{i}] must be a mapping, got {over!r}")
        _check_keys(over, PHASE_KEYS, f"phases[{i}]")
        merged = {**base, **over}
        merged.setdefault("name", "main" if len(overrides) == 1 else f"phase{i + 1}")
        phases.append(_parse_phase(merged))
    return Scenario(name=str(raw.get("name", default_name)), description=str(raw.get("description", "")),
                    seed=raw.get("seed", 0), request_timeout_s=float(raw.get("request_timeout_s", 300.0)),
                    phases=tuple(phases), raw=raw)


def _parse_phase(d: dict[str, Any]) -> Phase:
    arrivals = d.get("arrivals", {})
    adapters = d.get("adapters", {})
    if not isinstance(arrivals, dict) or not isinstance(adapters, dict):
        raise ScenarioError(f"arrivals and adapters must be mappings, got {arrivals!r} and {adapters!r}")
    _check_keys(arrivals, ("mode", "concurrency", "rate"), "arrivals")
    _check_keys(adapters, ("popularity", "count", "alpha", "prefix", "adapter_names", "base_fraction"), "adapters")
    names = adapters.get("adapter_names", ())
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ScenarioError(f"adapters.adapter_names must be a list of strings, got {names!r}")
    popularity = Popularity(popularity=adapters.get("popularity", "base"), count=adapters.get("count", 1),
                            alpha=adapters.get("alpha", 1.0), prefix=adapters.get("prefix", "a"),
                            names=tuple(names), base_fraction=adapters.get("base_fraction", 0.0))
    return Phase(name=str(d["name"]), arrivals=Arrivals(**arrivals), requests=d.get("requests", 16),
                 duration_s=d.get("duration_s", 600), adapters=popularity,
                 prompt_tokens=_length(d.get("prompt_tokens", 32), "prompt_tokens"),
                 max_tokens=_length(d.get("max_tokens", 32), "max_tokens"),
                 json_max_tokens=_length(d.get("json_max_tokens", d.get("max_tokens", 32)), "json_max_tokens"),
                 ignore_eos=_bool(d.get("ignore_eos", False), "ignore_eos"),
                 json_fraction=float(d.get("json_fraction", 0.0)), temperature=float(d.get("temperature", 0.0)),
                 system_prompt_tokens=d.get("system_prompt_tokens", 0))


def _length(v: Any, key: str) -> Length:
    """`64` (fixed), `{dist: fixed, value: 64}` or `{dist: uniform, min: 16, max: 128}`."""
    try:
        if isinstance(v, int) and not isinstance(v, bool):
            return Length(dist="fixed", value=v)
        if isinstance(v, dict):
            _check_keys(v, ("dist", "value", "min", "max"), key)
            return Length(**v)
    except ScenarioError as e:
        raise ScenarioError(f"{key}: {e}") from e
    raise ScenarioError(f"{key} must be an integer or a mapping with dist, got {v!r}")


def _bool(v: Any, key: str) -> bool:
    if not isinstance(v, bool):
        raise ScenarioError(f"{key} must be true or false, got {v!r}")
    return v


def _check_keys(d: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise ScenarioError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
