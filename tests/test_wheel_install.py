"""The wheel carries the CUDA sources, and an installed kvxfer finds them (not the source tree's).

CPU (runs in CI): build the wheel from a copy of the package, install it with numpy and msgpack
into a fresh virtual environment (no system site-packages), and from a directory outside the
repository check that the installed package holds ``csrc/kv_copy.cu`` and that the loader's
:func:`~kvxfer.ops.loader.source_path` / :func:`~kvxfer.ops.loader.read_source` return the
installed file with every kernel of :mod:`kvxfer.ops.kernels` in it.

GPU (``-m gpu``): the same wheel installed with ``pip install --target`` (no index, no deps) and
put first on the path of this interpreter, which brings the machine's cupy wherever it lives
(a virtual environment made here would not see a parent environment's packages); then gathers
by the block-pair and the job-record kernels, compiled by NVRTC from the installed source into
an empty kernel cache, checked against the numpy reference. ``KVXFER_TEST_WHEEL`` names a wheel
built elsewhere to use instead of building one (a GPU machine without setuptools>=77 and no
index cannot build it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KERNELS = ("kv_copy_jobs", "kv_copy_pairs", "kv_copy_pairs_inline", "kv_copy_pairs_ids")


def _setuptools_ok() -> bool:
    """Whether this interpreter can build the wheel without an isolated build environment."""
    try:
        major = int(metadata.version("setuptools").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return False
    return major >= 77


def _wheel(tmp: Path) -> Path:
    """A wheel of this tree's kvxfer, built from a copy (the repository gets no build/ or egg-info)."""
    given = os.environ.get("KVXFER_TEST_WHEEL")
    if given:
        return Path(given).resolve()
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "kvxfer", src / "kvxfer", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(out)]
    if _setuptools_ok():
        cmd.append("--no-build-isolation")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp)
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout}\n{proc.stderr}"
    (wheel,) = out.glob("kvxfer-*.whl")
    return wheel


def _clean_env() -> dict[str, str]:
    """This environment without a path to the source tree: PYTHONPATH keeps only entries that
    hold no ``kvxfer`` package (wheels carried as a --target directory stay)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    keep = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and not (Path(p) / "kvxfer").exists()]
    if keep:
        env["PYTHONPATH"] = os.pathsep.join(keep)
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _venv(tmp: Path, wheel: Path) -> Path:
    """A fresh virtual environment under ``tmp`` (no system site-packages) with the wheel and
    the deps needed to import kvxfer.ops, at this interpreter's versions; its python."""
    root = tmp / "venv"
    venv.EnvBuilder(system_site_packages=False, with_pip=False, symlinks=True).create(root)
    py = root / "bin" / "python"
    cmd = [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-compile", str(wheel),
           f"numpy=={metadata.version('numpy')}", f"msgpack=={metadata.version('msgpack')}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=_clean_env(), cwd=tmp)
    assert proc.returncode == 0, f"installing the wheel failed:\n{proc.stdout}\n{proc.stderr}"
    return py


def _target(tmp: Path, wheel: Path) -> Path:
    """The wheel alone installed into the directory ``tmp/site`` (no index, no deps)."""
    site = tmp / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target",
           str(site), str(wheel)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=_clean_env(), cwd=tmp)
    assert proc.returncode == 0, f"installing the wheel failed:\n{proc.stdout}\n{proc.stderr}"
    return site


def _run(py: Path, code: str, cwd: Path, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=240, cwd=cwd,
                          env=env or _clean_env())
    assert proc.returncode == 0, f"the installed kvxfer failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


_CHECK = """
import json, sys, kvxfer
from kvxfer.ops import cuda, kernels, loader, pairs
path = loader.source_path("kv_copy.cu")
text = loader.read_source("kv_copy.cu")
specs = [kernels.JOBS_KERNEL, kernels.PAIRS_KERNEL, kernels.INLINE_KERNEL, kernels.IDS_KERNEL]
print(json.dumps({"package": kvxfer.__file__, "source": str(path), "exists": path.is_file(),
                  "sources": [str(p) for p in loader.sources()], "source_names": sorted({s.source for s in specs}),
                  "kernels": [s.kernel for s in specs if "\\n" + s.kernel + "(" in text],
                  "cupy_or_torch": [m for m in ("cupy", "torch") if m in sys.modules]}))
"""


def _assert_installed(info: dict, root: Path) -> None:
    package = Path(info["package"]).resolve()
    assert package.is_relative_to(root.resolve()), f"imported {package}, not the wheel's under {root}"
    assert not package.is_relative_to(REPO)
    source = Path(info["source"]).resolve()
    assert source.is_relative_to(root.resolve()) and info["exists"], info
    assert source.parent.name == "csrc" and source.parent.parent == package.parent
    assert info["sources"] == [info["source"]] and info["source_names"] == ["kv_copy.cu"]
    assert info["kernels"] == list(KERNELS), f"kernels found in {source}: {info['kernels']}"


def test_installed_wheel_holds_and_finds_the_kernel_sources(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path)
    py = _venv(tmp_path, wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    info = _run(py, _CHECK, elsewhere)
    _assert_installed(info, tmp_path / "venv")
    assert info["cupy_or_torch"] == []  # importing the ops imports neither


_GATHER = """
import json, numpy as np, cupy
from kvxfer.layout import KVLayout
from kvxfer.ops import cuda, reference
from kvxfer.plan import plan_transfer
rng = np.random.default_rng(5)
host = [rng.integers(0, 256, size=(2, 64, 16, 4, 64), dtype=np.uint8) for _ in range(3)]
src = [cupy.asarray(h) for h in host]
layout = KVLayout.from_tensors(src, block_dim=1)
plan = plan_transfer(layout.geometry, layout.geometry, [5, 9, 1, 40, 63], [0, 2, 4, 6, 8])
want = reference.gather(plan, [h.reshape(-1) for h in host])
assert plan.block_pairs is not None
for pairs in (True, False):  # a block-pair kernel (gather), the job-record kernel (prepare_gather)
    out = cupy.full(plan.nbytes, 0xAB, dtype=cupy.uint8)
    if pairs:
        cuda.gather(plan, layout, out)
    else:
        cuda.prepare_gather(plan, layout, out).launch()
    cupy.cuda.Device().synchronize()
    assert np.array_equal(cupy.asnumpy(out), want), "gather from the installed wheel moved the wrong bytes"
print(json.dumps({"ok": True}))
"""


@pytest.mark.gpu
def test_installed_wheel_compiles_and_runs_a_kernel(tmp_path: Path) -> None:
    probe = subprocess.run([sys.executable, "-c", "import cupy; print(cupy.cuda.runtime.getDeviceCount())"],
                           capture_output=True, text=True, timeout=120)
    if probe.returncode != 0 or not probe.stdout.strip().isdigit() or int(probe.stdout.strip()) < 1:
        pytest.skip("needs cupy and a CUDA GPU")
    wheel = _wheel(tmp_path)
    site = _target(tmp_path, wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _clean_env()
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    py = Path(sys.executable)
    _assert_installed(_run(py, _CHECK, elsewhere, env), site)
    env["KVXFER_CACHE_DIR"] = str(tmp_path / "kernel-cache")  # empty: NVRTC compiles the installed source
    assert _run(py, _GATHER, elsewhere, env)["ok"]
    built = sorted(p.name for p in (tmp_path / "kernel-cache").glob("kv_copy-*"))
    assert any(n.endswith((".cubin", ".ptx")) for n in built), built
