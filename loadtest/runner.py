"""Runner: sends a scenario's planned requests to one OpenAI-compatible endpoint.

Each request is a streaming chat completion (stream_options.include_usage) so the
client sees every chunk: TTFT is the time to the first chunk with content, ITL the
gaps between content chunks. The runner talks HTTP only and works against any server
that speaks the OpenAI chat API; server-specific body fields come from the model map.
"""
from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timezone
from typing import Any

import httpx
import jsonschema
from tqdm import tqdm

from loadtest.modelmap import ModelMap
from loadtest.record import PhaseRecord, RequestRecord, RunRecord
from loadtest.scenario import Phase, Scenario
from loadtest.sse import DONE, SSEDecoder, parse_chunk
from loadtest.workload import PlannedRequest, plan_phase


def chat_url(base_url: str) -> str:
    """`http://h:p` or `http://h:p/v1` -> `http://h:p/v1/chat/completions`."""
    url = base_url.rstrip("/")
    if not url.endswith("/v1"):
        url += "/v1"
    return url + "/chat/completions"


def request_body(plan: PlannedRequest, phase: Phase, model_map: ModelMap) -> dict[str, Any]:
    target = model_map.resolve(plan.adapter)
    body: dict[str, Any] = {
        "model": target.model,
        "messages": ([{"role": "system", "content": plan.system}] if plan.system else [])
        + [{"role": "user", "content": plan.prompt}],
        "max_tokens": plan.max_tokens,
        "temperature": phase.temperature,
        "seed": plan.seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if plan.schema is not None:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": plan.schema_name, "schema": plan.schema, "strict": True}}
    elif phase.ignore_eos:
        # Only on free text: a finished JSON value must be allowed to end the stream.
        body["ignore_eos"] = True
    body.update(target.body)
    return body


def check_json(text: str, schema: dict[str, Any]) -> tuple[bool, str | None]:
    """Does `text` parse as JSON and validate against `schema`?"""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return False, f"not JSON: {e}"
    err = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(value))
    return (True, None) if err is None else (False, f"schema: {err.message}")


