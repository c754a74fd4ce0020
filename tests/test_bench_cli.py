"""kvxfer-bench end to end on CPU: real processes, real sockets, the files it writes, its exit codes.

Every run is shrunk (tiny custom geometry or --scale) so that a point takes about a second.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from kvxfer.tools.report import CSV_FIELDS, JSON_SCHEMA
from kvxfer.tools.workloads import STANDARD_WORKLOADS, Workload, get_workload, parse_size

BENCH = [sys.executable, "-m", "kvxfer.tools.bench"]
TINY = ["--piece-bytes", "4K", "--blocks", "8", "--layers", "4", "--iters", "3", "--warmup", "1", "--no-progress"]

POINT_FIELDS = {
    "workload", "geometry", "piece_bytes", "blocks", "layers", "pieces", "nbytes", "backend", "op", "memory",
    "devices", "iters", "warmup", "gbps", "latency_p50_s", "latency_p99_s", "timing", "verified", "baseline",
    "baseline_gbps", "ratio", "nixl", "nixl_gbps", "nixl_ratio", "error",
}
ENV_FIELDS = {"hostname", "date", "command", "python", "platform", "cpus", "kvxfer", "git_commit", "packages",
              "gpus", "cuda_visible_devices"}
PACKAGES = {"numpy", "msgpack", "torch", "cupy", "ucxx", "libucx", "nixl", "rich", "matplotlib"}


def bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, UCX_WARN_UNUSED_ENV_VARS="n")
    return subprocess.run([*BENCH, *args], capture_output=True, text=True, timeout=timeout, env=env)


def _ucx_skip_reason() -> str | None:
    if importlib.util.find_spec("ucxx") is None:
        return "ucxx is not importable here (pip install 'kvxfer[cuda12]' or 'kvxfer[cuda13]')"
    if importlib.util.find_spec("kvxfer.backends.ucx") is None:
        return "kvxfer.backends.ucx is not in this tree yet"
    return None


# -- workloads (in process) ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,total",
    [("llama8b", 1 << 30), ("llama8b-tp8", 1 << 30), ("llama70b-tp8", 320 << 20), ("mla", 61 * 512 * 18 * 1024), ("small", 2 << 20)],
)
def test_standard_workloads_match_benchmarks_md(name: str, total: int) -> None:
    assert get_workload(name).total_bytes == total


def test_scale_keeps_piece_size_and_block_ids_differ() -> None:
    for w in STANDARD_WORKLOADS.values():
        s = w.scaled(1 / 64)
        assert s.piece_bytes == w.piece_bytes
        assert s.total_bytes <= w.total_bytes / 64 * 2 or s.blocks == 1
        a, b = s.block_ids()
        assert len(set(a.tolist())) == len(a) == s.blocks and not (a == b).all()
    assert parse_size("32KiB") == parse_size("32K") == 32768


def test_workload_wire_round_trip() -> None:
    w = Workload("x", layers=3, num_blocks=10, blocks=4, piece_shape=(5, 6), kv_split=False, seed=3)
    assert Workload.from_wire(w.to_wire()) == w


# -- a TCP sweep, and the files it writes ----------------------------------------------------------
def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    crc = struct.unpack(">I", data[29:33])[0]
    assert zlib.crc32(data[12:29]) == crc, "IHDR checksum is wrong"
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND"
    return width, height


def test_tcp_sweep_writes_json_csv_and_plot(tmp_path: Path) -> None:
    out_json, out_csv, out_png = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png"
    r = bench("--backend", "tcp", *TINY, "--sweep-piece", "4K,16K", "--op", "both",
              "--json", str(out_json), "--csv", str(out_csv), "--plot", str(out_png))
    assert r.returncode == 0, r.stderr
    assert "GB/s" in r.stdout and "raw_tcp" in r.stdout
    assert r.stderr.count("[ok]") == 4  # one progress line per point when not on a terminal

    doc = json.loads(out_json.read_text())
    assert doc["schema"] == JSON_SCHEMA
    assert {"environment", "peer_environment", "options", "skipped", "points", "summary"} <= doc.keys()
    assert ENV_FIELDS <= doc["environment"].keys()
    assert PACKAGES <= doc["environment"]["packages"].keys()
    assert doc["environment"]["packages"]["numpy"]
    assert "--sweep-piece" in doc["environment"]["command"]
    assert ENV_FIELDS <= doc["peer_environment"].keys()
    assert doc["summary"] == {"points": 4, "failed": 0}
    points = doc["points"]
    assert {(p["piece_bytes"], p["op"]) for p in points} == {(4096, "read"), (4096, "write"), (16384, "read"), (16384, "write")}
    for p in points:
        assert POINT_FIELDS <= p.keys()
        assert p["backend"] == "tcp" and p["verified"] is True and p["error"] == ""
        assert p["nbytes"] == p["piece_bytes"] * 8 * 4 * 2
        assert p["gbps"] > 0 and 0 < p["latency_p50_s"] <= p["latency_p99_s"]
        assert len(p["timing"]["samples_s"]) == 3
        assert p["baseline"]["kind"] == "raw_tcp" and p["baseline_gbps"] > 0
        assert p["ratio"] == pytest.approx(p["gbps"] / p["baseline_gbps"])

    with out_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and list(rows[0].keys()) == list(CSV_FIELDS)
    for row in rows:
        assert float(row["gbps"]) > 0 and float(row["ratio"]) > 0 and row["verified"] == "True"
        assert int(row["nbytes"]) == int(row["piece_bytes"]) * 64

    data = out_png.read_bytes()
    width, height = _png_size(data)
    assert width >= 400 and height >= 300 and len(data) > 10_000
    import matplotlib.image

    img = matplotlib.image.imread(str(out_png))
    assert img.std() > 0.05, "the plot is blank"


def test_block_sweep_and_workload_scale(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    r = bench("--workload", "llama8b-tp8", "--scale", "1/512", "--sweep-blocks", "1,4", "--iters", "3",
              "--warmup", "1", "--no-progress", "--json", str(out))
    assert r.returncode == 0, r.stderr
    points = json.loads(out.read_text())["points"]
    assert [p["piece_bytes"] for p in points] == [4096, 4096]
    assert all(p["verified"] for p in points)


# -- UCX -----------------------------------------------------------------------------------------
@pytest.mark.skipif(_ucx_skip_reason() is not None, reason=_ucx_skip_reason() or "")
def test_ucx_point(tmp_path: Path) -> None:
    out = tmp_path / "u.json"
    r = bench("--backend", "ucx", *TINY, "--json", str(out))
    assert r.returncode == 0, r.stderr
    (p,) = json.loads(out.read_text())["points"]
    assert p["backend"] == "ucx" and p["verified"] is True and p["gbps"] > 0 and p["baseline_gbps"] > 0


def test_backend_all_skips_what_cannot_run(tmp_path: Path) -> None:
    out = tmp_path / "a.json"
    r = bench("--backend", "all", *TINY, "--json", str(out))
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    skipped = {s["backend"]: s["reason"] for s in doc["skipped"]}
    assert "GPU memory" in skipped["cuda_ipc"]
    ran = {p["backend"] for p in doc["points"]}
    assert "tcp" in ran and ran.isdisjoint(skipped)
    assert ("ucx" in ran) == (_ucx_skip_reason() is None)
    assert "skipped cuda_ipc" in r.stdout


# -- two commands, as on two hosts ---------------------------------------------------------------
def test_listen_and_peer(tmp_path: Path) -> None:
    server = subprocess.Popen([*BENCH, "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline() if server.stdout else ""
        m = re.search(r"serving on 127\.0\.0\.1:(\d+)", line)
        assert m, line
        out = tmp_path / "p.json"
        r = bench("--peer", f"127.0.0.1:{m.group(1)}", *TINY, "--json", str(out))
        assert r.returncode == 0, r.stderr
        doc = json.loads(out.read_text())
        assert doc["options"]["role"] == "connect" and doc["points"][0]["verified"]
        # the server keeps serving: a second measuring side works too
        r2 = bench("--peer", f"127.0.0.1:{m.group(1)}", *TINY, "--op", "write")
        assert r2.returncode == 0, r2.stderr
    finally:
        server.terminate()
        server.wait(10)


# -- impossible requests exit 2 with a message ----------------------------------------------------
@pytest.mark.parametrize(
    "args,message",
    [
        (["--workload", "nope"], "standard workloads are: llama8b, llama8b-tp8, llama70b-tp8, mla, small"),
        (["--backend", "carrier-pigeon"], "choose from tcp, cuda_ipc, ucx or all"),
        (["--backend", "cuda_ipc"], "Available for --memory host: tcp"),
        (["--workload", "llama8b", "--blocks", "1G"], "shrink it with --scale"),
        (["--scale", "3"], "expected a number in (0, 1]"),
        (["--scale", "zero"], "expected a number in (0, 1]"),
        (["--piece-bytes", "3"], "multiple of 2"),
        (["--piece-bytes", "4Q"], "size '4Q'"),
        (["--plot", "out.jpg"], "FILE.png"),
        (["--peer", "nohost"], "not host:port"),
        (["--iters", "0"], "iters >= 1"),
        (["--iters", "many"], "invalid int value"),
        (["--op", "sideways"], "invalid choice"),
        (["--peer", "127.0.0.1:1", "--listen", "127.0.0.1:0"], "--peer excludes"),
        (["--devices", "0,1,2"], "LOCAL,PEER"),
    ],
)
def test_bad_arguments_exit_2(args: list[str], message: str) -> None:
    r = bench(*args, "--no-progress", timeout=60)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_cuda_without_gpu_exits_2() -> None:
    from kvxfer.tools.arrays import gpu_count

    if gpu_count() > 0:
        pytest.skip("a GPU is visible; this checks the message on machines without one")
    r = bench("--memory", "cuda", *TINY)
    assert r.returncode == 2 and "--memory cuda needs" in r.stderr


def test_console_script_help() -> None:
    # the script pip installed beside the interpreter running the tests (the venv's bin/), not
    # whatever PATH holds: the tests run as .venv/bin/python -m pytest without an activated venv
    exe = Path(sys.executable).parent / "kvxfer-bench"
    if not exe.is_file():
        msg = f"the kvxfer-bench console script is not installed beside {sys.executable} (pip install -e .)"
        if os.environ.get("CI"):  # CI installs the package: a missing script is a packaging bug there
            pytest.fail(msg)
        pytest.skip(msg)
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--sweep-piece" in r.stdout and "llama70b-tp8" in r.stdout
