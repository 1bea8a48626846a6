"""Workload: the seeded sequence of requests a phase sends.

Everything random is drawn here, up front, from numpy's PCG64 seeded with
(scenario seed, phase index): the same seed always yields the same adapters, prompts,
lengths, schemas and arrival times, whatever the server does.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from loadtest.scenario import Length, Phase, Popularity, Scenario

DATA_DIR = os.path.join(os.path.dirname(__file__), "data")
CHARS_PER_TOKEN = 4  # rough English average; the server reports the real prompt tokens


@dataclass(frozen=True)
class PlannedRequest:
    index: int                        # position in the phase, 0-based
    phase: str
    adapter: str                      # scenario label: "base", "a3", or an adapter_names entry
    prompt: str
    max_tokens: int
    schema_name: str | None           # None = free text
    schema: dict[str, Any] | None
    arrival_s: float | None           # poisson: send time after the phase start; closed: None
    seed: int                         # per-request sampling seed sent to the server
    system: str | None = None         # the phase's shared system message (system_prompt_tokens)


def plan_phase(scenario: Scenario, phase_index: int) -> list[PlannedRequest]:
    phase = scenario.phases[phase_index]
    rng = np.random.default_rng([scenario.seed, phase_index])
    n = phase.requests
    ranks = sample_ranks(phase.adapters, n, rng)  # (n,) 0 = base, else 1..N
    max_tokens = sample_lengths(phase.max_tokens, n, rng)  # (n,)
    json_max_tokens = sample_lengths(phase.json_max_tokens, n, rng)  # (n,)
    prompt_tokens = sample_lengths(phase.prompt_tokens, n, rng)  # (n,)
    is_json = rng.random(n) < phase.json_fraction  # (n,)
    instructions, passages, schemas = instructions_list(), passages_list(), schemas_list()
    instr_idx = rng.integers(0, len(instructions), n)  # (n,)
    schema_idx = rng.integers(0, len(schemas), n)  # (n,)
    seeds = rng.integers(0, 2**31 - 1, n)  # (n,)
    arrivals = _arrival_times(phase, n, rng)
    system = None
    if phase.system_prompt_tokens:   # one text for the whole phase, from its own stream of draws
        system = build_system_prompt(phase.system_prompt_tokens, passages,
                                     np.random.default_rng([scenario.seed, phase_index, 1]))
    out = []
    for i in range(n):
        schema = schemas[int(schema_idx[i])] if is_json[i] else None
        task = schema["instruction"] if schema else instructions[int(instr_idx[i])]
        prompt = build_prompt(task, int(prompt_tokens[i]), passages, rng)
        adapter = "base" if ranks[i] == 0 else phase.adapters.label(int(ranks[i]))
        out.append(PlannedRequest(
            index=i, phase=phase.name, adapter=adapter, prompt=prompt, max_tokens=int(json_max_tokens[i] if schema else max_tokens[i]),
            schema_name=schema["name"] if schema else None, schema=schema["schema"] if schema else None,
            arrival_s=None if arrivals is None else float(arrivals[i]), seed=int(seeds[i]), system=system))
    return out


def sample_ranks(pop: Popularity, n: int, rng: np.random.Generator) -> np.ndarray:
    """Adapter rank of each of n requests: 0 = base, k in 1..N = adapter k."""
    ranks = _popularity_ranks(pop, n, rng)  # (n,)
    if pop.base_fraction > 0:
        ranks = np.where(rng.random(n) < pop.base_fraction, 0, ranks)  # (n,)
    return ranks


def _popularity_ranks(pop: Popularity, n: int, rng: np.random.Generator) -> np.ndarray:
    if pop.popularity == "base":
        return np.zeros(n, dtype=np.int64)
    if pop.popularity == "identical":
        return np.ones(n, dtype=np.int64)
    if pop.popularity == "uniform":
        return rng.integers(1, pop.count + 1, n)
    if pop.popularity == "zipf":
        return rng.choice(np.arange(1, pop.count + 1), size=n, p=zipf_probabilities(pop.count, pop.alpha))
    assert pop.popularity == "distinct", pop.popularity
    return np.arange(1, n + 1, dtype=np.int64)  # never repeats: request i names adapter i+1


def zipf_probabilities(count: int, alpha: float) -> np.ndarray:
    """P(rank k) = k^-alpha / sum_j j^-alpha over k = 1..count (a bounded Zipf law)."""
    w = np.arange(1, count + 1, dtype=np.float64) ** -alpha  # (count,)
    return w / w.sum()


def sample_lengths(length: Length, n: int, rng: np.random.Generator) -> np.ndarray:
    if length.dist == "fixed":
        return np.full(n, length.value, dtype=np.int64)
    return rng.integers(length.min, length.max + 1, n)  # inclusive of max


def _arrival_times(phase: Phase, n: int, rng: np.random.Generator) -> np.ndarray | None:
    if phase.arrivals.mode == "closed":
        return None
    gaps = rng.exponential(1.0 / phase.arrivals.rate, n)  # (n,) Poisson process inter-arrivals
    return np.cumsum(gaps) - gaps[0]  # the first request goes out at once


def build_prompt(task: str, target_tokens: int, passages: list[str], rng: np.random.Generator) -> str:
    """The task, preceded by unrelated notes until about target_tokens tokens long."""
    budget = target_tokens * CHARS_PER_TOKEN - len(task)
    if budget < 40:
        return task
    header = "Here are some unrelated notes; ignore them.\n\n"
    return f"{header}{_notes(passages, budget - len(header), rng)}\n\nNow the task: {task}"


def build_system_prompt(target_tokens: int, passages: list[str], rng: np.random.Generator) -> str:
    """A system message of about target_tokens tokens: house rules, then reference notes."""
    header = ("You are the assistant of a shipping company. Follow the house rules, answer from "
              "the reference notes below when they help, and keep answers short.\n\nReference notes:\n")
    return header + _notes(passages, target_tokens * CHARS_PER_TOKEN - len(header), rng)


def _notes(passages: list[str], chars: int, rng: np.random.Generator) -> str:
    """Words of randomly drawn passages, in order, until about `chars` characters."""
    words: list[str] = []
    used = 0
    while used < chars:
        for w in passages[int(rng.integers(0, len(passages)))].split():
            if used >= chars:
                break
            words.append(w)
            used += len(w) + 1
    return " ".join(words)


def adapter_labels(plans: list[PlannedRequest]) -> list[str]:
    """Every adapter label the plan names (not base), in first-use order."""
    seen: dict[str, None] = {}
    for p in plans:
        if p.adapter != "base":
            seen.setdefault(p.adapter, None)
    return list(seen)


@lru_cache(maxsize=None)
def _lines(name: str) -> tuple[str, ...]:
    with open(os.path.join(DATA_DIR, name), encoding="utf-8") as f:
        return tuple(s for s in (line.strip() for line in f) if s and not s.startswith("#"))


def instructions_list() -> list[str]:
    return list(_lines("instructions.txt"))


def passages_list() -> list[str]:
    return list(_lines("passages.txt"))


@lru_cache(maxsize=None)
def _schemas() -> str:
    with open(os.path.join(DATA_DIR, "schemas.json"), encoding="utf-8") as f:
        return f.read()


def schemas_list() -> list[dict[str, Any]]:
    """The bundled schemas: [{name, instruction, schema}], a fresh copy each call."""
    return json.loads(_schemas())
