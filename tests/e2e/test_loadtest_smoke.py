"""The load-test harness against a live `loraplex serve`: smoke.yaml end to end over HTTP."""
import json
import os

import pytest

from loadtest.cli import main

from .conftest import KEYS

pytestmark = pytest.mark.e2e


def test_smoke_scenario_against_live_server(live_server, tmp_path):
    model_map = tmp_path / "map.yaml"
    # the scenario's labels -> adapters the live server has; base stays the base model
    model_map.write_text("base: base\na1: acme-support\na2: beta-legal\n")
    out = tmp_path / "out"
    rc = main(["run", "smoke", "--base-url", live_server.url + "/v1", "--api-key", KEYS["admin"],
               "--model-map", str(model_map), "--out", str(out), "--no-progress"])
    assert rc == 0, live_server.log_tail()

    results = json.loads((out / "results.json").read_text())
    reqs = results["requests"]
    assert [p["planned"] for p in results["phases"]] == [6] and [p["sent"] for p in results["phases"]] == [6]
    assert len(reqs) == 6
    assert [r["status"] for r in reqs] == ["ok"] * 6, [r["error"] for r in reqs]
    assert {r["adapter"] for r in reqs} == {"base", "a1", "a2"}
    assert {r["model"] for r in reqs} == {"base", "acme-support", "beta-legal"}
    for r in reqs:
        assert r["usage_reported"] and r["prompt_tokens"] > 0
        assert 0 < r["ttft"] <= r["e2e"] and len(r["itl"]) == r["chunks"] - 1
        if r["schema"] is None:  # ignore_eos: exactly max_tokens tokens
            assert r["completion_tokens"] == 8 and r["finish_reason"] == "length"
        else:  # constrained decoding: the JSON is complete and valid
            assert r["json_valid"] is True, (r["text"], r["json_error"])
    assert sum(r["schema"] is not None for r in reqs) == 2

    summary = (out / "summary.md").read_text()
    assert "| smoke | 6 | 6 | 0 | 0 |" in summary and "2/2 (100%)" in summary
    for png in ("throughput.png", "ttft_cdf.png", "itl_cdf.png"):
        assert os.path.getsize(out / png) > 1000, png


def test_run_without_a_map_stops_before_sending(live_server, tmp_path, capsys):
    """The scenario's a1/a2 are not adapters of the live server: nothing is sent, and the
    message names them and the way out."""
    out = tmp_path / "out"
    rc = main(["run", "smoke", "--base-url", live_server.url, "--api-key", KEYS["admin"], "--out", str(out),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "a1 (sent as 'a1')" in err and "a2 (sent as 'a2')" in err and "--model-map" in err
    assert "base (sent" not in err and not out.exists()


def test_run_with_map_missing_uses_served_adapters(live_server, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["run", "smoke", "--base-url", live_server.url, "--api-key", KEYS["admin"], "--out", str(out),
               "--no-progress", "--map-missing"])
    assert rc == 0, live_server.log_tail()
    printed = capsys.readouterr().out
    assert "--map-missing: base -> base" in printed
    reqs = json.loads((out / "results.json").read_text())["requests"]
    assert [r["status"] for r in reqs] == ["ok"] * 6
    assert {r["model"] for r in reqs if r["adapter"] != "base"} <= {"acme-support", "beta-legal", "shared-json"}
