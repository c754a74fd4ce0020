"""Every CUDA source in kvxfer/csrc/ must build for sm_80 and sm_90 (CI has nvcc but no GPU)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kvxfer.ops.loader import source_dir, sources

SOURCES = sources()
ARCHS = ["sm_80", "sm_90"]


def _nvcc() -> str | None:
    for cand in (shutil.which("nvcc"), "/usr/local/bin/nvcc", "/usr/local/cuda/bin/nvcc"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


NVCC = _nvcc()


def test_csrc_has_sources():
    assert SOURCES, f"no CUDA sources found under {source_dir()}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (looked on PATH, /usr/local/bin, /usr/local/cuda/bin)")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_source_compiles(source: Path, arch: str, tmp_path: Path):
    out = tmp_path / f"{source.stem}.{arch}.cubin"
    proc = subprocess.run(
        [NVCC, "-cubin", f"-arch={arch}", "-std=c++17", "-Werror", "all-warnings", "-o", str(out), str(source)],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, f"nvcc failed for {source.name} ({arch}):\n{proc.stdout}\n{proc.stderr}"
    assert out.stat().st_size > 0
