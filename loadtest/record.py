"""RunRecord: what a run measured, as written to and read back from results.json.

Times are seconds. `start` of a request is measured from the start of the run (the
first phase), so token timestamps of all phases share one clock:
token k of a request arrived at start + ttft + sum(itl[:k]).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

RESULTS_VERSION = 1
STATUSES = ("ok", "error", "cancelled", "in_flight")


@dataclass
class RequestRecord:
    index: int
    phase: str
    adapter: str                      # scenario label
    model: str                        # what was sent as `model`
    schema: str | None                # bundled schema name, None = free text
    max_tokens: int
    start: float                      # s since the run started
    status: str = "in_flight"         # ok | error | cancelled (in_flight only while running)
    http_status: int | None = None
    error: str | None = None
    ttft: float | None = None         # s from sending to the first content chunk
    itl: list[float] = field(default_factory=list)  # s between consecutive content chunks
    e2e: float | None = None          # s from sending to the end of the stream
    prompt_tokens: int | None = None
    completion_tokens: int | None = None  # from usage, else the number of content chunks
    usage_reported: bool = False
    chunks: int = 0                   # content-bearing chunks received
    finish_reason: str | None = None
    json_valid: bool | None = None    # None = no schema, or the request failed
    json_error: str | None = None
    text: str = ""

    def token_times(self) -> list[float]:
        """Arrival time (s since run start) of each content chunk."""
        if self.ttft is None:
            return []
        t = self.start + self.ttft
        out = [t]
        for gap in self.itl:
            t += gap
            out.append(t)
        return out


@dataclass
class PhaseRecord:
    name: str
    start: float                      # s since the run started
    end: float
    planned: int                      # requests in the plan
    sent: int                         # requests sent before the count or time limit


@dataclass
class RunRecord:
    scenario: str
    description: str
    seed: int
    base_url: str
    model_map: str
    started_at: str                   # ISO 8601 UTC wall clock
    scenario_raw: dict[str, Any]
    phases: list[PhaseRecord] = field(default_factory=list)
    requests: list[RequestRecord] = field(default_factory=list)
    version: int = RESULTS_VERSION

    def phase_requests(self, phase: str | None) -> list[RequestRecord]:
        return [r for r in self.requests if phase is None or r.phase == phase]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> "RunRecord":
        d = dict(d)
        phases = [PhaseRecord(**p) for p in d.pop("phases")]
        requests = [RequestRecord(**r) for r in d.pop("requests")]
        return RunRecord(phases=phases, requests=requests, **d)


def write_atomic(path: str, data: bytes) -> None:
    """Write to a temp file in the same folder, then rename over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_run(run: RunRecord, path: str) -> None:
    write_atomic(path, json.dumps(run.to_json(), indent=1).encode("utf-8"))


def load_run(path: str) -> RunRecord:
    """A results.json file, or a folder holding one."""
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    if d.get("version") != RESULTS_VERSION:
        raise ValueError(f"{path}: results version {d.get('version')!r}, expected {RESULTS_VERSION}")
    return RunRecord.from_json(d)
