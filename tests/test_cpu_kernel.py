"""Building the CPU kernels: into the cache, once per source and compiler, never half-written."""
from __future__ import annotations

import os

import pytest

from server import cpu_kernel


def test_build_writes_the_library_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))
    path = cpu_kernel.build()
    assert path.parent == tmp_path / "kernels" and path.name.startswith("cpu_matmul-") and path.suffix == ".so"
    mtime = path.stat().st_mtime_ns
    assert cpu_kernel.build() == path and path.stat().st_mtime_ns == mtime  # not rebuilt
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_a_failing_compiler_leaves_nothing_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo fake 1.0; exit 0; fi\n"
                    "echo 'error: no such instruction' >&2; exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with pytest.raises(cpu_kernel.KernelUnavailable, match="building the CPU kernels failed: error: no such"):
        cpu_kernel.build()
    assert os.listdir(tmp_path / "kernels") == []


def test_no_compiler_is_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_compiler", lambda: None)
    with pytest.raises(cpu_kernel.KernelUnavailable, match="need a C compiler"):
        cpu_kernel.build()