class Runner:
    def __init__(self, scenario: Scenario, base_url: str, api_key: str | None, model_map: ModelMap,
                 progress: bool = True, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.scenario = scenario
        self.url = chat_url(base_url)
        self.base_url = base_url
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model_map = model_map
        self.progress = progress
        self.transport = transport    # None = the network; tests pass httpx.MockTransport
        self._t0 = 0.0

    def run(self) -> RunRecord:
        return asyncio.run(self.run_async())

    async def run_async(self) -> RunRecord:
        plans = [plan_phase(self.scenario, i) for i in range(len(self.scenario.phases))]
        for phase_plans in plans:  # fail before sending anything if a label has no mapping
            for p in phase_plans:
                self.model_map.resolve(p.adapter)
        run = RunRecord(scenario=self.scenario.name, description=self.scenario.description,
                        seed=self.scenario.seed, base_url=self.base_url, model_map=self.model_map.source,
                        started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        scenario_raw=self.scenario.raw)
        timeout = httpx.Timeout(self.scenario.request_timeout_s, connect=30.0)
        limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
        total = sum(len(p) for p in plans)
        bar = tqdm(total=total, unit="req", disable=not self.progress, dynamic_ncols=True)
        self._t0 = time.perf_counter()
        try:
            async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=self.headers,
                                         transport=self.transport) as client:
                for phase, phase_plans in zip(self.scenario.phases, plans):
                    bar.set_description(phase.name)
                    run.phases.append(await self._run_phase(client, phase, phase_plans, run, bar))
        finally:
            bar.close()
        return run

    def _now(self) -> float:
        return time.perf_counter() - self._t0

    async def _run_phase(self, client: httpx.AsyncClient, phase: Phase, plans: list[PlannedRequest],
                         run: RunRecord, bar: tqdm) -> PhaseRecord:
        start = self._now()
        deadline = start + phase.duration_s
        records: list[RequestRecord] = []
        if phase.arrivals.mode == "closed":
            it = iter(plans)

            async def worker() -> None:
                for p in it:  # one shared iterator: each plan is taken by exactly one worker
                    if self._now() >= deadline:
                        return
                    await self._send(client, p, phase, records, bar)

            tasks = [asyncio.create_task(worker()) for _ in range(phase.arrivals.concurrency)]
        else:
            tasks = []

            async def dispatch() -> None:
                for p in plans:
                    send_at = start + (p.arrival_s or 0.0)
                    if send_at >= deadline:
                        return
                    await asyncio.sleep(max(0.0, send_at - self._now()))
                    tasks.append(asyncio.create_task(self._send(client, p, phase, records, bar)))

            dispatcher = asyncio.create_task(dispatch())
            await asyncio.wait([dispatcher], timeout=max(0.0, deadline - self._now()))
            dispatcher.cancel()  # a no-op when it already returned
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - self._now()))
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for r in records:
            if r.status == "in_flight":  # cut off by the time limit
                r.status, r.error = "cancelled", f"time limit of {phase.duration_s} s reached"
                bar.update(1)
        bar.update(len(plans) - len(records))  # never sent: count them off the bar
        records.sort(key=lambda r: r.index)
        run.requests.extend(records)
        return PhaseRecord(name=phase.name, start=start, end=self._now(), planned=len(plans), sent=len(records))

    async def _send(self, client: httpx.AsyncClient, plan: PlannedRequest, phase: Phase,
                    records: list[RequestRecord], bar: tqdm) -> None:
        body = request_body(plan, phase, self.model_map)
        rec = RequestRecord(index=plan.index, phase=plan.phase, adapter=plan.adapter, model=body["model"],
                            schema=plan.schema_name, max_tokens=plan.max_tokens, start=self._now())
        records.append(rec)  # visible at once, so a cancelled request is still recorded
        sent = time.perf_counter()
        try:
            await self._stream(client, body, rec, sent)
        except (httpx.HTTPError, httpx.StreamError) as e:
            rec.status, rec.error = "error", f"{type(e).__name__}: {e}"
        except ValueError as e:  # a malformed stream event
            rec.status, rec.error = "error", str(e)
        rec.e2e = time.perf_counter() - sent
        if rec.status == "in_flight":
            rec.status = "ok"
        if rec.completion_tokens is None and rec.status == "ok":
            rec.completion_tokens = rec.chunks  # the server sent no usage: one token a chunk
        if plan.schema is not None and rec.status == "ok":
            rec.json_valid, rec.json_error = check_json(rec.text, plan.schema)
        bar.update(1)

    async def _stream(self, client: httpx.AsyncClient, body: dict[str, Any], rec: RequestRecord,
                      sent: float) -> None:
        text: list[str] = []
        last = sent
        dec = SSEDecoder()
        try:
            async with client.stream("POST", self.url, json=body) as resp:
                rec.http_status = resp.status_code
                if resp.status_code != 200:
                    raw = (await resp.aread()).decode("utf-8", "replace")
                    rec.status, rec.error = "error", f"HTTP {resp.status_code}: {_error_message(raw)}"
                    return
                async for line in resp.aiter_lines():
                    data = dec.feed(line)
                    if data is None:
                        continue
                    if data.strip() == DONE:
                        break
                    chunk = parse_chunk(data)
                    now = time.perf_counter()
                    if chunk.error:
                        rec.status, rec.error = "error", f"stream error: {chunk.error}"
                        return
                    if chunk.content:
                        if rec.ttft is None:
                            rec.ttft = now - sent
                        else:
                            rec.itl.append(now - last)
                        last = now
                        rec.chunks += 1
                        text.append(chunk.content)
                    if chunk.finish_reason:
                        rec.finish_reason = chunk.finish_reason
                    if chunk.usage:
                        rec.prompt_tokens = chunk.usage.get("prompt_tokens")
                        rec.completion_tokens = chunk.usage.get("completion_tokens")
                        rec.usage_reported = True
        finally:
            rec.text = "".join(text)


def _error_message(raw: str) -> str:
    """The `error.message` of an OpenAI-shaped error body, else the body's start."""
    try:
        err = json.loads(raw).get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    except (json.JSONDecodeError, AttributeError):
        pass
    return raw[:300]
